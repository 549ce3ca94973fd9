"""Dataset-scale runs: explain or search counterfactuals for every image of a folder, into a run
directory, resumably. The command line and notebooks call these; both are thin wrappers over
:func:`~counterlens.runs.store.prepare_run` and an engine.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import CounterlensError, InputError
from .engines.local import Job, RunSummary, run_local
from .pipeline import cases_of
from .spec import model_spec, package_versions, resolved_methods
from .store import prepare_run

MODEL_KEYS = ("model.sha256", "model.weights_sha256", "model.classes", "model.in_channels", "model.input_size",
              "model.value_range", "model.preprocess", "model.logits_output", "model.precision")
EXPLAIN_KEYS = (*MODEL_KEYS, "data", "target", "methods")
COUNTERFACTUAL_KEYS = (*MODEL_KEYS, "data", "counterfactual")


def check_out(dataset, out) -> None:
    """``out`` must not lie inside the data folder (a later run would read the run's own files)."""
    root = Path(dataset.root if dataset.root.is_dir() else dataset.root.parent).resolve()
    where = Path(out).resolve()
    if where == root or root in where.parents:
        raise InputError(f"--out {out} is inside the data folder {dataset.root}; a later run would read the run's own "
                         "files as images: put the run directory elsewhere")


def check_value_range(clf, dataset, sample: int = 4) -> str | None:
    """Warn when the first images' values lie outside the model's ``value_range`` (its card's):
    e.g. CT slices in Hounsfield units given to a model trained on [0, 1]. Returns the warning."""
    import warnings

    from ..data.images import load_case
    if not clf.value_range or not len(dataset):
        return None
    lo, hi = clf.value_range
    slack = 0.1 * (hi - lo)
    for rec in dataset.records[:sample]:
        try:
            image, _ = load_case(rec.path, None, **dataset.read_options)
        except CounterlensError:
            continue
        a, b = float(np.nanmin(image)), float(np.nanmax(image))
        if a < lo - slack or b > hi + slack:
            text = (f"{rec.path} has values {a:.4g}..{b:.4g}, outside the range the model takes ({lo:g}..{hi:g}, from "
                    "its card): the explanations would be of inputs it never saw. Scale the data to its range "
                    "(e.g. apply the DICOM window; command line: --preprocess normalize:MEAN,STD maps it onto the "
                    "model's range), or correct value_range in model.json (--value-range LOW HIGH)")
            warnings.warn(text, stacklevel=3)
            return text
    return None


def data_spec(dataset, source, select: str | None = None) -> dict:
    """What identifies the data of a run (compared on re-runs): the folder, its classes, how files are
    read, and which images were picked (``select``, when some were)."""
    spec = {"path": str(Path(source or dataset.root).resolve()), "classes": dataset.classes,
            "read": {k: list(v) if isinstance(v, tuple) else v for k, v in dataset.read_options.items()}}
    if select not in (None, "", "all"):
        spec["select"] = str(select)
    return spec


SELECTIONS = ("misclassified", "correct")


def select_cases(clf, dataset, select: str | None):
    """The images of ``dataset`` that ``select`` picks: ``None``/``"all"``: every one;
    ``"misclassified"`` / ``"correct"``: the model's prediction against the image's class folder;
    a class name: the images of that class. Returns a copy of ``dataset`` with those records;
    unreadable images stay in (the run records them as failed)."""
    import copy

    import torch

    from ..data.images import load_case
    if select in (None, "", "all"):
        return dataset
    classes = list(dataset.classes or [])
    if not classes or getattr(dataset, "multilabel", False) or any(r.label is None for r in dataset.records):
        raise InputError(f"--select {select}: needs images in one subfolder per class (their labels); these have none")
    if select not in SELECTIONS and select not in classes:
        raise InputError(f"--select {select!r}: pass misclassified, correct or a class: {', '.join(classes)}")
    if select in classes:
        keep = [r for r in dataset.records if classes[r.label] == select]
    else:
        keep = []
        for rec in dataset.records:                  # one model call per image: the images may differ in size
            try:
                image, _ = load_case(rec.path, None, **dataset.read_options)
            except CounterlensError:
                keep.append(rec)
                continue
            with torch.no_grad():
                pred = int(clf.logits(clf.as_input(torch.from_numpy(np.ascontiguousarray(image[None])))).argmax(1))
            if (pred != rec.label) == (select == "misclassified"):
                keep.append(rec)
    picked = copy.copy(dataset)
    picked.records = keep
    return picked


def data_info(dataset, loading: dict | None = None) -> dict:
    """How many images, how many with masks, and what the loader does to them (``loading``, from
    :func:`~counterlens.runs.diagnose.diagnose`; described from the files' headers when not given)."""
    from .diagnose import describe_loading
    return {"images": len(dataset), "with_masks": sum(r.mask_path is not None for r in dataset.records),
            "loading": loading if loading is not None else describe_loading(dataset)}


def explain_folder(clf, dataset, out, *, methods: list[str], params: dict | None = None, target="predicted",
                   batch_size=64, seed: int = 0, images_per_batch: int = 16, workers: int | None = None,
                   threads: int | None = None, progress: bool = True, model_source: str = "",
                   data_source: str = "", overwrite: bool = False, force: bool = False,
                   map_dtype: str = "float32", engine="local", loading: dict | None = None,
                   select: str | None = None) -> RunSummary:
    """Explain every image of ``dataset`` (an ImageFolder) with ``methods`` into the run directory ``out``.

    Re-running the same call resumes (only batches not complete are done); a call with another
    model, data, target, methods or method parameters is refused unless ``overwrite``.
    ``engine``: ``"local"`` (this machine: ``workers`` processes of ``threads`` threads) or
    ``"ray"`` / a :class:`~counterlens.runs.engines.ray.RayEngine` (a Ray cluster; the same batches
    and results). ``select``: only some images (:func:`select_cases`); part of the run's data, so a
    re-run with another selection is refused.
    """
    engine = _engine(engine, workers, threads)
    check_out(dataset, out)
    if loading is None:                      # the command line checked the model against the data already
        check_value_range(clf, dataset)
    resolved = resolved_methods(methods, params, batch_size, seed)
    dataset = select_cases(clf, dataset, select)
    spec = {"model": model_spec(clf, model_source), "data": data_spec(dataset, data_source, select),
            "data_info": data_info(dataset, loading), "target": target, "seed": seed, "batch_size": batch_size, "methods": resolved,
            "images_per_batch": images_per_batch, "map_dtype": map_dtype, "device": str(clf.device),
            "versions": package_versions()}
    if getattr(clf, "multilabel", False):     # the findings' probability that counts as present (all-positive)
        spec["threshold"] = 0.5
    prepare_run(out, spec, compare=EXPLAIN_KEYS, overwrite=overwrite, force=force)
    job = Job("explain", read=dataset.read_options, methods=resolved, target=target)
    if engine != "local":
        return engine.run(clf, cases_of(dataset), out, job, images_per_batch=images_per_batch, progress=progress,
                          map_dtype=map_dtype)
    return run_local(clf, cases_of(dataset), out, job, images_per_batch=images_per_batch, workers=workers,
                     threads=threads, progress=progress, map_dtype=map_dtype)


def counterfactual_folder(clf, dataset, out, *, target="other", params: dict | None = None, settings: dict | None = None,
                          train=None, images_per_batch: int = 16, workers: int | None = None,
                          threads: int | None = None, progress: bool = True, model_source: str = "",
                          data_source: str = "", overwrite: bool = False, force: bool = False,
                          engine="local", loading: dict | None = None, select: str | None = None) -> RunSummary:
    """Counterfactuals for every image of ``dataset`` into ``out`` (which may hold an explain run
    of the same model and data). ``params`` go to :func:`counterlens.counterfactual.counterfactual`;
    ``settings``: how ``run.yaml`` describes what is not a plain value in ``params`` (prior,
    training data, ...). Resumes like :func:`explain_folder`; ``engine`` as there."""
    engine = _engine(engine, workers, threads)
    check_out(dataset, out)
    if loading is None:
        check_value_range(clf, dataset)
    plain = {k: v for k, v in (params or {}).items() if isinstance(v, (int, float, str, bool, type(None)))}
    dataset = select_cases(clf, dataset, select)
    spec = {"model": model_spec(clf, model_source), "data": data_spec(dataset, data_source, select),
            "data_info": data_info(dataset, loading), "counterfactual": {"target": target, **plain, **(settings or {})},
            "device": str(clf.device), "versions": package_versions()}
    prepare_run(out, spec, compare=COUNTERFACTUAL_KEYS, section="counterfactual", overwrite=overwrite, force=force)
    job = Job("counterfactual", read=dataset.read_options, target=target, params=params, train=train)
    if engine != "local":
        return engine.run(clf, cases_of(dataset), out, job, images_per_batch=images_per_batch, progress=progress)
    return run_local(clf, cases_of(dataset), out, job, images_per_batch=images_per_batch, workers=workers,
                     threads=threads, progress=progress)


def _engine(engine, workers, threads):
    """``"local"``, or the Ray engine with ``workers`` / ``threads`` where it leaves them out
    (checked, and Ray imported, before anything is written)."""
    if isinstance(engine, str) and engine == "local":
        return engine
    from .engines.ray import as_ray_engine
    return as_ray_engine(engine, workers, threads)
