"""What a run directory holds, and the one place that knows its layout and schema.

```
RUN/run.yaml                  the resolved spec (model + hash, data, methods and parameters, ...)
RUN/index/<writer>.sqlite     one index shard per writing process: case rows, map rows,
                              counterfactual rows, metric rows (each process writes only its own)
RUN/arrays/<writer>/<n>.npz   one file per written batch: images, masks, maps, counterfactuals
RUN/claims/<batch>            which process is working on which batch (advisory; see claims.py)
RUN/report.html | report/     the report; results.csv, metrics.csv, ... (exports)
```

A case is identified by its path relative to the data root (``glioma/x.png``), never by a counter,
so writers on many processes or machines cannot collide. Every batch is written arrays first
(a temporary name, then an atomic rename), then its rows in one SQLite transaction: a process
killed at any moment leaves no half row, at most an unreferenced array file.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import yaml

from ...errors import InputError

# Tables and columns added since (e.g. ``activations``) leave it as is: a shard written before
# lacks them and reads as empty (see ``merged.merged``), so an older run still opens and resumes.
SCHEMA_VERSION = 2
SPEC_FILE = "run.yaml"
INDEX_DIR = "index"
ARRAYS_DIR = "arrays"
CLAIMS_DIR = "claims"

SCHEMA = """
CREATE TABLE IF NOT EXISTS cases (
    case_id TEXT PRIMARY KEY,      -- path relative to the data root: the case's identity
    file TEXT NOT NULL,            -- the file as read
    label INTEGER, label_name TEXT,
    prediction INTEGER, prediction_name TEXT,
    probability REAL,              -- of the predicted class
    probs TEXT,                    -- JSON list, one per class
    status TEXT NOT NULL,          -- done | failed
    error TEXT,
    array_file TEXT, array_group TEXT, array_row INTEGER,
    has_mask INTEGER NOT NULL DEFAULT 0,
    written REAL NOT NULL,
    labels TEXT,                   -- multi-label: JSON list, 1 / 0 / -1 (unknown) per finding
    targets TEXT                   -- multi-label all-positive: JSON list of the findings explained ([]: none)
);
CREATE TABLE IF NOT EXISTS maps (
    case_id TEXT NOT NULL, method TEXT NOT NULL,
    target INTEGER NOT NULL, seconds REAL NOT NULL,
    array_file TEXT NOT NULL, array_group TEXT NOT NULL, array_row INTEGER NOT NULL,
    written REAL NOT NULL,
    PRIMARY KEY (case_id, method, target)    -- multi-label: a map per finding explained
);
CREATE TABLE IF NOT EXISTS skipped (
    case_id TEXT NOT NULL, method TEXT NOT NULL,
    reason TEXT NOT NULL,          -- why the method could not run on this model (the others' maps are kept)
    written REAL NOT NULL,
    PRIMARY KEY (case_id, method)
);
CREATE TABLE IF NOT EXISTS counterfactuals (
    case_id TEXT NOT NULL, target INTEGER NOT NULL, target_name TEXT,
    valid INTEGER NOT NULL, reason TEXT, lam REAL, iterations INTEGER,
    l0 REAL, l1 REAL, l2 REAL, linf REAL,
    probs_before TEXT, probs_after TEXT, seconds REAL,
    nearest_train_distance REAL, im1 REAL,
    array_file TEXT NOT NULL, array_group TEXT NOT NULL, array_row INTEGER NOT NULL,
    written REAL NOT NULL,
    PRIMARY KEY (case_id, target)
);
CREATE TABLE IF NOT EXISTS activations (
    case_id TEXT NOT NULL, target INTEGER NOT NULL,   -- the counterfactual's case and target
    layers TEXT,                   -- JSON list in execution order: name, module, shape, relative_change,
                                   -- mean_abs_change, top_channels ([[channel, mean |change|], ...])
    selection TEXT,                -- which layers (e.g. "the model's 9 leaf modules with parameters or ...")
    skipped TEXT,                  -- why there are none (the model's layers cannot be observed); NULL if computed
    written REAL NOT NULL,
    PRIMARY KEY (case_id, target)
);
CREATE TABLE IF NOT EXISTS metrics (
    case_id TEXT NOT NULL, method TEXT NOT NULL, metric TEXT NOT NULL, value REAL,
    written REAL NOT NULL,
    target INTEGER,                -- multi-label: the finding whose map was scored (NULL: the case's one map)
    PRIMARY KEY (case_id, method, metric, target)
);
CREATE TABLE IF NOT EXISTS tabular_counterfactuals (
    row_index INTEGER NOT NULL, rank INTEGER NOT NULL,
    record TEXT NOT NULL,          -- JSON object: the row's columns
    written REAL NOT NULL,
    PRIMARY KEY (row_index, rank)
);
"""
# the key columns of each table: rows of the same key in several shards are one row (the newest wins)
KEYS = {"cases": ["case_id"], "maps": ["case_id", "method", "target"], "skipped": ["case_id", "method"],
        "counterfactuals": ["case_id", "target"], "activations": ["case_id", "target"],
        "metrics": ["case_id", "method", "target", "metric"], "tabular_counterfactuals": ["row_index", "rank"]}


def writer_name() -> str:
    """A name no other process (here or on another machine) will pick: host, pid, random."""
    host = "".join(c if c.isalnum() or c in "-_" else "_" for c in os.uname().nodename)[:40] or "host"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a name of this process only, then rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:6]}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def is_run_dir(root: Path) -> bool:
    return (root / SPEC_FILE).is_file() or (root / INDEX_DIR).is_dir()


def read_spec(root: Path) -> dict:
    path = Path(root) / SPEC_FILE
    if not path.exists():
        return {}
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"{path} cannot be read ({exc}); repair it or start a new --out directory") from exc
    return spec if isinstance(spec, dict) else {}


def write_spec(root: Path, spec: dict) -> Path:
    path = Path(root) / SPEC_FILE
    atomic_write(path, yaml.safe_dump(spec, sort_keys=False, allow_unicode=True).encode("utf-8"))
    return path


def spec_differences(old, new, prefix: str = "") -> list[str]:
    """Human-readable differences between two spec sections (``methods.integrated_gradients.steps:
    8 in the run, 16 now``), keys in order."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in list(old) + [k for k in new if k not in old]:
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in new:
                out.append(f"{name}: {old[key]!r} in the run, not given now")
            elif key not in old:
                out.append(f"{name}: not in the run, {new[key]!r} now")
            else:
                out += spec_differences(old[key], new[key], name)
        return out
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        old, new = list(old), list(new)
    return [] if old == new else [f"{prefix}: {old!r} in the run, {new!r} now"]
