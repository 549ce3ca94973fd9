"""Reading a run directory back: :func:`open_run` and :class:`Run`.

Every index shard is read and merged; where shards hold the same key (a batch redone after a
crash, two processes that did the same case), a ``done`` row wins over a ``failed`` one and then
the newest row wins. The result is a snapshot taken when first asked; :meth:`Run.refresh` takes
a new one.
"""
from __future__ import annotations

import json
import sqlite3
from collections import OrderedDict
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from ...errors import InputError
from .counterfactual_reads import CounterfactualReads
from .findings import finding_columns
from .layout import KEYS, is_run_dir, read_spec
from .merged import merged, shards


def open_run(path) -> "Run":
    """Open a run directory for reading (``counterlens explain ... --out RUN``).

    >>> run = counterlens.open_run("runs/mri")
    >>> run.cases.head()                       # one row per case
    >>> run.map("glioma/x.png", "gradcam")     # float32 array in the image's shape
    """
    return Run(path)


class Run(CounterfactualReads):
    """A run directory, read-only. See :func:`open_run`.

    Attributes
    ----------
    cases : DataFrame
        One row per case: ``path`` (relative to the data root: the case's identity), ``file``,
        ``label``, ``prediction`` (class names), ``label_index``, ``prediction_index``,
        ``probability`` (of the prediction), ``prob_<class>`` per class, ``status``
        (``done``/``failed``), ``error``. A multi-label run (``multilabel``): ``label`` and
        ``prediction`` name the positive findings, ``prob_<finding>`` are sigmoid probabilities, and
        ``label_<finding>`` / ``pred_<finding>`` (1 / 0) follow ``error``.
    methods : list of str
    spec : dict (``run.yaml``)
    attributions : DataFrame ``path, method, target, target_name, seconds``
    skipped : dict ``{method: reason}`` of the methods that could not run on the model (their
        per-case rows: ``table("skipped")``); the other methods' maps are in the run
    metrics : DataFrame ``path, method, metric, value`` (multi-label: and ``target``, ``target_name``,
        the finding whose map was scored) or None
    counterfactuals : DataFrame or None
    """

    def __init__(self, path):
        self.root = Path(path)
        if not self.root.is_dir() or not is_run_dir(self.root):
            raise InputError(f"{self.root} is not a counterlens run directory (no run.yaml or index/); "
                             "create one with `counterlens explain ... --out DIR`")
        self._arrays: OrderedDict[str, dict] = OrderedDict()
        self._loaded: dict[str, pd.DataFrame] = {}

    def __repr__(self) -> str:
        return f"Run({str(self.root)!r}, {len(self.cases)} cases, methods={self.methods})"

    def refresh(self) -> "Run":
        for name in ("cases", "spec", "attributions", "metrics", "counterfactuals", "skipped"):
            self.__dict__.pop(name, None)
        self._loaded.clear()
        self._arrays.clear()
        return self

    # -- tables -----------------------------------------------------------------------------------
    @cached_property
    def spec(self) -> dict:
        return read_spec(self.root)

    def table(self, name: str) -> pd.DataFrame:
        """A merged index table as stored (``cases``, ``maps``, ``counterfactuals``, ``metrics``,
        ``tabular_counterfactuals``), read on first use: for the run layer's own readers."""
        if name not in KEYS:
            raise InputError(f"table={name!r}: one of {sorted(KEYS)}")
        if name not in self._loaded:
            self._loaded[name] = merged(self.root, name)
        return self._loaded[name]

    @property
    def classes(self) -> list[str]:
        model = self.spec.get("model") or {}
        return [str(c) for c in (model.get("classes") or (self.spec.get("data") or {}).get("classes") or [])]

    @property
    def multilabel(self) -> bool:
        """Whether the run's model is multi-label (``run.yaml`` ``model.output``): ``classes`` are findings."""
        return (self.spec.get("model") or {}).get("output") == "multilabel"

    @property
    def threshold(self) -> float:
        """The probability at which a finding counts as present (multi-label; ``run.yaml`` ``threshold``)."""
        return float(self.spec.get("threshold") or 0.5)

    @cached_property
    def cases(self) -> pd.DataFrame:
        raw = self.table("cases")
        classes = self.classes
        probs = [json.loads(p) if isinstance(p, str) else None for p in raw["probs"]]
        n = max((len(p) for p in probs if p), default=len(classes))
        names = classes if len(classes) == n else [classes[i] if i < len(classes) else str(i) for i in range(n)]
        df = pd.DataFrame({
            "path": raw["case_id"].astype(str), "file": raw["file"].astype(str),
            "label": raw["label_name"], "prediction": raw["prediction_name"],
            "label_index": pd.array(raw["label"], dtype="Int64"),
            "prediction_index": pd.array(raw["prediction"], dtype="Int64"),
            "probability": raw["probability"].astype(float)})
        for i, name in enumerate(names):
            df[f"prob_{name}"] = [p[i] if p and i < len(p) else np.nan for p in probs]
        df["status"] = raw["status"].astype(str)
        df["error"] = raw["error"]
        if self.multilabel:
            finding_columns(df, raw, probs, names, self.threshold)
        return df.reset_index(drop=True)

    @property
    def methods(self) -> list[str]:
        declared = list((self.spec.get("methods") or {}))
        stored = list(dict.fromkeys(self.table("maps")["method"]))
        return declared + [m for m in stored if m not in declared]

    @cached_property
    def attributions(self) -> pd.DataFrame:
        maps = self.table("maps")
        names = self.classes
        return pd.DataFrame({"path": maps["case_id"].astype(str), "method": maps["method"].astype(str),
                             "target": maps["target"].astype(int),
                             "target_name": [names[t] if 0 <= t < len(names) else str(t) for t in maps["target"]],
                             "seconds": maps["seconds"].astype(float)})

    @cached_property
    def skipped(self) -> dict[str, str]:
        """``{method: reason}``: the methods skipped because they cannot run on this model (the
        first reason recorded for each; per case in ``table("skipped")``)."""
        rows = self.table("skipped")
        out: dict[str, str] = {}
        for method, reason in zip(rows["method"].astype(str), rows["reason"].astype(str)):
            out.setdefault(method, reason)
        return out

    def method_seconds(self) -> dict[str, float]:
        """Mean seconds per image of each method."""
        att = self.attributions
        means = att.groupby("method", sort=False)["seconds"].mean() if len(att) else {}
        return {m: float(means[m]) for m in self.methods if m in means}

    @cached_property
    def metrics(self) -> pd.DataFrame | None:
        m = self.table("metrics")
        if not len(m):
            return None
        out = pd.DataFrame({"path": m["case_id"].astype("category"), "method": m["method"].astype("category"),
                            "metric": m["metric"].astype("category"), "value": m["value"].astype(float)})
        if m["target"].notna().any():          # multi-label: the finding whose map was scored
            out["target"] = pd.array(m["target"], dtype="Int64")
            out["target_name"] = [self._target_name(int(t)) if pd.notna(t) else None for t in m["target"]]
        return out

    def json_file(self, name: str):
        """``RUN/<name>`` parsed (``audit.json``, ``curves.json``, ``sanity.json``), or None when absent."""
        path = self.root / name
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None

    # -- arrays -----------------------------------------------------------------------------------
    def _case_id(self, path) -> str:
        """The case id of ``path`` (the id itself, or the file as read); a clear error otherwise."""
        where = self._case_locations()
        path = str(path)
        if path in where["known"]:
            return path
        if path in where["by_file"]:
            return where["by_file"][path]
        known = sorted(where["known"])[:1]
        raise InputError(f"{path!r} is not a case of {self.root}; cases are named by their path relative to the "
                         f"data root, e.g. {known[0]!r}" if known else f"{self.root} holds no cases yet")

    def _npz(self, file: str) -> dict[str, np.ndarray]:
        """Every array of one batch file, kept for the next few calls."""
        arrays = self._arrays.get(file)
        if arrays is None:
            with np.load(self.root / file) as npz:
                arrays = {k: npz[k] for k in npz.files}
            self._arrays[file] = arrays
            while len(self._arrays) > 8:          # a few batches in memory, for sequential readers
                self._arrays.popitem(last=False)
        else:
            self._arrays.move_to_end(file)
        return arrays

    def _array(self, file: str, key: str) -> np.ndarray:
        return self._npz(file)[key]

    def map(self, path: str, method: str, target=None) -> np.ndarray:
        """The ``method`` map of case ``path``: float32 ``[*S]`` in the image's own shape.

        ``target``: which map when the case has several (multi-label: one per finding explained),
        a class or finding index or name; None: the case's only (or first) map."""
        cid = self._case_id(path)
        want = None if target is None else self._target_index(target)
        found = self._case_locations()["maps"].get(cid, ())
        for m, t, file, group, row in found:
            if m == method and (want is None or t == want):
                return self._array(file, f"{group}/map/{method}")[row].astype(np.float32)
        have = [f"{m} ({self._target_name(t)})" for m, t, *_ in found]
        raise InputError(f"case {cid!r} has no {method} map{'' if target is None else f' for target {target!r}'} in "
                         f"{self.root}; its maps: {have or 'none'}")

    def _target_index(self, target) -> int:
        if isinstance(target, str) and not target.lstrip("-").isdigit():
            names = {c.lower(): i for i, c in enumerate(self.classes)}
            if target.lower() not in names:
                raise InputError(f"target={target!r} is not a class of this run; one of {self.classes}")
            return names[target.lower()]
        return int(target)

    def _target_name(self, t: int) -> str:
        return self.classes[t] if 0 <= t < len(self.classes) else str(t)

    def image(self, path: str) -> np.ndarray:
        """The image as explained (data space): float32 ``[C, *S]``."""
        cid = self._case_id(path)
        loc = self._case_locations()["cases"].get(cid)
        if loc is None:
            row = self.table("cases").set_index("case_id").loc[cid]
            raise InputError(f"case {cid!r} has no stored image (status {row['status']}: {row['error']})")
        file, group, row, _ = loc
        return self._array(file, f"{group}/image")[row]

    def mask(self, path: str, target=None) -> np.ndarray | None:
        """The case's mask (bool ``[*S]``), or None when it had none. A multi-label case with a mask
        per finding: all of them (``[K, *S]``), or with ``target`` (index or name) that finding's."""
        loc = self._case_locations()["cases"].get(self._case_id(path))
        if loc is None or not loc[3]:
            return None
        file, group, row, _ = loc
        mask = self._array(file, f"{group}/mask")[row]
        if target is not None and mask.ndim == self._array(file, f"{group}/image")[row].ndim:   # [K, *S]
            return mask[self._target_index(target)]
        return mask

    # -- bookkeeping for resuming -----------------------------------------------------------------
    def done_cases(self, methods) -> set[str]:
        """Cases with status done and a map of every one of ``methods`` (or that method skipped: it
        cannot run on the model)."""
        cases = self.table("cases")
        done = set(cases.loc[cases["status"] == "done", "case_id"].astype(str))
        maps, skipped = self.table("maps"), self.table("skipped")
        nothing = set(cases.loc[cases["targets"] == "[]", "case_id"].astype(str))  # multi-label: no positive finding
        for m in methods:
            done &= (set(maps.loc[maps["method"] == m, "case_id"].astype(str))
                     | set(skipped.loc[skipped["method"] == m, "case_id"].astype(str)) | nothing)
        return done

    def written_rows(self, table: str = "cases") -> int:
        """Rows of ``table`` over all shards, duplicates included (work done twice shows here)."""
        if table not in KEYS:
            raise InputError(f"table={table!r}: one of {sorted(KEYS)}")
        total = 0
        for shard in shards(self.root):
            con = sqlite3.connect(f"file:{shard}?mode=ro", uri=True, timeout=60)
            try:
                total += con.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
            except sqlite3.OperationalError:
                pass
            finally:
                con.close()
        return total

    # -- for the report ----------------------------------------------------------------------------
    def case_arrays(self, path: str) -> dict:
        """Every stored array of case ``path`` in one call: ``{"image": [C, *S] float32 or None,
        "mask": [*S] bool or None, "maps": {method: [*S] float32}, "target_maps": {(method, target):
        [*S] float32} (every map: several per method for a multi-label case), "counterfactuals":
        {target: [C, *S] float32}, "activations": {target: :meth:`activation_record`}}`` (None and
        empty for a case that failed to load).

        The same arrays as :meth:`image`, :meth:`mask`, :meth:`map` and :meth:`counterfactual`,
        found through dictionaries built once per snapshot instead of a scan of the index per
        array, so reading every case of a run is linear in its size (a report of 100,000 cases).
        Read in :attr:`cases` order, each array file is read once.
        """
        where = self._case_locations()
        path = self._case_id(path)
        case = where["cases"].get(path)
        out = {"image": None, "mask": None, "maps": {}, "counterfactuals": {}}
        if case is not None:
            file, group, row, has_mask = case
            out["image"] = self._array(file, f"{group}/image")[row]
            out["mask"] = self._array(file, f"{group}/mask")[row] if has_mask else None
        out["target_maps"] = {}
        for method, target, file, group, row in where["maps"].get(path, ()):
            out["target_maps"][(method, target)] = self._array(file, f"{group}/map/{method}")[row].astype(np.float32)
            out["maps"].setdefault(method, out["target_maps"][(method, target)])
        for target, file, group, row in where["counterfactuals"].get(path, ()):
            out["counterfactuals"][target] = self._array(file, f"{group}/counterfactual")[row]
        out["activations"] = {t: self.activation_record(path, t) for t in self._activations().get(path, {})}
        return out

    def _case_locations(self) -> dict:
        """``{table: {case: where its arrays are}}`` of the current snapshot (rebuilt after :meth:`refresh`)."""
        c, m, cf = self.table("cases"), self.table("maps"), self.table("counterfactuals")
        key = (c, m, cf)                  # the frames themselves (kept alive here, so never mistaken for new ones)
        cached = self.__dict__.get("_locations")
        if cached is not None and all(a is b for a, b in zip(cached[0], key)):
            return cached[1]
        where = {"known": set(c["case_id"].astype(str)), "cases": {}, "maps": {}, "counterfactuals": {},
                 "by_file": dict(zip(c["file"].astype(str), c["case_id"].astype(str)))}
        for cid, file, group, row, has_mask in zip(c["case_id"].astype(str), c["array_file"], c["array_group"],
                                                   c["array_row"], c["has_mask"]):
            if isinstance(file, str):
                where["cases"][cid] = (file, group, int(row), bool(has_mask))
        for cid, method, target, file, group, row in zip(m["case_id"].astype(str), m["method"].astype(str),
                                                         m["target"], m["array_file"], m["array_group"],
                                                         m["array_row"]):
            where["maps"].setdefault(cid, []).append((method, int(target), file, group, int(row)))
        for cid, target, file, group, row in zip(cf["case_id"].astype(str), cf["target"], cf["array_file"],
                                                 cf["array_group"], cf["array_row"]):
            where["counterfactuals"].setdefault(cid, []).append((int(target), file, group, int(row)))
        self.__dict__["_locations"] = (key, where)
        return where
