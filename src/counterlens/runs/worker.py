"""The library entry for notebooks and other engines (Ray Data, Dask, Spark, a queue worker):
one call per batch of arrays, one record per case, and a classifier built inside the worker.

* :func:`explain_cases`: images ``[B, C, *S]`` with their ids (and labels, masks) in; per case the
  probabilities, prediction, every method's map and target, every metric value and the timings
  out, under keys fixed by the methods and metrics asked for (the same in every batch, so the
  records of many batches stack into one table).
* :func:`load_classifier`: the classifier from a model directory or file, or from its bytes
  (:func:`pack_model` packs a model directory into bytes), with the same safety checks as
  :func:`counterlens.loading.load_model` (nothing unpickled or imported that was not allowed).

Both are built on the pipeline stages the command line runs
(:func:`~counterlens.runs.pipeline.explain_arrays`, :func:`~counterlens.runs.pipeline.score_arrays`)
with randomness keyed by the case ids, so a case gets the same maps and metrics here, in a
``counterlens explain`` run and on any worker, whatever batch it comes in.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
import time
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np

from ..errors import InputError, ModelLoadError
from .pipeline import all_positive, explain_arrays, score_arrays
from .spec import resolved_methods

CARD = "model.json"


# -- the classifier, in a worker ----------------------------------------------------------------------
def pack_model(source) -> bytes:
    """A model as bytes for :func:`load_classifier` in another process or on another machine: a
    model file's own bytes, or a model directory's card and weights in a zip archive."""
    path = Path(source)
    if path.is_file():
        return path.read_bytes()
    if not (path / CARD).is_file():
        raise InputError(f"{source}: neither a model file nor a model directory (no {CARD} in it)")
    try:
        weights = json.loads((path / CARD).read_text(encoding="utf-8"))["weights"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{path / CARD}: cannot read its weights entry ({exc})") from exc
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.write(path / CARD, CARD)
        if (path / weights).is_file():           # a missing one is load_model's to report
            zf.write(path / weights, PurePosixPath(*Path(weights).parts).as_posix())
    return buf.getvalue()


def _unpack(data: bytes, folder: Path) -> Path:
    """Write ``data`` (a model file, or :func:`pack_model`'s archive of a directory) under ``folder``."""
    if data[:2] == b"PK":
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                names = zf.namelist()
                if CARD in names:      # a packed model directory (TorchScript / export zips have no top-level card)
                    for name in names:
                        parts = PurePosixPath(name).parts
                        if name.endswith("/") or not parts or name.startswith("/") or ".." in parts or "\\" in name:
                            raise ModelLoadError(f"packed model directory: entry {name!r} is not a plain relative file "
                                                 "name; pack the model with counterlens.pack_model")
                    for name in names:
                        target = folder / "model" / name
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(zf.read(name))
                    return folder / "model"
        except zipfile.BadZipFile:
            pass                                  # not an archive after all: a file that starts with PK
    n = int.from_bytes(data[:8], "little") if len(data) > 8 else 0
    safetensors = 0 < n <= len(data) - 8 and data[8:9] == b"{"
    path = folder / ("model.safetensors" if safetensors else "model.pt")
    path.write_bytes(data)
    return path


def load_classifier(source, *, factory=None, trust_model_file: bool = False, device="auto", classes=None,
                    logits_output=None, sha256: str | None = None, precision: str | None = None, **overrides):
    """A :class:`~counterlens.model.Classifier` from ``source``: a model directory or file (a path
    that this worker can read), or its bytes (a model file's, or :func:`pack_model`'s).

    Bytes are written to a private temporary folder and loaded by
    :func:`~counterlens.loading.load_model` with the same checks as a path: a full pickle or a
    torch.export archive with pickled parts needs ``trust_model_file=True``, a card naming a
    factory needs ``factory`` or ``trust_model_file``, the card's weights hash is checked.
    ``sha256``: the model's expected SHA-256 (a run's ``run.yaml`` has it under ``model.sha256``);
    another model is refused, so every worker of a run explains the same model. ``device``,
    ``classes``, ``logits_output`` and ``overrides`` (``preprocess``, ``in_channels``,
    ``input_size``, ``value_range``, ``output`` (the head; default the card's), ``factory_kwargs``)
    as in ``load_model``.
    """
    from ..loading import load_model
    kwargs = dict(factory=factory, trust_model_file=trust_model_file, device=device, classes=classes, **overrides)
    if isinstance(source, (bytes, bytearray, memoryview)):
        with tempfile.TemporaryDirectory(prefix="counterlens-model-") as tmp:
            clf = load_model(_unpack(bytes(source), Path(tmp)), **kwargs)
    elif isinstance(source, (str, os.PathLike)):
        clf = load_model(source, **kwargs)
    else:
        raise InputError(f"source: a model directory or file (a path), or its bytes; got {type(source).__name__}")
    if sha256 and getattr(clf, "source_hash", None) != sha256:
        raise ModelLoadError(f"the model loaded in this worker has SHA-256 {clf.source_hash}, not {sha256} (the run's "
                             "model): every worker must load the same model file")
    if logits_output is not None:
        clf.logits_output = logits_output
    if precision is not None:
        from ..model import check_precision
        clf.precision = check_precision(precision)
    return clf


# -- one batch, one record per case -------------------------------------------------------------------
def _metric_names(metrics, methods: dict) -> dict[str, list[str]]:
    """``{method: [metric, ...]}``: the metrics asked for that apply to each method."""
    from ..metrics.evaluate import METRICS, resolve_metrics
    names = resolve_metrics(list(metrics or ()), has_masks=True)
    return {m: [k for k in names if not METRICS[k].only_for or m in METRICS[k].only_for] for m in methods}


def explain_cases(clf, x, ids, *, labels=None, masks=None, methods, params: dict | None = None, metrics=(),
                  metric_options: dict | None = None, target="predicted", batch_size: int = 64,
                  seed: int = 0) -> list[dict]:
    """Explain and score one batch of images: one record (a dict) per case.

    Parameters
    ----------
    clf : Classifier
        e.g. from :func:`load_classifier`, once per worker.
    x : array ``[B, C, *S]``
        images in data space, one shape (as :func:`counterlens.data.images.load_case` reads them).
    ids : ``B`` strings
        the cases' identities (e.g. their paths relative to the data root). Random methods and
        metrics draw each case's randomness from its id: the same case gives the same record in
        any batch, on any worker, and in a ``counterlens explain`` run of the same settings.
    labels : ``B`` ints, optional (-1 or None: unknown).
    masks : ``[B, *S]`` bool, or a list with None for the cases without one, optional
        ground truth for the localisation metrics.
    methods : list of names, or ``{name: parameters}``
        e.g. a run's ``run.yaml`` ``methods`` section; ``params`` (``{method: {name: value}}``),
        ``batch_size`` and ``seed`` complete a list as ``counterlens explain`` does.
    metrics : metric names (see ``counterlens.metrics.evaluate.METRICS``), default none.
    metric_options : ``steps`` (20), ``baseline`` ("blur"), ``n_subsets`` (32) of the metrics.
    target : "predicted", a class index or name: the class each map explains (multi-label models: a
        finding; ``"all-positive"``, several maps per image, is for ``explain_arrays`` or a run).

    Returns
    -------
    One dict per case, with the same keys for every case and every batch of the same call
    arguments:

    ``id`` (str), ``label`` (int, -1 unknown), ``prediction`` (int), ``probs`` (``[K]`` float32),
    and per method M: ``map.M`` (``[*S]`` float32), ``target.M`` (int), ``seconds.M`` (method wall
    time per image), and ``metric.M.K`` (float) for every metric K that applies to M (the
    integrated-gradients completeness error to integrated_gradients only; NaN where a case's value
    is undefined, e.g. a localisation metric of a case without a mask); ``seconds.metrics`` (per
    image). ``{k: np.stack([r[k] for r in records]) for k in records[0]}`` gives the columns.
    """
    from ..metrics.evaluate import METRICS, Options
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    ids = [str(i) for i in ids]
    if x.ndim < 3 or len(ids) != len(x):
        raise InputError(f"x has shape {x.shape} and {len(ids)} ids; pass images [B, C, *spatial] and one id per image")
    given = {m: dict(p or {}) for m, p in methods.items()} if isinstance(methods, dict) else {}
    for method, values in (params or {}).items():
        given.setdefault(method, {}).update(values)
    resolved = resolved_methods(list(methods), given, batch_size, seed)
    per_method = _metric_names(metrics, resolved)
    has_mask = np.zeros(len(x), bool)
    mask_arr = None
    if masks is not None:
        if len(masks) != len(x):
            raise InputError(f"{len(masks)} masks for {len(x)} images; pass one per image (None for none)")
        has_mask = np.array([m is not None for m in masks])
        mask_arr = np.stack([np.asarray(m, bool) if m is not None else np.zeros(x.shape[2:], bool) for m in masks])
        if mask_arr.shape[1:] != x.shape[2:]:
            raise InputError(f"masks have shape {mask_arr.shape[1:]} per image; expected the images' {x.shape[2:]}")
    if all_positive(target):
        raise InputError("explain_cases gives one map per case and method; target='all-positive' gives several: use "
                         "counterlens.runs.pipeline.explain_arrays (maps with their rows) or a finding name")
    out = explain_arrays(clf, x, resolved, target, keys=ids)
    unknown = set(metric_options or {}) - {"steps", "baseline", "n_subsets"}
    if unknown:
        raise InputError(f"metric_options {sorted(unknown)} are unknown; give steps, baseline or n_subsets")
    options = Options(**{"batch_size": batch_size, "seed": seed, **(metric_options or {})})
    values: dict[str, dict[str, np.ndarray]] = {}
    t0 = time.perf_counter()
    for method, names in per_method.items():
        if names:
            values[method], _ = score_arrays(clf, x, out.maps[method], out.targets, mask_arr, names, options, method,
                                             resolved[method], keys=ids)
    metric_seconds = (time.perf_counter() - t0) / len(x)
    labels = [-1] * len(x) if labels is None else [-1 if v is None else int(v) for v in labels]
    records = []
    for j, case in enumerate(ids):
        rec = {"id": case, "label": labels[j], "prediction": int(out.prediction[j]),
               "probs": out.probs[j].astype(np.float32)}
        for method in resolved:
            rec[f"map.{method}"] = out.maps[method][j]
            rec[f"target.{method}"] = int(out.targets[j])
            rec[f"seconds.{method}"] = float(out.seconds[method])
            for name in per_method[method]:
                value = values.get(method, {}).get(name)
                undefined = value is None or (METRICS[name].needs_masks and not has_mask[j])
                rec[f"metric.{method}.{name}"] = float("nan") if undefined else float(value[j])
        rec["seconds.metrics"] = metric_seconds
        records.append(rec)
    return records
