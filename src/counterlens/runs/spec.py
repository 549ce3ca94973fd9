"""What ``run.yaml`` says about a run: resolved method parameters and package versions."""
from __future__ import annotations

import platform

from ..attribution.base import check_params, get_method
from ..errors import CounterlensError


def package_versions() -> dict[str, str]:
    from importlib import metadata
    out = {"python": platform.python_version()}
    for pkg in ("counterlens", "torch", "numpy", "pydicom", "nibabel", "scikit-image"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def resolved_methods(methods, params: dict | None, batch_size, seed: int) -> dict[str, dict]:
    """``{method: full parameters}``: the user's values on top of each method's defaults."""
    params = params or {}
    unknown = set(params) - {get_method(m).name for m in methods}
    if unknown:
        raise CounterlensError(f"parameters given for {sorted(unknown)}, which are not among the methods {list(methods)}")
    out = {}
    for m in methods:
        info = get_method(m)
        values = info.defaults()
        values.update(check_params(info, dict(params.get(info.name, {}))))
        if "batch_size" in values:
            values["batch_size"] = params.get(info.name, {}).get("batch_size", batch_size)
        if "seed" in values:
            values["seed"] = params.get(info.name, {}).get("seed", seed)
        out[info.name] = values
    return out


def model_spec(clf, source: str) -> dict:
    """How ``run.yaml`` describes the model: source, SHA-256, classes, sizes, preprocessing."""
    card = getattr(clf, "card", None) or {}
    file_hash = getattr(clf, "source_hash", None)
    import copy
    overrides = copy.deepcopy(dict(getattr(clf, "overrides", None) or {}))    # --size, --channels, --value-range, --preprocess
    return {"source": str(source), "sha256": file_hash,
            "weights_sha256": None if file_hash else weights_hash(clf.module),
            "description": card.get("architecture") or card.get("factory") or type(clf.module).__name__,
            "classes": clf.classes, "in_channels": clf.in_channels,
            "input_size": list(clf.input_size) if clf.input_size else None,
            "value_range": list(clf.value_range) if clf.value_range else None,
            "preprocess": copy.deepcopy(overrides.get("preprocess", card.get("preprocess"))), "overrides": overrides or None,
            "logits_output": getattr(clf, "logits_output", None), "output": getattr(clf, "output", None),
            "precision": getattr(clf, "precision", None),
            "test_accuracy": card.get("test_accuracy")}


def weights_hash(module) -> str | None:
    """SHA-256 over a module's parameters and buffers (names, shapes, bytes): identifies an
    in-memory model that has no file, so a run directory can tell it from another one."""
    import hashlib

    import torch
    if not isinstance(module, torch.nn.Module):
        return None
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        if isinstance(t, torch.Tensor):
            t = t.detach().cpu().contiguous()
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
