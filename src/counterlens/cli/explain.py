"""``counterlens explain``: attribution maps of every image of a folder into a run directory."""
from __future__ import annotations

from ..attribution.base import METHODS, get_method
from ..data.images import ImageFolder
from ..runs.application import run_explain
from .common import has_class_folders, load_classifier, parse_params, target_arg


def explain(args) -> int:
    methods = list(METHODS) if args.methods == ["all"] else [get_method(m).name for m in args.methods]
    params = parse_params(args.param)
    clf = load_classifier(args)
    size = clf.input_size
    dataset = ImageFolder(args.data, channels=1 if (clf.in_channels or 1) == 1 else clf.in_channels,
                          size=size, classes=clf.classes if has_class_folders(args.data) else None,
                          masks=args.masks, limit=args.limit)
    target = target_arg(args.target)
    summary, report = run_explain(clf, dataset, args.out, methods=methods, params=params, target=target,
                                  batch_size=args.batch_size, seed=args.seed,
                                  images_per_batch=args.images_per_batch, progress=not args.quiet,
                                  model_source=str(args.model), data_source=str(args.data),
                                  report=not args.no_report, clip_percentile=args.clip_percentile)
    print(f"explained {summary.done} images ({summary.skipped} already done, {summary.failed} failed) "
          f"in {summary.seconds:.1f} s; run directory: {args.out}")
    if report:
        print(f"report: {report}")
    return 1 if summary.failed and not summary.done and not summary.skipped else 0
