"""Score the maps of a run directory: :func:`evaluate_run` (``counterlens evaluate`` calls it).

See :mod:`counterlens.metrics.evaluate` for the metrics; this module reads a run batch by batch
through :func:`~counterlens.runs.store.open_run`, scores each method's maps with the pipeline's
:func:`~counterlens.runs.pipeline.score_arrays`, and writes the metric rows into the run's index
(``open_run(RUN).metrics``), plus ``metrics.csv``, ``metrics_summary.csv``, ``curves.json`` and
``sanity.json``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..errors import InputError
from ..metrics.evaluate import METRICS, Options, add_class_columns, curve_means, resolve_metrics, summary_table
from .pipeline import score_arrays
from .store import ShardWriter, open_run, write_export


def _mask_files(masks_dir, run) -> dict[str, Path] | None:
    """``{case: mask file}`` matched by file stem, as ``counterlens explain --masks`` does."""
    if masks_dir is None:
        return None
    from ..data.images import ImageFolder
    from ..data.label_table import finding_mask_folders
    folder = Path(masks_dir)
    if not folder.is_dir():
        raise InputError(f"masks_dir={str(folder)!r} is not a folder; pass the folder of masks (matched by file stem)")
    cases = run.cases[run.cases.status == "done"]
    base = Path((run.spec.get("data") or {}).get("path") or Path(cases.file.iloc[0]).parent)
    per_finding = finding_mask_folders(folder, run.classes) if run.multilabel else None
    if per_finding:                          # masks/<finding>/<stem>.png: a mask per finding
        found = {f: ImageFolder._match_masks(d, [Path(f) for f in cases.file], base) for f, d in per_finding.items()}
        return {path: [found[c].get(Path(f)) if c in found else None for c in run.classes]
                for path, f in zip(cases.path, cases.file)}
    found = ImageFolder._match_masks(folder, [Path(f) for f in cases.file], base)
    if not found:
        raise InputError(f"no mask in {folder} matches an image of the run by file stem (e.g. "
                         f"{Path(cases.file.iloc[0]).stem}.png); pass the folder that holds them")
    return {path: found[Path(f)] for path, f in zip(cases.path, cases.file) if Path(f) in found}


def _case_arrays(run, paths: list[str], mask_files: dict | None):
    """``[(path, image [C, *S], mask [*S] | None)]`` for ``paths``."""
    from ..data.images import load_mask
    out = []
    for p in paths:
        image = run.image(p)
        if mask_files is not None and isinstance(mask_files.get(p), list):       # one per finding
            mask = np.stack([load_mask(f, size=tuple(image.shape[1:])) if f is not None
                             else np.zeros(image.shape[1:], bool) for f in mask_files[p]])
        elif mask_files is not None:
            mask = load_mask(mask_files[p], size=tuple(image.shape[1:])) if p in mask_files else None
        else:
            mask = run.mask(p)
        out.append((p, image, mask))
    return out


@dataclass
class ScorePlan:
    """What scoring a batch of a run's cases needs, picklable (an engine sends it to its workers)."""

    names: list[str]                      #: metrics
    needs_masks: bool
    options: Options
    params: dict                          #: the run's methods and their parameters
    targets: dict                         #: ``{(path, method): [class each map explains]}`` (multi-label: several)
    by_case: dict                         #: ``{path: [method, ...]}``
    mask_files: dict | None               #: ``{path: mask file}`` (``--masks``), or None: the run's masks
    multilabel: bool = False              #: metric rows name the finding scored (its map, mask and score)


def score_paths(clf, run, paths: list[str], plan: ScorePlan) -> tuple[list[tuple], dict]:
    """The metric rows ``(path, method, metric, value)`` of the cases ``paths`` of ``run`` and
    their curves ``{method: {kind: [Curve]}}``, images of one shape and one method at a time."""
    cases = _case_arrays(run, paths, plan.mask_files)
    rows, parts = [], {}
    for shape in dict.fromkeys(c[1].shape for c in cases):
        group = [c for c in cases if c[1].shape == shape]
        for method in dict.fromkeys(m for c in group for m in plan.by_case[c[0]]):
            # one item per map: (case, target); a multi-label case has one per finding explained
            have = [(c, t) for c in group if method in plan.by_case[c[0]] for t in plan.targets[(c[0], method)]]
            masks = (np.stack([_mask_of(c[2], t, shape) for c, t in have]) if plan.needs_masks else None)
            values, curves = score_arrays(
                clf, np.stack([c[1] for c, _ in have]), np.stack([run.map(c[0], method, t) for c, t in have]),
                np.array([t for _, t in have]), masks, plan.names, plan.options, method,
                plan.params.get(method), keys=[c[0] for c, _ in have])
            for kind, curve in curves.items():
                parts.setdefault(method, {}).setdefault(kind, []).append(curve)
            rows += [(c[0], method, metric, float(v[j]), t if plan.multilabel else None)
                     for metric, v in values.items() for j, (c, t) in enumerate(have)]
    return rows, parts


def _mask_of(mask, target: int, shape) -> np.ndarray:
    """The ground truth a map of ``target`` is scored against: the case's mask, or its finding's
    mask when it has one per finding (``[K, *S]``); empty when none."""
    if mask is None:
        return np.zeros(shape[1:], bool)
    return mask[target] if mask.ndim == len(shape) else mask


@dataclass
class _ScoreBatch:
    """An engine's work per batch of paths: score them and write the rows into this process's shard."""

    run_dir: str
    plan: ScorePlan
    _state: dict = field(default_factory=dict, repr=False)

    def __call__(self, clf, paths: list[str]) -> tuple[list[tuple], dict]:
        if not self._state:
            self._state.update(run=open_run(self.run_dir), writer=ShardWriter(self.run_dir))
        rows, parts = score_paths(clf, self._state["run"], paths, self.plan)
        self._state["writer"].write_metrics(rows)
        return rows, parts


def evaluate_run(run_dir, clf, masks_dir=None, metrics=None, *, batch_size: int = 64, seed: int = 0,
                 steps: int = 20, baseline="blur", n_subsets: int = 32, images_per_batch: int = 32,
                 sanity: bool = True, sanity_images: int = 8, sanity_methods=None,
                 progress: bool = False, engine="local", select: str | None = None) -> pd.DataFrame:
    """Score the maps stored in a run directory and write the results next to them.

    ``clf`` is the run's model (faithfulness and sanity evaluate it). Masks come from ``masks_dir``
    (matched to the images by file stem) or else the run's own masks. Every stored map is scored
    for the target it was made for. Writes the metric rows into the run's index (newer rows of
    the same case, method and metric replace older ones), ``metrics.csv`` (the long table:
    ``path``, ``method``, ``metric``, ``value``, target, predicted, label and their names,
    ``correct``), ``metrics_summary.csv``, ``curves.json`` (mean deletion/insertion curves per
    method) and, with ``sanity``, ``sanity.json`` (cascading randomisation on the first
    ``sanity_images`` images for the methods in ``sanity_methods``, None: all).

    ``engine``: ``"local"`` (this process) or ``"ray"`` / a :class:`~counterlens.runs.engines.ray.
    RayEngine` (batches of ``images_per_batch`` cases scored by Ray actors, which write the metric
    rows into their own shards; the same rows as locally). The sanity check runs here.

    ``select``: score only the cases the model got wrong (``"misclassified"``), right
    (``"correct"``) or of one class (its name); recorded in ``run.yaml`` (``evaluate.select``), and
    a later call with another selection is refused (the run's metrics are of one selection).

    Returns the long DataFrame (``attrs["curves"]``, ``attrs["sanity"]``).
    """
    from tqdm.auto import tqdm

    if engine != "local":
        from .engines.ray import as_ray_engine
        engine = as_ray_engine(engine)
    run = open_run(run_dir)
    params = run.spec.get("methods") or {}
    done = run.cases[run.cases.status == "done"]
    if not len(done):
        raise InputError(f"{run_dir} holds no explained images; run `counterlens explain ... --out {run_dir}` first")
    att = run.attributions
    if not len(att):
        raise InputError(f"{run_dir} holds no attribution maps to score; run `counterlens explain ... --out {run_dir}`")
    done = _selected(run, run_dir, done, select)
    mask_files = _mask_files(masks_dir, run)
    has_masks = mask_files is not None or bool(run.table("cases")["has_mask"].any())
    names = resolve_metrics(metrics, has_masks)
    targets: dict[tuple, list[int]] = {}
    for p, m, t in zip(att.path, att.method, att.target):
        targets.setdefault((p, m), []).append(int(t))
    by_case: dict[str, list[str]] = {}
    for p, m in dict.fromkeys(zip(att.path, att.method)):
        by_case.setdefault(p, []).append(m)
    plan = ScorePlan(names, any(METRICS[n].needs_masks for n in names),
                     Options(steps, baseline, n_subsets, batch_size, seed), params, targets, by_case, mask_files,
                     multilabel=run.multilabel)
    paths = [p for p in done.path if p in by_case]
    batches = [paths[start:start + images_per_batch] for start in range(0, len(paths), images_per_batch)]
    scored: list = [None] * len(batches)          # in batch order, whichever engine finishes which first
    if engine == "local":
        with ShardWriter(run_dir) as writer:
            for i, batch in enumerate(tqdm(batches, desc="evaluating", disable=not progress)):
                scored[i] = score_paths(clf, run, batch, plan)
                writer.write_metrics(scored[i][0])
    else:
        with tqdm(total=len(paths), desc="evaluating (ray)", unit="img", disable=not progress) as bar:
            def keep(i, result):
                scored[i] = result
                bar.update(len(batches[i]))
            engine.map(clf, batches, _ScoreBatch(str(Path(run_dir).resolve()), plan), keep)
    records, parts = [], {}
    for rows, curves in scored:
        records += rows
        for method, kinds in curves.items():
            for kind, found in kinds.items():
                parts.setdefault(method, {}).setdefault(kind, []).extend(found)
    sanity_out = _run_sanity(run, paths, clf, params, batch_size, seed, sanity_images,
                             sanity_methods) if sanity else None
    df = (_finding_table(records, run) if run.multilabel else
          _run_table([r[:4] for r in records], targets, run, clf.classes or run.classes))
    write_export(run_dir, "metrics.csv", df.to_csv(index=False))
    write_export(run_dir, "metrics_summary.csv", summary_table(df).to_csv(index=False))
    curves = {method: curve_means(kinds) for method, kinds in parts.items()}
    write_export(run_dir, "curves.json", curves)
    if sanity_out is not None:
        write_export(run_dir, "sanity.json", sanity_out)
    df.attrs["curves"], df.attrs["sanity"] = curves, sanity_out
    return df


def _selected(run, run_dir, done: pd.DataFrame, select: str | None) -> pd.DataFrame:
    """The done cases ``select`` picks (see :func:`evaluate_run`); checks and records the selection."""
    from .store import read_spec, spec_differences, write_spec
    previous = (run.spec.get("evaluate") or {}).get("select")
    now = "all" if select in (None, "", "all") else str(select)
    if previous is not None and previous != now:
        diff = "; ".join(spec_differences({"evaluate": {"select": previous}}, {"evaluate": {"select": now}}))
        raise InputError(f"{run_dir}: {diff}; a run's metrics are of one selection: pass --select {previous}, or "
                         "explain into another --out for this one")
    if now == "all":
        if previous is not None or select is not None:
            write_spec(run_dir, {**read_spec(run_dir), "evaluate": {"select": now}})
        return done
    classes = list(run.classes or [])
    if run.multilabel or not classes or done.label_index.isna().all():
        raise InputError(f"--select {select}: needs the images' classes (explained from one subfolder per class); "
                         f"{run_dir} has none")
    if now not in ("misclassified", "correct") and now not in classes:
        raise InputError(f"--select {select!r}: pass misclassified, correct or a class: {', '.join(classes)}")
    if now in classes:
        picked = done[done.label == now]
    else:
        wrong = done.prediction_index != done.label_index
        picked = done[wrong if now == "misclassified" else ~wrong]
    if not len(picked):
        raise InputError(f"--select {select}: no explained image of {run_dir} is {now}; nothing to score")
    write_spec(run_dir, {**read_spec(run_dir), "evaluate": {"select": now}})
    return picked


def _run_table(records, targets, run, classes) -> pd.DataFrame:
    df = pd.DataFrame(records, columns=["path", "method", "metric", "value"])
    cases = run.cases
    info = pd.DataFrame({"path": cases.path, "predicted": cases.prediction_index, "label": cases.label_index})
    df = df.merge(info, on="path", how="left")
    df.insert(4, "target", [targets[(p, m)][0] for p, m in zip(df["path"], df["method"])])
    return add_class_columns(df, classes)


def _finding_table(records, run) -> pd.DataFrame:
    """A multi-label run's metric rows: ``path, method, metric, value, target`` (the finding) and, per
    row, that finding's ``label`` (1 / 0, NA unknown) and ``predicted`` (its probability at least the
    run's threshold); ``label_name`` and ``predicted_name`` are the finding, so the summary's
    per-class groups are per finding, and ``correct`` says whether the finding was called right."""
    df = pd.DataFrame(records, columns=["path", "method", "metric", "value", "target"])
    cases, names = run.cases, run.classes
    df["target_name"] = [names[t] for t in df["target"]]
    per_finding = pd.concat([pd.DataFrame({"path": cases["path"], "target_name": n, "label": cases[f"label_{n}"],
                                           "predicted": cases[f"pred_{n}"]}) for n in names], ignore_index=True)
    df = df.merge(per_finding, on=["path", "target_name"], how="left")
    df["label_name"] = df["predicted_name"] = df["target_name"]
    df["correct"] = (df["label"] == df["predicted"]).astype("boolean")
    return df


def _run_sanity(run, paths: list[str], clf, params: dict, batch_size: int, seed: int, n_images: int,
                only=None) -> dict:
    """Cascading randomisation of every method of the run on its first ``n_images`` images."""
    from ..metrics.sanity import sanity_report
    cases = _case_arrays(run, paths[:n_images * 4], None) if n_images > 0 else []
    cases = [c for c in cases if c[1].shape == cases[0][1].shape][:n_images]
    att = run.attributions.drop_duplicates(["path", "method"]).set_index(["path", "method"])   # a map per case
    inputs = {}
    for method in run.methods:
        if only is not None and method not in only:
            continue
        have = [c for c in cases if (c[0], method) in att.index]
        if have:
            inputs[method] = (torch.from_numpy(np.stack([c[1] for c in have])),
                              torch.tensor([int(att.loc[(c[0], method), "target"]) for c in have]))
    return sanity_report(clf, inputs, params, batch_size=batch_size, seed=seed)
