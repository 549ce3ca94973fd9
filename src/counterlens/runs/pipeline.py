"""The per-batch stages of a dataset run, as pure functions of plain data.

``cases_of(folder)`` -> ``read_batch(cases, read)`` -> ``explain_batch`` / ``counterfactual_batch``
-> a list of :class:`~counterlens.runs.records.CaseResult` -> ``ShardWriter.write``.

Each stage takes and returns dataclasses of numbers, strings and numpy arrays (and the
classifier), holds no state between calls and touches no global, so an engine can call it in a
thread, a forked worker or a process on another machine (``pickle`` round-trips every input and
output). The local engine (:mod:`counterlens.runs.engines.local`) composes them; a cluster engine
calls the same functions.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..attribution.base import get_method, resolve_targets
from ..attribution.noise import case_keys
from ..errors import CounterlensError, InputError
from .records import Case, CaseResult, ReadBatch, text_of


def cases_of(folder) -> list[Case]:
    """The cases of an :class:`~counterlens.data.images.ImageFolder`, identified by their path
    relative to the folder's root (its parent for a single file)."""
    root = folder.root if folder.root.is_dir() else folder.root.parent
    out = []
    for rec in folder.records:
        try:
            rel = Path(rec.path).relative_to(root).as_posix()
        except ValueError:
            rel = Path(rec.path).name
        if rel == ".":                      # the data root is itself the case (a DICOM series folder)
            rel = Path(rec.path).name
        label_name = folder.classes[rec.label] if rec.label is not None and folder.classes else None
        out.append(Case(id=text_of(rel), file=str(rec.path), label=rec.label, label_name=label_name,
                        mask_file=str(rec.mask_path) if rec.mask_path is not None else None))
    return out


def read_batch(cases: list[Case], read: dict) -> ReadBatch:
    """Read ``cases`` with :func:`~counterlens.data.images.load_case` (``read``: its keyword
    arguments: channels, size, slice_index, window). A file that cannot be read is listed in
    ``failed`` with the reason; the others load."""
    from ..data.images import load_case
    batch = ReadBatch([], [], [], [])
    for case in cases:
        try:
            image, mask = load_case(case.file, case.mask_file, **read)
        except CounterlensError as exc:
            batch.failed.append((case, text_of(str(exc))))
            continue
        except (OSError, ValueError, MemoryError) as exc:      # a reader library's own error
            batch.failed.append((case, text_of(f"{case.file}: cannot be read ({type(exc).__name__}: {exc})")))
            continue
        if not np.isfinite(image).all():
            batch.failed.append((case, text_of(f"{case.file}: contains NaN or infinite values; fix or remove the file")))
            continue
        batch.cases.append(case)
        batch.images.append(image)
        batch.masks.append(mask)
    return batch


@dataclass
class Explained:
    """What :func:`explain_arrays` gives for ``B`` images."""

    probs: np.ndarray                       #: ``[B, K]`` softmax probabilities
    prediction: np.ndarray                  #: ``[B]`` int
    targets: np.ndarray                     #: ``[B]`` the class each map explains
    maps: dict[str, np.ndarray]             #: ``{method: [B, *S] float32}``
    seconds: dict[str, float] = field(default_factory=dict)   #: method wall time per image
    class_names: list[str] = field(default_factory=list)


def explain_arrays(clf, x: np.ndarray, methods: dict[str, dict], target="predicted", keys=None) -> Explained:
    """Probabilities and every method's maps for images ``x [B, C, *S]`` (one shape).

    ``methods``: ``{name: full parameters}`` (as :func:`~counterlens.runs.spec.resolved_methods`
    gives). ``keys``: one identity per image (the case ids); random methods then draw each
    image's randomness from its identity, so its maps are the same in any batch, on any worker.
    The one function every engine calls to explain.
    """
    xt = clf.as_input(torch.from_numpy(np.ascontiguousarray(x)))
    with torch.no_grad():
        try:
            logits = clf.logits(xt)
        except (RuntimeError, AssertionError) as exc:     # the model: channels or size (exported: "Guard failed")
            raise InputError(
                f"the model cannot run on these images: it was given a batch of shape {tuple(xt.shape)} (images "
                f"[channels, *size] as read{', resized to ' + str(list(clf.input_size)) if clf.input_size else ''}) "
                f"and said: {str(exc).splitlines()[0]}. If it expects other channels or another size, describe it "
                "with a model card (model.json: in_channels, input_size) or pass images of that shape") from exc
    names = clf.class_names(logits.shape[1])
    probs = torch.softmax(logits.float(), dim=1).cpu()
    tgt = resolve_targets(clf, xt, target, logits=logits)
    maps, seconds = {}, {}
    with case_keys(keys):
        for name, params in methods.items():
            t0 = time.perf_counter()
            maps[name] = get_method(name).function(clf, xt, tgt, **params).detach().float().cpu().numpy()
            seconds[name] = (time.perf_counter() - t0) / len(x)
    return Explained(probs=probs.numpy(), prediction=probs.argmax(1).numpy(), targets=tgt.cpu().numpy(),
                     maps=maps, seconds=seconds, class_names=names)


def _groups(batch: ReadBatch) -> list[list[int]]:
    """Indices of the batch's images grouped by shape (a model call takes one shape)."""
    by_shape: dict[tuple, list[int]] = {}
    for i, image in enumerate(batch.images):
        by_shape.setdefault(tuple(image.shape), []).append(i)
    return list(by_shape.values())


def explain_batch(clf, batch: ReadBatch, methods: dict[str, dict], target="predicted") -> list[CaseResult]:
    """Explain the images of ``batch``: one :class:`CaseResult` per case, failures included."""
    results = [CaseResult.failure(case, error) for case, error in batch.failed]
    for idx in _groups(batch):
        out = explain_arrays(clf, np.stack([batch.images[i] for i in idx]), methods, target,
                             keys=[batch.cases[i].id for i in idx])
        for j, i in enumerate(idx):
            pred = int(out.prediction[j])
            results.append(CaseResult(
                case=batch.cases[i], prediction=pred, prediction_name=out.class_names[pred],
                probs=out.probs[j].tolist(), image=batch.images[i], mask=batch.masks[i],
                maps={m: out.maps[m][j] for m in methods}, targets={m: int(out.targets[j]) for m in methods},
                seconds=dict(out.seconds)))
    return results


def counterfactual_batch(clf, batch: ReadBatch, target="other", params: dict | None = None,
                         train: tuple | None = None) -> list[CaseResult]:
    """Counterfactuals of the images of ``batch`` (one per case), failures included.

    ``params`` go to :func:`counterlens.counterfactual.counterfactual`; a case's mask, when it has
    one, is its ``editable`` region (no mask: everything editable). ``train``: optional
    ``(x_train, y_train)``; each counterfactual then records its L2 distance to the nearest
    training image of its target class.
    """
    from ..counterfactual import counterfactual
    from ..metrics.counterfactual import nearest_training_distance
    results = [CaseResult.failure(case, error) for case, error in batch.failed]
    for idx in _groups(batch):
        x = torch.from_numpy(np.stack([batch.images[i] for i in idx]))
        kwargs = dict(params or {})
        masks = [batch.masks[i] for i in idx]
        if any(m is not None for m in masks) and "editable" not in kwargs:
            kwargs["editable"] = torch.from_numpy(np.stack(
                [m if m is not None else np.ones(x.shape[2:], bool) for m in masks]))[:, None]
        t0 = time.perf_counter()
        res = counterfactual(clf, x, target, **kwargs)
        seconds = (time.perf_counter() - t0) / len(idx)
        names = clf.class_names(res.probs_before.shape[1])
        nearest = nearest_training_distance(res.x, res.target, *train) if train is not None else None
        for j, i in enumerate(idx):
            probs = res.probs_before[j]
            pred, t = int(probs.argmax()), int(res.target[j])
            results.append(CaseResult(
                case=batch.cases[i], prediction=pred, prediction_name=names[pred], probs=probs.tolist(),
                image=batch.images[i], mask=batch.masks[i],
                counterfactual={
                    "target": t, "target_name": names[t], "valid": bool(res.valid[j]), "reason": res.reason[j],
                    "lam": float(res.lam[j]), "iterations": int(res.iterations[j]),
                    "distance": {k: float(v[j]) for k, v in res.distance.items()},
                    "probs_before": res.probs_before[j].tolist(), "probs_after": res.probs_after[j].tolist(),
                    "seconds": seconds, "x": res.x[j].numpy(),
                    "nearest_train_distance": None if nearest is None else float(nearest[j])}))
    return results


def score_arrays(clf, x: np.ndarray, maps: np.ndarray, targets: np.ndarray, masks: np.ndarray | None,
                 metrics: list[str], options, method: str = "", method_params: dict | None = None, keys=None):
    """Trust metrics of one method's maps ``[B, *S]`` for images ``x [B, C, *S]``:
    ``({metric: [B] float}, {curve kind: Curve})`` (see :mod:`counterlens.metrics.evaluate`).
    ``keys``: the case ids, as in :func:`explain_arrays`."""
    from ..metrics.evaluate import method_metrics
    with case_keys(keys):
        values, curves, _ = method_metrics(
            clf, torch.from_numpy(x), torch.from_numpy(maps), torch.as_tensor(targets),
            torch.from_numpy(masks) if masks is not None else None, metrics, options, method, method_params)
    return {k: v.detach().cpu().numpy().astype(float) for k, v in values.items()}, curves
