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

from ..attribution.base import expand_targets, get_method, is_out_of_memory, resolve_targets
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
        findings = getattr(rec, "findings", None)
        per_finding = getattr(rec, "finding_masks", None)
        out.append(Case(id=text_of(rel), file=str(rec.path), label=rec.label, label_name=label_name,
                        mask_file=str(rec.mask_path) if rec.mask_path is not None else None,
                        findings=tuple(int(v) for v in findings) if findings is not None else None,
                        finding_masks=tuple(str(per_finding[c]) if c in per_finding else None for c in folder.classes)
                        if per_finding else None))
    return out


def _finding_masks(case: Case, shape: tuple[int, ...]) -> np.ndarray:
    """bool ``[K, *shape]``: the case's mask of each finding, resized to the image (empty where none)."""
    from ..data.images import load_mask
    return np.stack([load_mask(f, size=shape) if f is not None else np.zeros(shape, bool)
                     for f in case.finding_masks])


def read_batch(cases: list[Case], read: dict) -> ReadBatch:
    """Read ``cases`` with :func:`~counterlens.data.images.load_case` (``read``: its keyword
    arguments: channels, size, slice_index, window). A file that cannot be read is listed in
    ``failed`` with the reason; the others load."""
    from ..data.images import load_case
    batch = ReadBatch([], [], [], [])
    for case in cases:
        try:
            image, mask = load_case(case.file, case.mask_file, **read)
            if case.finding_masks is not None:
                mask = _finding_masks(case, tuple(image.shape[1:]))
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

    probs: np.ndarray                       #: ``[B, K]`` softmax probabilities (multi-label: per-finding sigmoids)
    prediction: np.ndarray                  #: ``[B]`` int
    targets: np.ndarray                     #: ``[B]`` the class each map explains (``[M]`` with ``rows``)
    maps: dict[str, np.ndarray]             #: ``{method: [B, *S] float32}`` (``[M, *S]`` with ``rows``)
    seconds: dict[str, float] = field(default_factory=dict)   #: method wall time per image
    class_names: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)     #: ``{method: reason}``: could not run on this model
    rows: np.ndarray | None = None          #: ``[M]`` the image of each map (``all-positive``); None: one map per image


def all_positive(target) -> bool:
    """Whether ``target`` asks for one map per image and positive finding (multi-label)."""
    return isinstance(target, str) and target.lower() in ("all-positive", "all_positive")


def explain_arrays(clf, x: np.ndarray, methods: dict[str, dict], target="predicted", keys=None,
                   threshold: float = 0.5, on_method=None) -> Explained:
    """Probabilities and every method's maps for images ``x [B, C, *S]`` (one shape).

    ``methods``: ``{name: full parameters}`` (as :func:`~counterlens.runs.spec.resolved_methods`
    gives). ``keys``: one identity per image (the case ids); random methods then draw each
    image's randomness from its identity, so its maps are the same in any batch, on any worker.
    A method that cannot run on this model (a CAM without a feature map, a gradient method on a
    model without autograd, ...) is skipped with its reason in ``skipped``; the others' maps are
    kept: one method never aborts a run. The one function every engine calls to explain.
    ``target="all-positive"`` (multi-label models): one map per image and finding whose probability
    is at least ``threshold``; ``rows`` then says which image each map is of. ``on_method``: called
    with the number of images after each method (run or skipped), for a progress bar that moves
    within a batch.
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
    probs = (clf.probs_of(logits.float()) if hasattr(clf, "probs_of") else torch.softmax(logits.float(), 1)).cpu()
    rows = None
    if all_positive(target):                   # a pair per image and positive finding
        rows, tgt = expand_targets(clf, xt, target, threshold=threshold)
        xt, keys = xt[rows], [keys[r] for r in rows.tolist()] if keys is not None else None
    else:
        tgt = resolve_targets(clf, xt, target, logits=logits)
    maps, seconds, skipped = {}, {}, {}
    with case_keys(keys):
        for name, params in methods.items():
            t0 = time.perf_counter()
            if not len(xt):                    # no image of the batch has a positive finding
                maps[name], seconds[name] = np.zeros((0, *x.shape[2:]), np.float32), 0.0
                continue
            try:
                maps[name] = get_method(name).function(clf, xt, tgt, **params).detach().float().cpu().numpy()
            except (CounterlensError, RuntimeError, NotImplementedError) as exc:   # this method on this model
                if isinstance(exc, RuntimeError) and is_out_of_memory(exc):
                    raise
                skipped[name] = text_of(f"{name} cannot run on this model: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
            else:
                seconds[name] = (time.perf_counter() - t0) / len(x)
            if on_method is not None:
                on_method(len(x))
    return Explained(probs=probs.numpy(), prediction=probs.argmax(1).numpy(), targets=tgt.cpu().numpy(),
                     maps=maps, seconds=seconds, class_names=names, skipped=skipped,
                     rows=rows.cpu().numpy() if rows is not None else None)


def _groups(batch: ReadBatch) -> list[list[int]]:
    """Indices of the batch's images grouped by shape (a model call takes one shape)."""
    by_shape: dict[tuple, list[int]] = {}
    for i, image in enumerate(batch.images):
        by_shape.setdefault(tuple(image.shape), []).append(i)
    return list(by_shape.values())


def explain_batch(clf, batch: ReadBatch, methods: dict[str, dict], target="predicted",
                  threshold: float = 0.5, on_method=None) -> list[CaseResult]:
    """Explain the images of ``batch``: one :class:`CaseResult` per case, failures included.
    ``target="all-positive"``: each case's maps are ``[T, *S]``, one per positive finding (``T``
    may be 0: the case records that it had none)."""
    results = [CaseResult.failure(case, error) for case, error in batch.failed]
    for idx in _groups(batch):
        out = explain_arrays(clf, np.stack([batch.images[i] for i in idx]), methods, target,
                             keys=[batch.cases[i].id for i in idx], threshold=threshold, on_method=on_method)
        for j, i in enumerate(idx):
            pred = int(out.prediction[j])
            if out.rows is None:
                maps = {m: out.maps[m][j] for m in methods if m in out.maps}
                targets, explained = {m: int(out.targets[j]) for m in maps}, None
            else:
                mine = out.rows == j
                explained = [int(t) for t in out.targets[mine]]
                maps = {m: out.maps[m][mine] for m in methods if m in out.maps}
                targets = {m: list(explained) for m in maps}
            results.append(CaseResult(
                case=batch.cases[i], prediction=pred, prediction_name=out.class_names[pred],
                probs=out.probs[j].tolist(), image=batch.images[i], mask=batch.masks[i], maps=maps, targets=targets,
                explained=explained, seconds=dict(out.seconds), skipped=dict(out.skipped)))
    return results


def counterfactual_batch(clf, batch: ReadBatch, target="other", params: dict | None = None,
                         train: tuple | None = None, activations: bool = True) -> list[CaseResult]:
    """Counterfactuals of the images of ``batch`` (one per case), failures included.

    ``params`` go to :func:`counterlens.counterfactual.counterfactual`; a case's mask, when it has
    one, is its ``editable`` region (no mask: everything editable). ``train``: optional
    ``(x_train, y_train)``; each counterfactual then records its L2 distance to the nearest
    training image of its target class. ``activations``: also record each case's layer activation
    change between original and counterfactual (:mod:`counterlens.runs.activations`: one more
    forward pass of both per batch).
    """
    from ..counterfactual import counterfactual
    from .activations import case_activation_changes
    from ..metrics.counterfactual import nearest_training_distance
    results = [CaseResult.failure(case, error) for case, error in batch.failed]
    for idx in _groups(batch):
        x = torch.from_numpy(np.stack([batch.images[i] for i in idx]))
        kwargs = dict(params or {})
        masks = [batch.masks[i] if batch.masks[i] is None or batch.masks[i].ndim == x.dim() - 2 else None
                 for i in idx]                   # a mask per finding (ground truth) is no editable region
        if any(m is not None for m in masks) and "editable" not in kwargs:
            kwargs["editable"] = torch.from_numpy(np.stack(
                [m if m is not None else np.ones(x.shape[2:], bool) for m in masks]))[:, None]
        t0 = time.perf_counter()
        res = counterfactual(clf, x, target, **kwargs)
        seconds = (time.perf_counter() - t0) / len(idx)
        names = clf.class_names(res.probs_before.shape[1])
        editable = None if kwargs.get("editable") is None else (      # [b, *S] bool: the region each search had
            torch.as_tensor(kwargs["editable"]).bool().expand(len(idx), 1, *x.shape[2:])[:, 0].numpy())
        nearest = nearest_training_distance(res.x, res.target, *train) if train is not None else None
        chunk = kwargs.get("batch_size")                # a number, or "auto" / None (the search's own choice)
        layer_changes = (case_activation_changes(clf, x, res.x, batch_size=chunk if isinstance(chunk, int) else 64)
                         if activations else [None] * len(idx))
        for j, i in enumerate(idx):
            probs = res.probs_before[j]
            pred, t = int(probs.argmax()), int(res.target[j])
            # multi-label: the finding and the state it was switched to; probs are every finding's sigmoid
            state = f":{'on' if bool(res.target_on[j]) else 'off'}" if getattr(res, "multilabel", False) else ""
            results.append(CaseResult(
                case=batch.cases[i], prediction=pred, prediction_name=names[pred], probs=probs.tolist(),
                image=batch.images[i], mask=batch.masks[i],
                counterfactual={
                    "target": t, "target_name": names[t] + state, "valid": bool(res.valid[j]), "reason": res.reason[j],
                    "lam": float(res.lam[j]), "iterations": int(res.iterations[j]),
                    "distance": {k: float(v[j]) for k, v in res.distance.items()},
                    "probs_before": res.probs_before[j].tolist(), "probs_after": res.probs_after[j].tolist(),
                    "seconds": seconds, "x": res.x[j].numpy(),
                    "editable": None if editable is None else editable[j], "activations": layer_changes[j],
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
