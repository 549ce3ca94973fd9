"""``counterlens evaluate``: the trust metrics of a run directory (:func:`counterlens.runs.evaluate.evaluate_run`)."""
from __future__ import annotations

from pathlib import Path

from ..errors import CounterlensError, InputError
from ..metrics.evaluate import per_method
from ..runs.evaluate import evaluate_run
from .engine import engine_of


def evaluate_cmd(args) -> int:
    """``counterlens evaluate RUN [--masks DIR] [--model PATH] ...``: metrics of a run directory.

    Reads ``args.run``, ``args.masks``; optional ``model`` (default: the run's model source in
    ``run.yaml``), ``factory``, ``trust_model_file``, ``device``, ``classes``, ``metrics`` (list),
    ``batch_size``, ``seed``, ``steps``, ``baseline``, ``sanity_images`` (0 skips the sanity check),
    ``quiet``; the report's ``colormap``, ``alpha``, ``absolute``, ``clip_percentile``. Refuses a model
    whose SHA-256 differs from the one the run was made with.
    """
    from ..loading import load_model
    from ..runs.store import open_run
    from .report import display_options
    run = Path(args.run)
    display = display_options(args)                  # the report's settings, checked before the model loads
    spec = open_run(run).spec
    model = spec.get("model") or {}
    source = getattr(args, "model", None) or model.get("source")
    if not source or not Path(source).exists():
        raise InputError(f"the model of {run} ({source or 'not recorded'}) is not found; pass --model PATH")
    if getattr(args, "engine", "local") == "local" and getattr(args, "workers", None) is not None:
        raise InputError("--workers applies to --engine ray (locally, evaluate runs in this process)")
    described = run_overrides(args, model, run)
    engine = engine_of(args, {**described, "source": str(source), "factory": getattr(args, "factory", None),
                              "trust_model_file": getattr(args, "trust_model_file", False),
                              "classes": getattr(args, "classes", None) or model.get("classes"),
                              "device": getattr(args, "device", "auto"),
                              "output": getattr(args, "output_head", None) or model.get("output"),
                              "precision": model.get("precision")})
    clf = load_model(source, factory=getattr(args, "factory", None),
                     trust_model_file=getattr(args, "trust_model_file", False), device=getattr(args, "device", "auto"),
                     classes=getattr(args, "classes", None) or model.get("classes"),
                     output=getattr(args, "output_head", None) or model.get("output"),
                     precision=model.get("precision"), **described)     # the run's precision (--precision)
    clf.overrides = described
    if model.get("sha256") and getattr(clf, "source_hash", None) and model["sha256"] != clf.source_hash:
        raise CounterlensError(f"{source} is not the model {run} was made with (SHA-256 differs); pass the run's model")
    sanity_images = int(getattr(args, "sanity_images", 8))
    df = evaluate_run(run, clf, masks_dir=getattr(args, "masks", None), metrics=getattr(args, "metrics", None),
                      batch_size=getattr(args, "batch_size", 64), seed=getattr(args, "seed", 0),
                      steps=getattr(args, "steps", 20), baseline=getattr(args, "baseline", "blur"),
                      sanity=sanity_images > 0, sanity_images=sanity_images,
                      sanity_methods=getattr(args, "sanity_methods", None), progress=not getattr(args, "quiet", False),
                      images_per_batch=getattr(args, "images_per_batch", 32), engine=engine,
                      select=getattr(args, "select", None))
    table = per_method(df).pivot(index="method", columns="metric", values="mean")
    print(table.to_string(float_format=lambda v: f"{v:.3f}"))
    from ..viz.report_verdict import sanity_verdict
    for method, v in (df.attrs.get("sanity") or {}).items():
        if "error" in v:
            print(f"sanity {method}: not run ({v['error']})")
            continue
        verdict = sanity_verdict(v)          # the rule and both of its numbers, as the report's verdict shows them
        print(f"sanity {method}: {'passed' if verdict['passed'] else 'FAILED'} ({verdict['detail']})")
    print(f"wrote {df['path'].nunique()} images x {df['method'].nunique()} methods x {df['metric'].nunique()} "
          f"metrics to {run} (counterlens.open_run(RUN).metrics), metrics.csv, metrics_summary.csv, curves.json"
          + (", sanity.json" if sanity_images > 0 else ""))
    if not getattr(args, "no_report", False):
        from ..viz.report import write_report
        print(f"report: {write_report(run, **display)}")       # the page shows the metrics just written
    return 0


def run_overrides(args, model: dict, run) -> dict:
    """The model as the run described it on the command line (``model.overrides`` in run.yaml: --size,
    --channels, --value-range, --preprocess), so its maps are scored on the same model; a flag given
    here that differs from the run's is refused."""
    from ..runs.diagnose import flag_text
    from .common import model_overrides
    recorded = dict(model.get("overrides") or {})
    for key, value in model_overrides(args).items():
        if key in recorded and recorded[key] != value:
            flag = {"in_channels": "--channels", "input_size": "--size", "value_range": "--value-range"}.get(
                key, "--preprocess")
            raise InputError(f"{flag_text(key, value)} differs from the run's {flag_text(key, recorded[key], bare=True)} "
                             f"(recorded in {run}/run.yaml); its maps were made with that model: leave {flag} out")
        recorded[key] = value
    return recorded
