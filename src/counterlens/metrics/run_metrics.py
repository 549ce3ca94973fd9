"""Score the maps of a run directory: :func:`evaluate_run` (the ``counterlens evaluate`` command calls it).

See :mod:`counterlens.metrics.evaluate` for the table format and the metrics; this module reads a
run directory, calls :func:`~counterlens.metrics.evaluate.evaluate` batch by batch and writes the
``metrics`` table of ``results.sqlite``, ``metrics.csv``, ``metrics_summary.csv``, ``curves.json``
and ``sanity.json`` into it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..errors import InputError
from .evaluate import (
    METRICS,
    Options,
    add_class_columns,
    curve_means,
    method_metrics,
    resolve_metrics,
    summary_table,
)

# -- a run directory ------------------------------------------------------------------------------
METRICS_TABLE = ("CREATE TABLE IF NOT EXISTS metrics (image_id INTEGER, method TEXT, metric TEXT, value REAL, "
                 "PRIMARY KEY (image_id, method, metric))")


def _load_image(store, row: dict, clf) -> np.ndarray:
    if row.get("image_file"):
        return store.load_array(row["image_file"])
    from ..data.images import load_image
    channels = 1 if (clf.in_channels or 1) == 1 else clf.in_channels
    return load_image(row["path"], channels=channels, size=clf.input_size)


def _load_mask(store, row: dict, shape, mask_paths: dict | None) -> np.ndarray | None:
    if mask_paths is not None:
        from ..data.images import load_mask
        path = mask_paths.get(Path(row["path"]))
        return None if path is None else load_mask(path, size=tuple(shape))
    return store.load_array(row["mask_file"]) > 0.5 if row.get("mask_file") else None


def _mask_paths(masks_dir, rows: list[dict], spec: dict) -> dict | None:
    """``{image path: mask path}`` matched by file stem, as ``counterlens explain --masks`` does."""
    if masks_dir is None:
        return None
    from ..data.images import ImageFolder
    folder = Path(masks_dir)
    if not folder.is_dir():
        raise InputError(f"masks_dir={str(folder)!r} is not a folder; pass the folder of masks (matched by file stem)")
    base = Path((spec.get("data") or {}).get("path") or Path(rows[0]["path"]).parent)
    found = ImageFolder._match_masks(folder, [Path(r["path"]) for r in rows], base)
    if not found:
        raise InputError(f"no mask in {folder} matches an image of the run by file stem (e.g. "
                         f"{Path(rows[0]['path']).stem}.png); pass the folder that holds them")
    return found


def _cases(store, rows: list[dict], clf, mask_paths):
    """Load ``rows``: ``[(row, image [C, *S], mask [*S] | None, {method: (map, target)})]``."""
    out = []
    for row in rows:
        image = _load_image(store, row, clf)
        maps = {m: (store.load_array(a["array_file"]), int(a["target"]))
                for m, a in store.attributions(row["id"]).items()}
        out.append((row, image, _load_mask(store, row, image.shape[1:], mask_paths), maps))
    return out


def evaluate_run(run_dir, clf, masks_dir=None, metrics=None, *, batch_size: int = 64, seed: int = 0,
                 steps: int = 20, baseline="blur", n_subsets: int = 32, images_per_batch: int = 32,
                 sanity: bool = True, sanity_images: int = 8, sanity_methods=None,
                 progress: bool = False) -> pd.DataFrame:
    """Score the maps stored in a run directory and write the results next to them.

    ``clf`` is the run's model (faithfulness and sanity evaluate it). Images come from the run's
    ``image_file`` arrays (else reloaded from their path); masks from ``masks_dir`` (matched to the
    images by file stem) or else the run's own ``mask_file``. Every stored map is scored for the
    target it was made for. Writes, in ``run_dir``:

    * table ``metrics`` of ``results.sqlite`` (image_id, method, metric, value), in one transaction,
      replacing earlier rows of the same methods and metrics;
    * ``metrics.csv``: the long table (``image_id``, ``name``, ``method``, ``metric``, ``value``, target,
      predicted, label and their names, ``correct``);
    * ``metrics_summary.csv``: :func:`summary_table`;
    * ``curves.json``: ``{method: {"deletion": {"x", "y", "n"}, "insertion": ..., "deletion_lerf": ...}}``,
      means over images;
    * ``sanity.json`` (``sanity=True``): ``{method: SanityResult.to_json()}`` from
      :func:`~counterlens.metrics.sanity.model_randomisation` on the first ``sanity_images`` images,
      for the run's methods in ``sanity_methods`` (None: all; each costs a run of the method per
      randomised layer, so the sampling methods are the expensive ones).

    ``images_per_batch`` images are loaded and scored together (all their (image, step) rows go
    through the evaluator in chunks of ``batch_size``); ``steps``, ``baseline``, ``n_subsets``,
    ``seed`` as in :func:`evaluate`. Returns the long DataFrame (``attrs["curves"]``, ``attrs["sanity"]``).
    """
    from tqdm.auto import tqdm

    from ..runs.store import RunStore
    run_dir = Path(run_dir)
    with RunStore(run_dir, create=False) as store:
        spec = store.read_spec()
        params = spec.get("methods") or {}
        rows = [r for r in store.images() if r["status"] == "done"]
        if not rows:
            raise InputError(f"{run_dir} holds no explained images; run `counterlens explain ... --out {run_dir}` first")
        if not store.db.execute("SELECT 1 FROM attributions LIMIT 1").fetchone():
            raise InputError(f"{run_dir} holds no attribution maps to score; run `counterlens explain ... --out {run_dir}`")
        mask_paths = _mask_paths(masks_dir, rows, spec)
        names = resolve_metrics(metrics, mask_paths is not None or any(r.get("mask_file") for r in rows))
        has_masks = any(METRICS[n].needs_masks for n in names)
        opts = Options(steps, baseline, n_subsets, batch_size, seed)
        records, targets, parts = [], {}, {}
        for start in tqdm(range(0, len(rows), images_per_batch), desc="evaluating", disable=not progress):
            cases = _cases(store, rows[start:start + images_per_batch], clf, mask_paths)
            for shape in dict.fromkeys(c[1].shape for c in cases):
                group = [c for c in cases if c[1].shape == shape]
                for method in dict.fromkeys(m for c in group for m in c[3]):
                    have = [c for c in group if method in c[3]]
                    x = torch.from_numpy(np.stack([c[1] for c in have]))
                    maps = torch.from_numpy(np.stack([c[3][method][0] for c in have]))
                    tgt = torch.tensor([c[3][method][1] for c in have])
                    masks = (torch.from_numpy(np.stack([c[2] if c[2] is not None else np.zeros(shape[1:], bool)
                                                        for c in have])) if has_masks else None)
                    values, curves, _ = method_metrics(clf, x, maps, tgt, masks, names, opts, method, params.get(method))
                    for kind, curve in curves.items():
                        parts.setdefault(method, {}).setdefault(kind, []).append(curve)
                    for j, c in enumerate(have):
                        targets[(c[0]["id"], method)] = int(tgt[j])
                        records += [(c[0]["id"], method, metric, float(v[j])) for metric, v in values.items()]
        sanity_out = _run_sanity(store, rows, clf, params, batch_size, seed, sanity_images,
                                 sanity_methods) if sanity else None
        df = _run_table(records, targets, rows, clf.classes or (spec.get("model") or {}).get("classes"))
        with store.db:
            store.db.execute(METRICS_TABLE)
            store.db.executemany("DELETE FROM metrics WHERE method = ? AND metric = ?",
                                 sorted({(r[1], r[2]) for r in records}))
            store.db.executemany("INSERT OR REPLACE INTO metrics VALUES (?,?,?,?)",
                                 [(i, m, k, None if math.isnan(v) else v) for i, m, k, v in records])
    df.to_csv(run_dir / "metrics.csv", index=False)
    summary_table(df).to_csv(run_dir / "metrics_summary.csv", index=False)
    curves = {method: curve_means(kinds) for method, kinds in parts.items()}
    (run_dir / "curves.json").write_text(json.dumps(curves, indent=1))
    if sanity_out is not None:
        (run_dir / "sanity.json").write_text(json.dumps(sanity_out, indent=1))
    df.attrs["curves"], df.attrs["sanity"] = curves, sanity_out
    return df


def _run_table(records, targets, rows, classes) -> pd.DataFrame:
    df = pd.DataFrame(records, columns=["image_id", "method", "metric", "value"])
    info = pd.DataFrame({"image_id": [r["id"] for r in rows], "name": [r["name"] for r in rows],
                         "predicted": pd.array([r["prediction"] for r in rows], dtype="Int64"),
                         "label": pd.array([r["label"] for r in rows], dtype="Int64")})
    df = df.merge(info, on="image_id", how="left")
    df.insert(4, "target", [targets[(i, m)] for i, m in zip(df["image_id"], df["method"])])
    return add_class_columns(df, classes)


def _run_sanity(store, rows, clf, params: dict, batch_size: int, seed: int, n_images: int, only=None) -> dict:
    """Cascading randomisation of every registered method of the run on its first ``n_images`` images."""
    from .sanity import sanity_report
    cases = _cases(store, rows[:n_images * 4], clf, None) if n_images > 0 else []
    cases = [c for c in cases if c[1].shape == cases[0][1].shape][:n_images]
    inputs = {}
    for method in dict.fromkeys(m for c in cases for m in c[3]):
        if only is not None and method not in only:
            continue
        have = [c for c in cases if method in c[3]]
        inputs[method] = (torch.from_numpy(np.stack([c[1] for c in have])),
                          torch.tensor([c[3][method][1] for c in have]))
    return sanity_report(clf, inputs, params, batch_size=batch_size, seed=seed)
