"""``counterlens explain``: attribution maps of every image of a folder into a run directory."""
from __future__ import annotations

from ..attribution.base import METHODS, get_method
from ..errors import InputError
from ..runs.dataset import explain_folder
from ..runs.spec import resolved_methods
from .common import image_dataset, load_classifier, parse_params, print_summary, target_arg
from .engine import engine_of, model_args


def explain(args) -> int:
    methods = list(METHODS) if args.methods == ["all"] else [get_method(m).name for m in args.methods]
    params = parse_params(args.param)
    resolved_methods(methods, params, args.batch_size, args.seed)      # every argument checked before the model loads
    if args.clip_percentile is not None and not 0 <= args.clip_percentile < 50:
        raise InputError(f"--clip-percentile {args.clip_percentile}: pass a percentage in [0, 50), e.g. 0.5")
    from .report import display_options
    display = display_options(args)                                     # the report's other settings too
    engine = engine_of(args, model_args(args))
    clf = load_classifier(args)
    dataset, diagnosis = image_dataset(clf, args.data, masks=args.masks, limit=args.limit,
                                       window=getattr(args, "window", "auto"))
    summary = explain_folder(clf, dataset, args.out, methods=methods, params=params, target=target_arg(args.target),
                             batch_size=args.batch_size, seed=args.seed, images_per_batch=args.images_per_batch,
                             workers=args.workers, threads=args.threads, progress=not args.quiet,
                             model_source=str(args.model), data_source=str(args.data), overwrite=args.overwrite, force=args.force,
                             map_dtype=args.map_dtype, engine=engine, loading=diagnosis.loading,
                             select=getattr(args, "select", None))
    print_summary("explained", summary, args.out)
    from ..runs.store import open_run
    for method, reason in open_run(args.out).skipped.items():     # could not run on this model; the others ran
        print(f"  skipped {method}: {reason}")
    if not args.no_report:
        from ..viz.report import write_report
        print(f"report: {write_report(args.out, **display)}")
    return 1 if summary.failed and not summary.done and not summary.skipped else 0
