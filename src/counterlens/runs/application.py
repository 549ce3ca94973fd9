"""The application layer's entry points over a run directory: the model as ``run.yaml`` describes it
(:func:`model_spec`) and an explain run of a dataset (:func:`run_explain`)."""
from __future__ import annotations

from pathlib import Path

from ..errors import CounterlensError

__all__ = ["model_spec", "run_explain"]


def model_spec(clf, source: str) -> dict:
    """How ``run.yaml`` describes the model: source, SHA-256, classes, sizes, preprocessing."""
    card = getattr(clf, "card", None) or {}
    return {"source": str(source), "sha256": getattr(clf, "source_hash", None),
            "description": card.get("architecture") or card.get("factory") or type(clf.module).__name__,
            "classes": clf.classes, "in_channels": clf.in_channels,
            "input_size": list(clf.input_size) if clf.input_size else None,
            "value_range": list(clf.value_range) if clf.value_range else None,
            "preprocess": card.get("preprocess"), "test_accuracy": card.get("test_accuracy")}


def run_explain(clf, dataset, out: Path, *, methods: list[str], params: dict, target="predicted",
                batch_size: int = 64, seed: int = 0, images_per_batch: int = 16, progress: bool = True,
                model_source: str = "", data_source: str = "", report: bool = True, clip_percentile: float = 0.5):
    """Write (or resume) a run directory for ``dataset`` and its report; returns (summary, report path)."""
    from ..viz.report import write_report
    from .runner import explain_dataset, package_versions, resolved_methods
    from .store import RunStore

    resolved = resolved_methods(methods, params, batch_size, seed)
    spec = {
        "model": model_spec(clf, model_source),
        "data": {"path": data_source, "images": len(dataset), "classes": dataset.classes},
        "target": target, "seed": seed, "batch_size": batch_size,
        "methods": resolved, "device": str(clf.device), "versions": package_versions(),
    }
    with RunStore(out) as store:
        previous = store.read_spec()
        if previous and (previous.get("model", {}).get("sha256") != spec["model"]["sha256"]
                         or previous.get("methods") != spec["methods"]):
            raise CounterlensError(f"{out} holds a run with another model or other method settings; "
                                   "pass a new --out directory (or delete the old one)")
        store.write_spec(spec)
        summary = explain_dataset(clf, dataset, store, methods=resolved, target=target,
                                  images_per_batch=images_per_batch, progress=progress)
    path = write_report(out, clip_percentile=clip_percentile) if report else None
    return summary, path
