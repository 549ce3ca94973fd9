"""Load a model, safely, into a :class:`~counterlens.model.Classifier`.

What :func:`load_model` accepts (``source``):

(a) a **model directory** holding ``model.json`` (a *model card*, below) and its weights file;
(b) a **state_dict** file (``.pt``, ``.pth``, ``.bin``, ``.ckpt``, ``.safetensors``) together with
    ``factory="package.module:function"`` (or ``"path/to/file.py:function"``, or a callable) that
    builds the network; read with ``torch.load(weights_only=True)`` or safetensors, loaded strictly;
(c) a **TorchScript** archive (``torch.jit.save``), recognised by its ``code/`` / ``constants.pkl``
    entries, not by its suffix;
(d) a **torch.export** program (``torch.export.save``, usually ``.pt2``), wrapped in
    :class:`ExportedModule` (:mod:`counterlens.exported_programs`). ``torch.export.load`` itself
    unpickles some entries with ``weights_only=False`` (pickled payloads, custom objects, sample
    inputs that fail a safe load), so an archive holding any of those needs ``trust_model_file=True`` too;
(e) a **fully pickled module** (``torch.save(model)``): unpickling can run any code hidden in the
    file, so it loads only with ``trust_model_file=True``; otherwise :class:`UntrustedModelError`;
(f) a **Keras 3** ``.keras`` or legacy ``.h5`` file (recognised by content; ``counterlens[keras]``),
    loaded with Keras' ``safe_mode`` (a Lambda layer's code needs ``trust_model_file=True``) and
    converted to native torch modules, or wrapped (:mod:`counterlens.keras_models`).

Nothing is ever unpickled with ``weights_only=False`` unless ``trust_model_file=True``.

The model card, ``MODEL_DIR/model.json``::

    {
      "format": "counterlens-model/1",
      "architecture": "brain-tumor-cnn",        # a name in counterlens.models.ARCHITECTURES, or
      "factory": "package.module:function",     # a factory (instead of "architecture")
      "kwargs": {"num_classes": 4, "input_size": [128, 128]},   # passed to the factory
      "classes": ["glioma", "meningioma", "no_tumor", "pituitary"],
      "preprocess": [{"normalize": {"mean": [0.5], "std": [0.5]}}] or null,
                                                 # as counterlens.model.preprocess_to_spec gives
      "in_channels": 1,
      "input_size": [128, 128],
      "value_range": [0, 1],                     # valid data-space values
      "output": "logits",                        # the head: logits | probabilities | sigmoid | multilabel
                                                 # (or auto: detected on the first forward pass)
      "weights": "weights.safetensors",          # or "weights.pt" (a state_dict), in MODEL_DIR
      "weights_sha256": "...",                   # checked on load
      "test_accuracy": 0.95 or null,
      "trained_on": "...",
      "created": "2024-01-01T00:00:00+00:00",
      "torch": "2.x",
      ...                                        # any extra metadata
    }

A card naming a ``factory`` imports and calls code, so it loads only when the caller passes a
``factory`` explicitly (CLI ``--factory``) or ``trust_model_file=True``; a card naming a built-in
``architecture`` needs neither.
"""
from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from .cards import CARD_FILE, FORMAT, _build, file_sha256, import_factory, read_model_card, save_model_card
from .errors import InputError, ModelLoadError, UntrustedModelError
from .exported_programs import SMALL_STATIC_BATCH, ExportedModule, _load_export  # noqa: F401  (re-exported)
from .keras_models import keras_file_kind, load_keras
from .model import Classifier, preprocess_from_spec
from .models import build_model

__all__ = ["FORMAT", "load_model", "save_model_card", "read_model_card", "file_sha256", "import_factory",
           "ExportedModule"]


def _load_card(card_dir: Path, factory, factory_kwargs, trust: bool):
    card = read_model_card(card_dir)
    card_path = card_dir / CARD_FILE
    weights = (card_dir / card["weights"]).resolve()
    if card_dir.resolve() not in weights.parents:
        raise ModelLoadError(f"{card_path}: weights {card['weights']!r} must be a file inside {card_dir}")
    if not weights.is_file():
        raise ModelLoadError(f"{card_path}: weights file {weights} does not exist")
    digest = file_sha256(weights)
    if card.get("weights_sha256") and card["weights_sha256"] != digest:
        raise ModelLoadError(f"{weights}: SHA-256 {digest} differs from weights_sha256 in {card_path}; "
                             "the file was changed or damaged since the card was written")
    kwargs = {**(card.get("kwargs") or {}), **(factory_kwargs or {})}
    if factory is not None:
        module = _build(factory, kwargs, str(card_path))
    elif "architecture" in card:
        try:
            module = build_model(card["architecture"], **kwargs)
        except InputError as exc:
            raise ModelLoadError(f"{card_path}: {exc}") from exc
    elif trust:
        module = _build(card["factory"], kwargs, str(card_path))
    else:
        raise UntrustedModelError(
            f"{card_path} names factory {card['factory']!r}; importing and calling it runs that code. "
            f"If you know it, pass --factory {card['factory']} (CLI) / factory={card['factory']!r}, "
            "or --trust-model-file / trust_model_file=True")
    _load_into(module, _read_weights(weights, trust)[0], weights)
    return module, card, digest


# -- file kinds ----------------------------------------------------------------------------------
def _sniff(path: Path) -> str:
    """'safetensors', 'torchscript', 'export' or 'torch' (torch.save output, zip or legacy pickle)."""
    if path.suffix.lower() == ".safetensors":
        return "safetensors"
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise ModelLoadError(f"{path}: damaged zip archive: {exc}") from exc
        tails = {n.split("/", 1)[-1] for n in names}
        if "constants.pkl" in tails or any(t.startswith("code/") for t in tails):
            return "torchscript"
        if ("archive_format" in tails or any(t.startswith("models/") for t in tails)
                or any("serialized_exported_program" in t for t in tails)):
            return "export"
    return "torch"


def _is_state_dict(obj) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


def _state_dict_from(obj):
    """A state_dict, or one inside a checkpoint dict ({'state_dict': ...}, {'model': ...}), or None."""
    if _is_state_dict(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model", "net", "network", "module", "weights"):
            if _is_state_dict(obj.get(key)):
                return dict(obj[key])
    return None


def _untrusted_message(path: Path, exc: Exception) -> str:
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # not a torch.save zip: a plain or legacy pickle
        found = []
    detail = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\s+Please use|\s+Check the documentation|$)",
                       " ".join(str(exc).split()))
    refs = f" (it refers to {', '.join(found[:5])}{', ...' if len(found) > 5 else ''})" if found else ""
    return (f"{path} is a full pickle, not a plain state_dict{refs}: loading it can run arbitrary code "
            "hidden in the file. If you trust its origin, pass --trust-model-file (CLI) / "
            "trust_model_file=True. Safer: save the weights with torch.save(model.state_dict(), "
            "'weights.pt') and load them with --factory package.module:function (factory=...), or "
            "export the model with torch.jit.script(model).save(...) or torch.export.save(...)."
            + (f" (torch: {detail.group(1)[:200]})" if detail else ""))


def _torch_load(path: Path, trust: bool):
    """``torch.load`` with ``weights_only=True``; a full pickle only when ``trust``."""
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as fh:
            if fh.read(1) != b"\x80":  # a legacy torch.save file is a pickle: PROTO opcode first
                raise ModelLoadError(f"{path}: not a PyTorch file (neither a zip archive nor a pickle: damaged, "
                                     "truncated or another format); "
                                     "expected a state_dict, TorchScript, torch.export or safetensors file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if not (isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in str(exc)):
            raise ModelLoadError(f"{path}: torch.load cannot read it: {exc}") from exc
        if not trust:
            raise UntrustedModelError(_untrusted_message(path, exc)) from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ModelLoadError(f"{path}: torch.load(weights_only=False) failed: {exc}") from exc


def _read_weights(path: Path, trust: bool) -> tuple[dict, nn.Module | None]:
    """The state_dict in ``path``, and the module too when it is a (trusted) full pickle."""
    if _sniff(path) == "safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device="cpu"), None
        except Exception as exc:
            raise ModelLoadError(f"{path}: not a readable safetensors file: {exc}") from exc
    obj = _torch_load(path, trust)
    if isinstance(obj, Mapping) and _state_dict_from(obj) is None:  # {"model": <module>, "epoch": 3}
        obj = next((v for v in obj.values() if isinstance(v, nn.Module)), obj)
    if isinstance(obj, nn.Module):
        return obj.state_dict(), obj
    state = _state_dict_from(obj)
    if state is None:
        raise ModelLoadError(f"{path}: holds a {type(obj).__name__}, neither a model nor a state_dict")
    return state, None


def _load_into(module: nn.Module, state: dict, path: Path) -> None:
    """``load_state_dict(strict=True)`` with a message listing missing / unexpected keys."""
    own = module.state_dict()
    for prefix in ("module.", "_orig_mod."):  # DataParallel / torch.compile wrappers
        if state and all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in own):
            state = {k[len(prefix):]: v for k, v in state.items()}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        def show(keys):
            return ", ".join(keys[:8]) + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "")
        parts = [f"missing keys: {show(missing)}" if missing else "",
                 f"unexpected keys: {show(unexpected)}" if unexpected else "",
                 f"shape mismatches: {show(shapes)}" if shapes else ""]
        raise ModelLoadError(f"{path}: the weights do not fit the model built by the factory; "
                             + "; ".join(p for p in parts if p)
                             + ". Check the factory and its kwargs (num_classes, in_channels, input_size)")
    try:
        module.load_state_dict(state, strict=True)
    except Exception as exc:
        raise ModelLoadError(f"{path}: load_state_dict failed: {exc}") from exc


# -- the entry point -----------------------------------------------------------------------------
def load_model(source, *, factory=None, factory_kwargs: Mapping | None = None, trust_model_file: bool = False,
               device="auto", classes: Sequence[str] | None = None, preprocess=None,
               in_channels: int | None = None, input_size: Sequence[int] | None = None,
               value_range: Sequence[float] | None = None, output: str | None = None,
               precision: str | None = None) -> Classifier:
    """Load ``source`` (a model directory or a model file, see the module doc) as a ``Classifier``.

    ``factory`` builds the network for a state_dict file (with ``factory_kwargs``); it overrides a
    card's architecture. ``classes``, ``preprocess`` (a module or its JSON spec), ``in_channels``,
    ``input_size``, ``value_range`` and ``output`` (the head, see :class:`Classifier`; default the
    card's, else ``"auto"``) override the card's; ``precision`` (``"bf16"`` / ``"fp16"``: autocast)
    as in :class:`Classifier`. The result has ``card`` (the card dict
    or None) and ``source_hash`` (SHA-256 of the weights / model file). Raises
    :class:`ModelLoadError` (:class:`UntrustedModelError` for code the caller did not allow).
    """
    path = Path(source)
    if not path.exists():
        raise ModelLoadError(f"model {source}: no such file or directory")
    card = None
    try:
        if path.is_dir() or path.name == CARD_FILE:
            card_dir = path if path.is_dir() else path.parent
            module, card, digest = _load_card(card_dir, factory, factory_kwargs, trust_model_file)
        else:
            digest = file_sha256(path)
            if keras_file_kind(path):      # .keras / .h5 (by content): converted to torch, or wrapped
                module, card = load_keras(path, trust_model_file, factory=factory)
            else:
                module = _load_file(path, factory, factory_kwargs, trust_model_file)
    except (ModelLoadError, InputError):
        raise
    except Exception as exc:  # anything torch raises on a damaged or foreign file
        raise ModelLoadError(f"{path}: cannot load the model: {exc}") from exc
    card = card or {}
    if isinstance(preprocess, list):
        preprocess = preprocess_from_spec(preprocess)
    elif preprocess is None and card.get("preprocess"):
        try:
            preprocess = preprocess_from_spec(card["preprocess"])
        except InputError as exc:
            raise ModelLoadError(f"{path}: preprocess in the model card: {exc}") from exc
    module.eval()
    clf = Classifier(module, preprocess=preprocess, device=device,
                     classes=classes if classes is not None else card.get("classes"),
                     in_channels=in_channels if in_channels is not None else card.get("in_channels"),
                     input_size=input_size if input_size is not None else card.get("input_size"),
                     value_range=value_range if value_range is not None else card.get("value_range"),
                     output=output if output is not None else (card.get("output") or "auto"), precision=precision)
    clf.card = card or None
    clf.source_hash = digest
    return clf


def _load_file(path: Path, factory, factory_kwargs, trust: bool) -> nn.Module:
    kind = _sniff(path)
    if kind in ("torchscript", "export"):
        if factory is not None:
            what = "a TorchScript archive" if kind == "torchscript" else "a torch.export program"
            raise ModelLoadError(f"{path} is {what} and holds its own architecture; drop factory / --factory")
        if kind == "torchscript":
            return torch.jit.load(str(path), map_location="cpu")
        return _load_export(path, trust)
    state, pickled = _read_weights(path, trust)
    if factory is None:
        if pickled is not None:
            return pickled
        raise ModelLoadError(f"{path} holds only weights (a state_dict); pass the code that builds the "
                             "network: --factory package.module:function (CLI) or "
                             "factory='package.module:function'")
    module = _build(factory, factory_kwargs or {}, str(path))
    _load_into(module, state, path)
    return module
