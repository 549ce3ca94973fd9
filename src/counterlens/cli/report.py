"""``counterlens report``: (re)write the HTML report of a run directory."""
from __future__ import annotations

from pathlib import Path



def display_options(args) -> dict:
    """The report's display options of a command line (``--colormap``, ``--alpha``, ``--absolute``,
    ``--clip-percentile``) as :func:`~counterlens.viz.report.write_report` takes them, checked
    (:class:`~counterlens.viz.plots.OverlayStyle`)."""
    from ..viz.plots import OverlayStyle
    options = {"cmap": getattr(args, "colormap", None), "alpha": getattr(args, "alpha", 0.75),
               "absolute": getattr(args, "absolute", False), "clip_percentile": getattr(args, "clip_percentile", 0.5)}
    OverlayStyle(**options)
    return options


def report(args) -> int:
    from ..viz.report import write_report
    path = write_report(args.run, figures=args.figures, page_size=args.page_size,
                        single_file_max=args.single_file_max, **display_options(args))
    print(f"report: {path}")
    print(f"all metrics: {Path(args.run) / 'results.csv'}"
          + (f"; figures: {Path(args.run) / 'figures'}" if args.figures else ""))
    return 0
