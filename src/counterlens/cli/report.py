"""``counterlens report``: (re)write the HTML report of a run directory."""
from __future__ import annotations

from pathlib import Path



def display_options(args) -> dict:
    """The report's display options of a command line (``--colormap``, ``--alpha``,
    ``--absolute/--no-absolute``, ``--clip-percentile``) as
    :func:`~counterlens.viz.report.write_report` takes them; None where not given (the run's last
    report's setting, else the default). The given ones are checked (one-line InputErrors)."""
    from ..viz.plots import check_alpha, check_clip_percentile, check_cmap
    options = {"cmap": getattr(args, "colormap", None), "alpha": getattr(args, "alpha", None),
               "absolute": getattr(args, "absolute", None), "clip_percentile": getattr(args, "clip_percentile", None)}
    if options["cmap"] not in (None, "auto"):
        check_cmap(options["cmap"], "--colormap")
    if options["alpha"] is not None:
        check_alpha(options["alpha"], "--alpha")
    if options["clip_percentile"] is not None:
        check_clip_percentile(options["clip_percentile"], "--clip-percentile")
    return options


def report(args) -> int:
    from ..viz.report import write_report
    path = write_report(args.run, figures=args.figures, page_size=args.page_size,
                        single_file_max=args.single_file_max, **display_options(args))
    print(f"report: {path}")
    print(f"all metrics: {Path(args.run) / 'results.csv'}"
          + (f"; figures: {Path(args.run) / 'figures'}" if args.figures else ""))
    return 0
