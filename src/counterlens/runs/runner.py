"""Dataset-scale runs: explain every image of a folder into a run directory, resumably."""
from __future__ import annotations

import platform
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..attribution.base import check_params, get_method, resolve_targets
from ..errors import CounterlensError
from .store import RunStore


@dataclass
class RunSummary:
    done: int
    skipped: int
    failed: int
    seconds: float


def package_versions() -> dict[str, str]:
    from importlib import metadata
    out = {"python": platform.python_version()}
    for pkg in ("counterlens", "torch", "numpy", "pydicom", "nibabel", "scikit-image"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def resolved_methods(methods, params: dict | None, batch_size: int, seed: int) -> dict[str, dict]:
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


def explain_dataset(clf, dataset, store: RunStore, *, methods: dict[str, dict], target="predicted",
                    images_per_batch: int = 16, progress: bool = True) -> RunSummary:
    """Explain every image of ``dataset`` (an :class:`~counterlens.data.images.ImageFolder`).

    ``methods``: ``{name: parameters}`` as :func:`resolved_methods` gives. Each image's
    prediction, probabilities, maps and per-image time per method are written to ``store`` as
    soon as its batch is done; images already complete in the store are skipped; a file that
    cannot be read is recorded as failed and the run goes on.
    """
    start = time.perf_counter()
    already = store.completed(list(methods))
    todo = [i for i, r in enumerate(dataset.records) if str(r.path) not in already]
    names = None
    done = failed = 0
    bar = tqdm(total=len(dataset), initial=len(dataset) - len(todo), desc="explaining", unit="img",
               disable=not progress)
    for chunk_start in range(0, len(todo), images_per_batch):
        loaded, images, masks, n_failed = _load_batch(dataset, todo[chunk_start:chunk_start + images_per_batch],
                                                      store, bar)
        failed += n_failed
        if not loaded:
            continue
        x = clf.as_input(torch.from_numpy(np.stack(images)))
        with torch.no_grad():
            logits = clf.logits(x)
        names = names or clf.class_names(logits.shape[1])
        probs = torch.softmax(logits, dim=1).cpu()
        tgt = resolve_targets(clf, x, target, logits=logits)
        maps, seconds = {}, {}
        for name, params in methods.items():
            t0 = time.perf_counter()
            maps[name] = get_method(name).function(clf, x, tgt, **params).detach().cpu().numpy()
            seconds[name] = (time.perf_counter() - t0) / len(loaded)
        for j, rec in enumerate(loaded):
            pred = int(probs[j].argmax())
            store.record_image(
                path=str(rec.path), name=_display_name(dataset, rec.path), label=rec.label, label_name=_name(names, rec.label),
                prediction=pred, prediction_name=names[pred], probs=probs[j].tolist(),
                image=images[j], mask=masks[j],
                attributions={m: (maps[m][j], int(tgt[j]), seconds[m]) for m in methods})
            done += 1
        bar.update(len(loaded))
    bar.close()
    return RunSummary(done=done, skipped=len(dataset) - len(todo), failed=failed,
                      seconds=time.perf_counter() - start)


def counterfactual_dataset(clf, dataset, store: RunStore, *, target="other", params: dict | None = None,
                           images_per_batch: int = 16, progress: bool = True, train=None) -> RunSummary:
    """Counterfactuals for every image of ``dataset``, written to ``store`` batch by batch.

    ``params`` go to :func:`counterlens.counterfactual.counterfactual`. The ``editable`` mask of
    each image is its mask from the dataset's masks folder when there is one. ``train``: optional
    ``(x_train, y_train)`` tensors; each counterfactual then records its L2 distance to the nearest
    training image of its target class. Images whose counterfactuals are already in the store are
    skipped; unreadable files are recorded as failed.
    """
    from ..metrics.counterfactual import nearest_training_distance
    from ..counterfactual import counterfactual
    start = time.perf_counter()
    done_paths = store.counterfactual_done()
    todo = [i for i, r in enumerate(dataset.records) if str(r.path) not in done_paths]
    done = failed = 0
    bar = tqdm(total=len(dataset), initial=len(dataset) - len(todo), desc="counterfactuals", unit="img",
               disable=not progress)
    for chunk_start in range(0, len(todo), images_per_batch):
        loaded, images, masks, n_failed = _load_batch(dataset, todo[chunk_start:chunk_start + images_per_batch],
                                                      store, bar)
        failed += n_failed
        if not loaded:
            continue
        x = torch.from_numpy(np.stack(images))
        kwargs = dict(params or {})
        if any(m is not None for m in masks) and "editable" not in kwargs:   # no mask: all editable
            kwargs["editable"] = torch.from_numpy(np.stack(
                [m if m is not None else np.ones(images[j].shape[1:], bool) for j, m in enumerate(masks)]))[:, None]
        t0 = time.perf_counter()
        result = counterfactual(clf, x, target, **kwargs)
        seconds = (time.perf_counter() - t0) / len(loaded)
        names = clf.class_names(result.probs_before.shape[1])
        nearest = nearest_training_distance(result.x, result.target, *train) if train is not None else None
        for j, rec in enumerate(loaded):
            probs = result.probs_before[j]
            pred = int(probs.argmax())
            image_id = store.record_image(
                path=str(rec.path), name=_display_name(dataset, rec.path), label=rec.label,
                label_name=_name(names, rec.label), prediction=pred, prediction_name=names[pred],
                probs=probs.tolist(), image=images[j], mask=masks[j])
            store.record_counterfactuals(image_id, [{
                "target": int(result.target[j]), "target_name": names[int(result.target[j])],
                "valid": bool(result.valid[j]), "reason": result.reason[j], "lam": float(result.lam[j]),
                "iterations": int(result.iterations[j]),
                "distance": {k: float(v[j]) for k, v in result.distance.items()},
                "probs_before": result.probs_before[j].tolist(), "probs_after": result.probs_after[j].tolist(),
                "seconds": seconds, "x": result.x[j].numpy(),
                "nearest_train_distance": None if nearest is None else float(nearest[j])}])
            done += 1
        bar.update(len(loaded))
    bar.close()
    return RunSummary(done=done, skipped=len(dataset) - len(todo), failed=failed,
                      seconds=time.perf_counter() - start)


def _load_batch(dataset, indices, store: RunStore, bar):
    """Load the images at ``indices``; a file that fails is recorded as failed (and counted)."""
    loaded, images, masks, failed = [], [], [], 0
    for i in indices:
        rec = dataset.records[i]
        try:
            image, _, mask = dataset.load(i)
        except CounterlensError as exc:
            store.record_image(path=str(rec.path), name=_display_name(dataset, rec.path), label=rec.label,
                               label_name=_name(dataset.classes, rec.label), status="failed", error=str(exc))
            failed += 1
            bar.update(1)
            continue
        loaded.append(rec)
        images.append(image)
        masks.append(mask)
    return loaded, images, masks, failed


def _display_name(dataset, path) -> str:
    """The path relative to the dataset root (``glioma/x.png``): unique, and short enough to show."""
    root = dataset.root if dataset.root.is_dir() else dataset.root.parent
    try:
        return str(path.relative_to(root))
    except ValueError:
        return path.name


def _name(classes, index):
    return None if index is None or classes is None else classes[index]
