"""The run directory: ``run.yaml``, ``results.sqlite`` and ``arrays/``.

Results are written as work completes: an image's arrays are written to their files first (each
through a temporary name and an atomic rename), then its rows go into SQLite in one transaction.
A run killed at any point therefore never holds a half-written row, and a re-run skips the
images already done.
"""
from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import numpy as np
import yaml

from ..errors import InputError

SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY,
    path TEXT UNIQUE NOT NULL,
    name TEXT NOT NULL,
    label INTEGER,
    label_name TEXT,
    prediction INTEGER,
    prediction_name TEXT,
    probability REAL,
    probs TEXT,
    status TEXT NOT NULL,
    error TEXT,
    image_file TEXT,
    mask_file TEXT
);
CREATE TABLE IF NOT EXISTS attributions (
    image_id INTEGER NOT NULL REFERENCES images(id),
    method TEXT NOT NULL,
    target INTEGER NOT NULL,
    seconds REAL NOT NULL,
    array_file TEXT NOT NULL,
    PRIMARY KEY (image_id, method)
);
CREATE TABLE IF NOT EXISTS counterfactuals (
    image_id INTEGER NOT NULL REFERENCES images(id),
    target INTEGER NOT NULL,
    target_name TEXT,
    valid INTEGER NOT NULL,
    reason TEXT,
    lam REAL,
    iterations INTEGER,
    l0 REAL, l1 REAL, l2 REAL, linf REAL,
    probs_before TEXT,
    probs_after TEXT,
    seconds REAL,
    array_file TEXT NOT NULL,
    nearest_train_distance REAL,
    PRIMARY KEY (image_id, target)
);
"""
# columns added after a table's first release: (table, column, SQL type); older run directories
# get them on opening
ADDED_COLUMNS = [("counterfactuals", "nearest_train_distance", "REAL")]


class RunStore:
    """Read and write one run directory.

    >>> store = RunStore("RUN")            # creates RUN/, RUN/arrays/, RUN/results.sqlite
    >>> store.write_spec({...})             # RUN/run.yaml
    """

    def __init__(self, root, *, create: bool = True):
        self.root = Path(root)
        if not create and not (self.root / "results.sqlite").exists():
            raise InputError(f"{self.root} is not a counterlens run directory (no results.sqlite); "
                             "create one with `counterlens explain ... --out DIR`")
        self.arrays = self.root / "arrays"
        self.arrays.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.root / "results.sqlite")
        self.db.row_factory = sqlite3.Row
        self.db.executescript(SCHEMA)
        for table, column, kind in ADDED_COLUMNS:
            have = {r["name"] for r in self.db.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                with self.db:
                    self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

    def close(self) -> None:
        self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- spec ------------------------------------------------------------------------------------
    def write_spec(self, spec: dict) -> Path:
        path = self.root / "run.yaml"
        _atomic_write(path, yaml.safe_dump(spec, sort_keys=False).encode())
        return path

    def read_spec(self) -> dict:
        path = self.root / "run.yaml"
        return yaml.safe_load(path.read_text()) if path.exists() else {}

    # -- writing ---------------------------------------------------------------------------------
    def save_array(self, relpath: str, array: np.ndarray) -> str:
        """Save ``array`` as float16 ``.npy`` under ``arrays/`` (atomically); returns the relative path."""
        path = self.arrays / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:
            np.save(fh, np.asarray(array, dtype=np.float16))
        os.replace(tmp, path)
        return str(Path("arrays") / relpath)

    def record_image(self, *, path: str, name: str, label: int | None, label_name: str | None,
                     prediction: int | None = None, prediction_name: str | None = None,
                     probs: list[float] | None = None, status: str = "done", error: str | None = None,
                     image: np.ndarray | None = None, mask: np.ndarray | None = None,
                     attributions: dict[str, tuple[np.ndarray, int, float]] | None = None) -> int:
        """Write one image and its attributions ``{method: (map, target, seconds)}`` in one transaction."""
        existing = self.db.execute("SELECT id FROM images WHERE path = ?", (path,)).fetchone()
        image_id = existing["id"] if existing else self._next_id()
        image_file = self.save_array(f"images/{image_id}.npy", image) if image is not None else None
        mask_file = self.save_array(f"masks/{image_id}.npy", mask) if mask is not None else None
        files = {m: self.save_array(f"{m}/{image_id}.npy", a) for m, (a, _, _) in (attributions or {}).items()}
        probability = max(probs) if probs else None
        with self.db:   # one transaction
            if attributions is not None:
                self.db.execute("DELETE FROM attributions WHERE image_id = ?", (image_id,))
            self.db.execute(
                "INSERT OR REPLACE INTO images (id, path, name, label, label_name, prediction, prediction_name,"
                " probability, probs, status, error, image_file, mask_file) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (image_id, path, name, label, label_name, prediction, prediction_name, probability,
                 json.dumps(probs) if probs is not None else None, status, error, image_file, mask_file))
            for method, (_, target, seconds) in (attributions or {}).items():
                self.db.execute("INSERT INTO attributions VALUES (?,?,?,?,?)",
                                (image_id, method, int(target), float(seconds), files[method]))
        return image_id

    def record_counterfactuals(self, image_id: int, rows: list[dict]) -> None:
        """Write an image's counterfactuals in one transaction, arrays first.

        Each row: ``target``, ``target_name``, ``valid``, ``reason``, ``lam``, ``iterations``,
        ``distance`` (``{"l0", "l1", "l2", "linf"}``), ``probs_before``, ``probs_after``,
        ``seconds``, ``x`` (the counterfactual, ``[C, *spatial]``) and optionally
        ``nearest_train_distance`` (L2 to the closest training image of the target class).
        """
        files = [self.save_array(f"counterfactuals/{image_id}_{int(r['target'])}.npy", r["x"]) for r in rows]
        with self.db:
            self.db.execute("DELETE FROM counterfactuals WHERE image_id = ?", (image_id,))
            for r, file in zip(rows, files):
                d = r["distance"]
                self.db.execute(
                    "INSERT INTO counterfactuals (image_id, target, target_name, valid, reason, lam, iterations,"
                    " l0, l1, l2, linf, probs_before, probs_after, seconds, array_file, nearest_train_distance)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (image_id, int(r["target"]), r.get("target_name"), int(bool(r["valid"])), r.get("reason") or "",
                     float(r["lam"]), int(r["iterations"]), float(d["l0"]), float(d["l1"]), float(d["l2"]),
                     float(d["linf"]), json.dumps([float(v) for v in r["probs_before"]]),
                     json.dumps([float(v) for v in r["probs_after"]]), float(r.get("seconds", 0.0)), file,
                     None if r.get("nearest_train_distance") is None else float(r["nearest_train_distance"])))

    def counterfactual_done(self) -> set[str]:
        """Paths whose counterfactuals are written (skipped when a run resumes)."""
        rows = self.db.execute("SELECT DISTINCT i.path FROM images i JOIN counterfactuals c ON c.image_id = i.id")
        return {r["path"] for r in rows}

    def counterfactuals(self, image_id: int) -> list[dict]:
        rows = self.db.execute("SELECT * FROM counterfactuals WHERE image_id = ? ORDER BY target", (image_id,))
        return [dict(r) for r in rows]

    def image_id(self, path: str) -> int | None:
        row = self.db.execute("SELECT id FROM images WHERE path = ?", (path,)).fetchone()
        return None if row is None else int(row["id"])

    def _next_id(self) -> int:
        row = self.db.execute("SELECT COALESCE(MAX(id), 0) + 1 AS n FROM images").fetchone()
        return int(row["n"])

    # -- reading ---------------------------------------------------------------------------------
    def completed(self, methods) -> set[str]:
        """Paths whose image and every one of ``methods`` are done (skipped when a run resumes)."""
        rows = self.db.execute(
            "SELECT i.path, COUNT(a.method) AS n FROM images i LEFT JOIN attributions a ON a.image_id = i.id "
            f"AND a.method IN ({','.join('?' * len(methods))}) WHERE i.status = 'done' GROUP BY i.id",
            list(methods)).fetchall()
        return {r["path"] for r in rows if r["n"] == len(methods)}

    def images(self) -> list[dict]:
        return [dict(r) for r in self.db.execute("SELECT * FROM images ORDER BY id")]

    def attributions(self, image_id: int) -> dict[str, dict]:
        rows = self.db.execute("SELECT * FROM attributions WHERE image_id = ? ORDER BY rowid", (image_id,))
        return {r["method"]: dict(r) for r in rows}

    def method_seconds(self) -> dict[str, float]:
        """Mean seconds per image for each method."""
        rows = self.db.execute("SELECT method, AVG(seconds) AS s FROM attributions GROUP BY method ORDER BY MIN(rowid)")
        return {r["method"]: r["s"] for r in rows}

    def load_array(self, relpath: str | None) -> np.ndarray | None:
        return None if relpath is None else np.load(self.root / relpath).astype(np.float32)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
