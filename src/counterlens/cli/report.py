"""``counterlens report``: (re)write the HTML report of a run directory."""
from __future__ import annotations

from pathlib import Path

from ..viz.report import write_report


def report(args) -> int:
    path = write_report(args.run, clip_percentile=args.clip_percentile, figures=args.figures,
                        page_size=args.page_size, single_file_max=args.single_file_max)
    print(f"report: {path}")
    print(f"all metrics: {Path(args.run) / 'results.csv'}"
          + (f"; figures: {Path(args.run) / 'figures'}" if args.figures else ""))
    return 0
