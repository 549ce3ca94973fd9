"""``counterlens counterfactual --table data.csv --label COLUMN --model ...``: tabular counterfactuals
of a table's rows into a run directory.

Written to ``RUN/``: ``run.yaml`` (model and its SHA-256, table, schema, settings, versions),
the run's index (``counterlens.open_run(RUN).tabular_counterfactuals``: one row per counterfactual,
or one row with ``rank = -1`` for a query without one; written per chunk of queries in one
transaction, so a re-run resumes after the rows done) and ``counterfactuals.csv`` (every counterfactual with its
raw features and metrics, rewritten at the end of each run).

The model: a torch model that ``counterlens.loading.load_model`` reads (a model directory, a
TorchScript or torch.export file, a state_dict with ``--factory``) taking schema-space rows (its
card's preprocessing, e.g. ``schema.preprocess()``, is applied), or a pickled scikit-learn estimator
(``.pkl`` / ``.pickle`` / ``.joblib``, loaded only with ``--trust-model-file``) searched as a
black box.
"""
from __future__ import annotations

import json
import math
import pickle
import time
from pathlib import Path

from ..errors import InputError, UntrustedModelError
from .common import load_classifier

__all__ = ["tabular_counterfactual_cmd"]

PICKLE_SUFFIXES = (".pkl", ".pickle", ".joblib")
CHUNK = 256   # queries per search call and per transaction


def _names(value) -> list[str]:
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else [v for part in value for v in str(part).split(",")]
    return [v.strip() for v in items if v.strip()]


def _monotone(value) -> dict[str, str]:
    out = {}
    for item in _names(value):
        name, sep, direction = item.rpartition(":")
        if not sep or direction not in ("increase", "decrease"):
            raise InputError(f"--monotone {item!r}: write FEATURE:increase or FEATURE:decrease, e.g. age:increase")
        out[name] = direction
    return out


def load_tabular_model(args):
    """``(model, sha256, description)``: a Classifier, or an unpickled estimator with predict_proba."""
    from ..cards import file_sha256
    source = getattr(args, "model", None) or getattr(args, "weights", None)
    if source is None:
        raise InputError("--model is required: a torch model (directory, TorchScript, state_dict with --factory) "
                         "or a pickled scikit-learn estimator (.pkl, with --trust-model-file)")
    path = Path(source)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not path.is_file():
            raise InputError(f"--model {path}: no such file")
        if not getattr(args, "trust_model_file", False):
            raise UntrustedModelError(f"{path} is a pickle: loading it runs code from the file. If you trust its "
                                      "origin, pass --trust-model-file")
        try:
            if path.suffix.lower() == ".joblib":
                import joblib
                model = joblib.load(path)
            else:
                with open(path, "rb") as fh:
                    model = pickle.load(fh)
        except Exception as exc:
            raise InputError(f"--model {path}: cannot unpickle it: {exc}") from exc
        if not callable(getattr(model, "predict_proba", None)):
            raise InputError(f"--model {path} holds a {type(model).__name__} without predict_proba; pass a classifier")
        return model, file_sha256(path), type(model).__name__
    if getattr(args, "model", None) is None:
        args.model = source
    for name, default in (("factory", None), ("trust_model_file", False), ("device", "auto"), ("classes", None)):
        if not hasattr(args, name):
            setattr(args, name, default)
    clf = load_classifier(args)
    card = getattr(clf, "card", None) or {}
    return clf, getattr(clf, "source_hash", None), card.get("architecture") or card.get("factory") or \
        type(clf.module).__name__


def schema_file(args) -> Path | None:
    """The schema the model was trained with: ``--schema``, else ``<model>.schema.json`` next to a
    model file or ``schema.json`` inside a model folder, when present."""
    given = getattr(args, "schema", None)
    if given is not None:
        return Path(given)
    model = Path(str(getattr(args, "model", "") or ""))
    for candidate in (model.with_name(model.name.split(".")[0] + ".schema.json"), model / "schema.json"):
        if candidate.is_file():
            return candidate
    return None


def _schema(args, df, label):
    """The table's schema: the model's own (see :func:`schema_file`) with this command's constraints,
    checked against the table; else derived from the table, with a warning that it must match training."""
    import warnings

    from ..data.tabular import TabularSchema
    immutable, monotone = _names(getattr(args, "immutable", None)), _monotone(getattr(args, "monotone", None))
    path = schema_file(args)
    if path is None:
        warnings.warn("no schema saved with the model (<model>.schema.json, or --schema): the features and their "
                      "categories are read from this table, so the model is fed correct slots only if the table "
                      "has the same columns and categories as its training data; save the training schema with "
                      "TabularSchema.save('<model>.schema.json')", stacklevel=2)
        return TabularSchema.from_frame(df, label=label, immutable=immutable, monotone=monotone)
    schema = TabularSchema.load(path).constrained(immutable=immutable, monotone=monotone)
    schema.encode(df[[n for n in schema.names if n in df.columns]] if set(schema.names) <= set(df.columns)
                  else df)                                   # missing columns, unknown categories: named here
    return schema


def tabular_counterfactual_cmd(args) -> int:
    """Run the search for the rows of ``args.table`` and write the run directory; returns 0."""
    from ..data.tabular import TabularSchema, read_table
    from ..runs.spec import package_versions
    from ..runs.store import ShardWriter, open_run, prepare_run
    from ..counterfactual.tabular import TabularModel, _targets, tabular_counterfactual

    from ..counterfactual.constraints import check_number
    from ..counterfactual.tabular import K_MAX
    check_number("--k", int(getattr(args, "k", 4) or 4), low=1, high=K_MAX, integer=True)   # before any model call
    t0 = time.perf_counter()
    say = (lambda text: None) if getattr(args, "quiet", False) else (lambda text: print(text, flush=True))
    df = read_table(args.table)
    label = getattr(args, "label", None)
    if label is not None and label not in df.columns:
        raise InputError(f"--label {label!r} is not a column of {args.table}; columns: {list(df.columns)}")
    schema = _schema(args, df, label)
    model, sha, description = load_tabular_model(args)
    k = int(getattr(args, "k", 4) or 4)
    seed = int(getattr(args, "seed", 0) or 0)
    threshold = getattr(args, "threshold", None)
    search = {"threshold": 0.5 if threshold is None else float(threshold),
              "diversity": float(getattr(args, "diversity", 0.8)),
              "plausibility": float(getattr(args, "plausibility", 0.0) or 0.0)}
    batch_size = getattr(args, "batch_size", None)
    batch_size = 8192 if batch_size in (None, "auto") else int(batch_size)
    target_text = str(getattr(args, "target", None) or "other")
    target = int(target_text) if target_text.lstrip("-").isdigit() else target_text
    tm = TabularModel(model, schema, batch_size)
    x_all = schema.encode(df).to(tm.device)
    try:
        probs = tm.probs(x_all)
    except InputError as exc:
        if label is not None or not str(exc).startswith("the model cannot take the table's rows"):
            raise
        raise InputError(f"no --label: every column of {args.table} was read as a feature ({x_all.shape[1]} "
                         "columns after encoding) and the model cannot take them; pass --label COLUMN, the column "
                         f"the model predicts; the table's columns: {', '.join(map(str, df.columns))}") from exc
    names = tm.class_names(probs.shape[1])
    t = int(_targets(target, names, 1)[0])
    todo = [i for i in range(len(df)) if t < 0 or int(probs[i].argmax()) != t]
    limit = getattr(args, "limit", None)
    if limit is not None:
        todo = todo[:int(limit)]
    spec = {"model": {"source": str(getattr(args, "model", None)), "sha256": sha, "description": description},
            "data": {"table": str(args.table), "rows": len(df), "label": label, "queries": len(todo), "limit": limit},
            "schema": schema.to_dict(),
            "counterfactual": {"kind": "tabular", "target": target, "k": k, "seed": seed, "batch_size": batch_size,
                               **search,
                               "immutable": _names(getattr(args, "immutable", None)),
                               "monotone": _monotone(getattr(args, "monotone", None))},
            "device": str(tm.device), "versions": package_versions()}
    prepare_run(args.out, spec, compare=("model.sha256", "data.table", "schema", "counterfactual"),
                section="counterfactual", overwrite=bool(getattr(args, "overwrite", False)))
    previous = open_run(args.out).tabular_counterfactuals
    done = set() if previous is None else set(previous["row_index"].astype(int))
    rest = [i for i in todo if i not in done]
    say(f"{len(todo)} queries ({len(todo) - len(rest)} already done), k={k}, target={target!r}, "
        f"{'gradient' if tm.clf is not None else 'genetic'} search")
    found = 0
    with ShardWriter(args.out) as writer:
        for a in range(0, len(rest), CHUNK):
            idx = rest[a:a + CHUNK]
            start = time.perf_counter()
            res = tabular_counterfactual(model, df.iloc[idx], target, schema=schema, k=k, seed=seed,
                                         batch_size=batch_size, reference=df, **search)
            seconds = (time.perf_counter() - start) / len(idx)
            found += int(res.found.sum())
            writer.write_tabular(_records(res, idx, seconds))
            say(f"  {min(a + CHUNK, len(rest))}/{len(rest)} queries searched")
    csv = _write_csv(open_run(args.out).tabular_counterfactuals, schema, Path(args.out) / "counterfactuals.csv")
    print(f"tabular counterfactuals for {len(rest)} rows ({len(done)} already done; {found} of {len(rest)} with a "
          f"counterfactual) in {time.perf_counter() - t0:.1f} s; run directory: {args.out}; table: {csv}")
    return 0


def _records(res, idx: list[int], seconds: float) -> list[dict]:
    """Every counterfactual of every query of a chunk (or one 'none' row with rank -1)."""
    rows = []
    for i, row_index in enumerate(idx):
        pred = int(res.pred_before[i])
        base = {"row_index": int(row_index), "pred_before": pred, "pred_before_name": res.classes[pred],
                "seconds": seconds, "diversity": float(res.diversity[i])}
        cfs = res.counterfactuals(i)
        if not len(cfs):
            status = "already" if bool(res.already[i]) else "none"
            rows.append({**base, "rank": -1, "status": status, "reason": res.reason[i]})
            continue
        orig = res.frame_orig.iloc[i]
        for r in range(len(cfs)):
            t = int(res.target[i, r])
            cf = {n: _plain(v) for n, v in cfs.iloc[r].items()}
            changes = {n: [_plain(orig[n]), v] for n, v in cf.items() if _plain(orig[n]) != v}
            rows.append({**base, "rank": r, "status": "found", "target": t, "target_name": res.classes[t],
                         "prob_target": float(res.probs_after[i, r, t]), "valid": int(bool(res.valid[i, r])),
                         **{m: _num(getattr(res, m)[i, r]) for m in ("l0", "l1_mad", "violations", "ynn",
                                                                     "redundancy")},
                         "changes": json.dumps(changes), "row": json.dumps(cf), "reason": ""})
    return rows


def _write_csv(table, schema, path: Path) -> Path:
    """``counterfactuals.csv``: one row per counterfactual found (the query's row index, its rank, the
    counterfactual's features and its metrics)."""
    import pandas as pd
    records = []
    for r in ([] if table is None else table.to_dict("records")):
        if r["rank"] < 0:
            continue
        records.append({"row_index": r["row_index"], "rank": r["rank"], **json.loads(r["row"]),
                        **{c: r.get(c) for c in ("target_name", "prob_target", "valid", "l0", "l1_mad", "violations",
                                                 "ynn", "redundancy")}})
    frame = pd.DataFrame(records, columns=["row_index", "rank", *schema.names, "target_name", "prob_target", "valid",
                                           "l0", "l1_mad", "violations", "ynn", "redundancy"])
    tmp = path.with_name(path.name + ".tmp")
    frame.to_csv(tmp, index=False)
    tmp.replace(path)
    return path


def _plain(v):
    """A JSON-able Python scalar (numpy scalars unwrapped)."""
    return v.item() if hasattr(v, "item") else v


def _num(v) -> float | None:
    v = float(v)
    return None if math.isnan(v) else v
