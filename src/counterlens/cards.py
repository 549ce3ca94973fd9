"""Model cards (``MODEL_DIR/model.json`` + weights) and the factories that rebuild a network.

The card format is described in :mod:`counterlens.loading`.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from .errors import InputError, ModelLoadError
from .heads import check_output
from .model import Classifier, preprocess_to_spec
from .models import ARCHITECTURES

FORMAT = "counterlens-model/1"
CARD_FILE = "model.json"
_RESERVED = {"format", "architecture", "factory", "kwargs", "weights", "weights_sha256", "output"}

def file_sha256(path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# -- factories -----------------------------------------------------------------------------------
def import_factory(factory) -> Callable[..., nn.Module]:
    """``"package.module:function"``, ``"path/to/file.py:function"`` or a callable -> the callable."""
    if callable(factory):
        return factory
    if not isinstance(factory, str) or ":" not in factory:
        raise InputError(f"factory={factory!r}: expected 'package.module:function' (e.g. 'mypkg.nets:build')")
    target, _, attr = factory.rpartition(":")
    try:
        if target.endswith(".py"):
            if not Path(target).is_file():
                raise ModelLoadError(f"factory={factory!r}: file {target} does not exist")
            spec = importlib.util.spec_from_file_location(f"_counterlens_factory_{Path(target).stem}", target)
            obj = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(obj)
        else:
            obj = importlib.import_module(target)
    except ModuleNotFoundError as exc:
        raise ModelLoadError(f"factory={factory!r}: cannot import {target!r} ({exc}); install it, add its "
                             "folder to PYTHONPATH, or pass 'path/to/file.py:function'") from exc
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"factory={factory!r}: importing {target!r} failed: {exc}") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelLoadError(f"factory={factory!r}: {target!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelLoadError(f"factory={factory!r}: {attr!r} is not callable")
    return obj


def _factory_name(factory) -> str:
    if isinstance(factory, str):
        import_factory(factory)  # fail now, not when the card is loaded
        return factory
    name = f"{factory.__module__}:{factory.__qualname__}"
    if factory.__module__ == "__main__" or "<locals>" in factory.__qualname__:
        warnings.warn(f"factory {name} is not importable from elsewhere; the card will load only with "
                      "factory=<the callable> passed explicitly. Define it in a module.", stacklevel=3)
    return name


def _build(factory, kwargs: Mapping, where: str) -> nn.Module:
    fn = import_factory(factory)
    try:
        module = fn(**kwargs)
    except Exception as exc:
        raise ModelLoadError(f"{where}: factory {factory!r} failed with kwargs {dict(kwargs)}: {exc}") from exc
    if not isinstance(module, nn.Module):
        raise ModelLoadError(f"{where}: factory {factory!r} returned {type(module).__name__}, not an nn.Module")
    return module


# -- model cards ---------------------------------------------------------------------------------
def _write_atomic(path: Path, write: Callable[[str], None]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    os.replace(tmp, path)


def save_model_card(module: nn.Module, out_dir, *, architecture: str | None = None, factory=None,
                    kwargs: Mapping | None = None, classes: Sequence[str], preprocess=None,
                    in_channels: int | None = None, input_size: Sequence[int] | int | None = None,
                    value_range: Sequence[float] | None = (0, 1), output: str | None = None,
                    extra: Mapping | None = None) -> Path:
    """Write ``out_dir/weights.safetensors`` (the state_dict) and ``out_dir/model.json``.

    ``architecture`` (a key of ``ARCHITECTURES``) or ``factory`` (``"package.module:function"`` or an
    importable callable) says how to rebuild the network with ``kwargs``. ``preprocess`` is a
    module built from ``Normalize`` / ``RepeatChannels``, its JSON spec, or None. ``in_channels``
    and ``input_size`` default to ``kwargs``' values. ``output`` is the head (``"logits"``,
    ``"probabilities"``, ``"sigmoid"``, ``"multilabel"``; see :class:`~counterlens.model.Classifier`);
    None: detected from the module on a probe of zeros when ``in_channels`` and ``input_size`` are
    known, else ``"auto"`` (detected again on load). ``extra`` adds metadata (e.g.
    ``test_accuracy``, ``trained_on``). Returns ``out_dir``.
    """
    if (architecture is None) == (factory is None):
        raise InputError("save_model_card: pass exactly one of architecture=<one of "
                         f"{', '.join(sorted(ARCHITECTURES))}> or factory='package.module:function'")
    if architecture is not None and architecture not in ARCHITECTURES:
        raise InputError(f"save_model_card: unknown architecture {architecture!r}; known: "
                         f"{', '.join(sorted(ARCHITECTURES))}")
    kwargs = dict(kwargs or {})
    in_channels = kwargs.get("in_channels") if in_channels is None else in_channels
    input_size = kwargs.get("input_size") if input_size is None else input_size
    if isinstance(input_size, int):
        input_size = (input_size, input_size)
    spec = preprocess if isinstance(preprocess, list) or preprocess is None else preprocess_to_spec(preprocess)
    output = check_output(output) if output is not None else _detect_output(module, in_channels, input_size)
    bad = _RESERVED.intersection(extra or {})
    if bad:
        raise InputError(f"save_model_card: extra may not set {sorted(bad)}; they are written by the card itself")
    card = {
        "format": FORMAT,
        **({"architecture": architecture} if architecture is not None else {"factory": _factory_name(factory)}),
        "kwargs": kwargs,
        "classes": [str(c) for c in classes],
        "preprocess": spec,
        "in_channels": int(in_channels) if in_channels is not None else None,
        "input_size": [int(s) for s in input_size] if input_size is not None else None,
        "value_range": [float(v) for v in value_range] if value_range is not None else None,
        "output": output,
        "weights": "weights.safetensors",
        "weights_sha256": None,
        "test_accuracy": None,
        "trained_on": None,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        **dict(extra or {}),
    }
    try:
        text = json.dumps(card, indent=2)
    except TypeError as exc:
        raise InputError(f"save_model_card: kwargs/extra must be JSON values (numbers, strings, lists): "
                         f"{exc}") from exc
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # clone: safetensors refuses shared storage (tied weights); contiguous CPU copies are portable
    state = {k: v.detach().to("cpu").clone().contiguous() for k, v in module.state_dict().items()}
    weights = out / card["weights"]
    _write_atomic(weights, lambda p: save_file(state, p, metadata={"format": "pt"}))
    card["weights_sha256"] = file_sha256(weights)
    text = json.dumps(card, indent=2)
    _write_atomic(out / CARD_FILE, lambda p: Path(p).write_text(text + "\n", encoding="utf-8"))
    return out


def _detect_output(module: nn.Module, in_channels, input_size) -> str:
    """The head of ``module`` from a probe of zeros (``"auto"`` when the input shape is unknown)."""
    if not in_channels or not input_size:
        return "auto"
    tensor = next(iter(module.parameters()), None)
    device = tensor.device if tensor is not None else "cpu"
    return Classifier(module, device=device, in_channels=in_channels, input_size=input_size).output


def read_model_card(model_dir) -> dict:
    """Read and check ``model_dir/model.json`` (``model_dir`` may also be the JSON file itself)."""
    path = Path(model_dir)
    path = path / CARD_FILE if path.is_dir() else path
    if not path.is_file():
        raise ModelLoadError(f"{path}: no model card here; a model directory needs {CARD_FILE} "
                             "(write one with counterlens.loading.save_model_card)")
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: not a readable JSON model card: {exc}") from exc
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        found = card.get("format") if isinstance(card, dict) else type(card).__name__
        raise ModelLoadError(f"{path}: format is {found!r}, expected {FORMAT!r}")
    if ("architecture" in card) == ("factory" in card):
        raise ModelLoadError(f"{path}: needs exactly one of 'architecture' or 'factory'")
    for key in ("weights", "classes"):
        if not card.get(key):
            raise ModelLoadError(f"{path}: missing {key!r}")
    try:
        check_output(card.get("output") or "auto")
    except InputError as exc:
        raise ModelLoadError(f"{path}: 'output': {exc}") from exc
    return card
