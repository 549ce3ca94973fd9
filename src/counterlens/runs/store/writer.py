"""Writing a run: one :class:`ShardWriter` per process, one array file and one transaction per batch."""
from __future__ import annotations

import io
import json
import math
import os
import sqlite3
import time
import uuid
from pathlib import Path

import numpy as np

from ...errors import InputError
from ..records import CaseResult, text_of
from .layout import ARRAYS_DIR, INDEX_DIR, SCHEMA, writer_name

FLOAT16_MAX = float(np.finfo(np.float16).max)      # 65504
FLOAT16_TINY = float(np.finfo(np.float16).tiny)    # 6.1e-5: below it float16 keeps 1-10 bits


class ShardWriter:
    """Writes this process's shard of a run directory: ``index/<name>.sqlite`` and ``arrays/<name>/``.

    Only this writer ever writes its shard, so there is no locking between processes; readers
    merge every shard (:class:`~counterlens.runs.store.reader.Run`).

    ``map_dtype``: ``"float32"`` (default) or ``"float16"`` (half the disk; a map whose values
    float16 cannot hold, beyond +-65504 or with its largest magnitude below 6.1e-5 where float16
    keeps only a few bits, is refused with an :class:`InputError`, never clipped).
    """

    def __init__(self, root, *, map_dtype: str = "float32", name: str | None = None):
        if map_dtype not in ("float32", "float16"):
            raise InputError(f"map_dtype={map_dtype!r}: use 'float32' (default) or 'float16'")
        self.root = Path(root)
        self.name = name or writer_name()
        self.map_dtype = np.dtype(map_dtype)
        (self.root / INDEX_DIR).mkdir(parents=True, exist_ok=True)
        self.array_dir = self.root / ARRAYS_DIR / self.name
        self.db = sqlite3.connect(self.root / INDEX_DIR / f"{self.name}.sqlite", timeout=60)
        self.db.executescript(SCHEMA)
        self._seq = 0

    def close(self) -> None:
        self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- arrays -----------------------------------------------------------------------------------
    def _save_arrays(self, arrays: dict[str, np.ndarray]) -> str:
        """One ``.npz`` for a batch, written under a temporary name and renamed; its relative path."""
        self.array_dir.mkdir(parents=True, exist_ok=True)
        self._seq += 1
        path = self.array_dir / f"{self._seq:06d}-{uuid.uuid4().hex[:6]}.npz"
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as fh:
            fh.write(buf.getbuffer())
        os.replace(tmp, path)
        return str(path.relative_to(self.root))

    def _map_array(self, method: str, maps: list[np.ndarray]) -> np.ndarray:
        arr = np.stack(maps).astype(np.float32, copy=False)
        if self.map_dtype == np.float16:
            finite = arr[np.isfinite(arr)]
            peak = float(np.abs(finite).max()) if finite.size else 0.0
            if peak > FLOAT16_MAX or 0.0 < peak < FLOAT16_TINY:
                raise InputError(f"the {method} maps reach |value| {peak:.3g}, which float16 cannot hold "
                                 f"(it keeps 6.1e-5..65504); store maps as float32 (the default)")
            return arr.astype(np.float16)
        return arr

    # -- rows -------------------------------------------------------------------------------------
    def write(self, results: list[CaseResult]) -> int:
        """Write one batch of case results (done or failed) in one file and one transaction.

        Cases with arrays are grouped by image shape; each group's images, masks, maps and
        counterfactuals are stacked under the group's keys. Returns the number of rows written.
        """
        if not results:
            return 0
        groups: dict[tuple, list[CaseResult]] = {}
        for r in results:
            if r.image is not None:
                groups.setdefault(tuple(r.image.shape), []).append(r)
        arrays: dict[str, np.ndarray] = {}
        where: dict[int, tuple[str, int]] = {}
        map_rows: dict[int, list[tuple[str, int, int]]] = {}      # case -> (method, target, row of the map array)
        for g, members in enumerate(groups.values()):
            key = f"g{g}"
            arrays[f"{key}/image"] = np.stack([m.image for m in members]).astype(np.float32, copy=False)
            masked = [m.mask for m in members if m.mask is not None]      # [*S], or [K, *S]: a mask per finding
            if masked:
                arrays[f"{key}/mask"] = np.stack([m.mask if m.mask is not None else np.zeros(masked[0].shape, bool)
                                                  for m in members]).astype(bool)
            for method in dict.fromkeys(k for m in members for k in m.maps):
                have = [m for m in members if method in m.maps]
                if len(have) != len(members):
                    raise InputError(f"method {method} has maps for {len(have)} of {len(members)} cases of a batch")
                # one row per (case, target): a case's one map, or one per finding explained (multi-label)
                pairs = [(m, t, a) for m in members for meth, t, a in m.map_items() if meth == method]
                if pairs:
                    arrays[f"{key}/map/{method}"] = self._map_array(method, [a for _, _, a in pairs])
                for k, (m, t, _) in enumerate(pairs):
                    map_rows.setdefault(id(m), []).append((method, t, k))
            cfs = [m for m in members if m.counterfactual is not None]
            if cfs and len(cfs) != len(members):
                raise InputError("a batch must have a counterfactual for every case or for none")
            if cfs:
                arrays[f"{key}/counterfactual"] = np.stack([m.counterfactual["x"] for m in members]).astype(np.float32)
                editable = [m.counterfactual.get("editable") for m in members]
                if any(e is not None for e in editable):  # the region each search could change (None: all of it)
                    shape = next(e for e in editable if e is not None).shape
                    arrays[f"{key}/editable"] = np.stack([e if e is not None else np.ones(shape, bool)
                                                          for e in editable]).astype(bool)
            for j, m in enumerate(members):
                where[id(m)] = (key, j)
        file = self._save_arrays(arrays) if arrays else None
        now = time.time()
        with self.db:
            for r in results:
                group, row = where.get(id(r), (None, None))
                c = r.case
                self.db.execute(
                    "INSERT OR REPLACE INTO cases (case_id, file, label, label_name, prediction, prediction_name,"
                    " probability, probs, status, error, array_file, array_group, array_row, has_mask, written,"
                    " labels, targets) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (text_of(c.id), text_of(c.file), c.label, text_of(c.label_name), r.prediction, r.prediction_name,
                     max(r.probs) if r.probs else None, json.dumps([float(p) for p in r.probs]) if r.probs else None,
                     r.status, text_of(r.error), file if group else None, group, row, int(r.mask is not None), now,
                     json.dumps([int(v) for v in c.findings]) if c.findings is not None else None,
                     json.dumps([int(t) for t in r.explained]) if r.explained is not None else None))
                for method, target, map_row in map_rows.get(id(r), ()):
                    self.db.execute(
                        "INSERT OR REPLACE INTO maps VALUES (?,?,?,?,?,?,?,?)",
                        (c.id, method, target, float(r.seconds.get(method, 0.0)), file, group, map_row, now))
                for method, reason in r.skipped.items():
                    self.db.execute("INSERT OR REPLACE INTO skipped VALUES (?,?,?,?)",
                                    (c.id, method, text_of(reason), now))
                if r.counterfactual is not None:
                    cf = r.counterfactual
                    d = cf["distance"]
                    self.db.execute(
                        "INSERT OR REPLACE INTO counterfactuals (case_id, target, target_name, valid, reason, lam,"
                        " iterations, l0, l1, l2, linf, probs_before, probs_after, seconds, nearest_train_distance,"
                        " im1, array_file, array_group, array_row, written) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                        (c.id, int(cf["target"]), cf.get("target_name"), int(bool(cf["valid"])), cf.get("reason") or "",
                         _num(cf.get("lam")), cf.get("iterations"), _num(d.get("l0")), _num(d.get("l1")),
                         _num(d.get("l2")), _num(d.get("linf")), json.dumps([float(v) for v in cf["probs_before"]]),
                         json.dumps([float(v) for v in cf["probs_after"]]), _num(cf.get("seconds")),
                         _num(cf.get("nearest_train_distance")), _num(cf.get("im1")), file, group, row, now))
                    acts = cf.get("activations")        # the layer activation change (None: not computed)
                    if acts is not None:
                        self.db.execute(
                            "INSERT OR REPLACE INTO activations (case_id, target, layers, selection, skipped, written)"
                            " VALUES (?,?,?,?,?,?)",
                            (c.id, int(cf["target"]), json.dumps(acts.get("layers") or []), text_of(acts.get("selection")),
                             text_of(acts.get("skipped")), now))
        return len(results)

    def write_metrics(self, rows) -> int:
        """``rows``: ``(case_id, method, metric, value)`` or, for the map of one finding of a
        multi-label case, ``(case_id, method, metric, value, target)``; NaN is stored as NULL. One
        transaction."""
        now = time.time()
        with self.db:
            self.db.executemany(
                "INSERT OR REPLACE INTO metrics (case_id, method, metric, value, written, target) VALUES (?,?,?,?,?,?)",
                [(str(r[0]), str(r[1]), str(r[2]), _num(r[3]), now, int(r[4]) if len(r) > 4 and r[4] is not None
                  else None) for r in rows])
        return len(rows)

    def write_tabular(self, records: list[dict]) -> int:
        """Tabular counterfactual rows (each a dict with ``row_index`` and ``rank``); one transaction."""
        now = time.time()
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO tabular_counterfactuals VALUES (?,?,?,?)",
                                [(int(r["row_index"]), int(r["rank"]), json.dumps(r, default=_json_default), now)
                                 for r in records])
        return len(records)


def _num(v):
    if v is None:
        return None
    v = float(v)
    return None if math.isnan(v) else v


def _json_default(v):
    if isinstance(v, np.generic):
        return v.item()
    raise TypeError(f"{type(v).__name__} is not JSON serialisable")
