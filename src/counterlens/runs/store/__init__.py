"""The run directory's only owner: layout, schema, shards, ids, claims, resume and reading back.

No other module writes SQL or knows where files go in a run directory: they call
:func:`prepare_run` (create or resume, refusing other settings), :class:`ShardWriter` (write)
and :func:`open_run` (read).
"""
from __future__ import annotations

import shutil
from pathlib import Path

from ...errors import InputError
from .claims import Claims
from .layout import (ARRAYS_DIR, CLAIMS_DIR, INDEX_DIR, SCHEMA_VERSION, atomic_write, is_run_dir, read_spec,
                     spec_differences, write_spec)
from .reader import Run, open_run
from .writer import ShardWriter

__all__ = ["Claims", "Run", "RunMismatchError", "ShardWriter", "open_run", "prepare_run", "read_spec",
           "write_spec", "write_export", "DERIVED_FILES"]

# files a run directory may hold that a report or an export wrote (removed with --overwrite)
DERIVED_FILES = ("report.html", "results.csv", "metrics.csv", "metrics_summary.csv", "curves.json", "sanity.json",
                 "audit.json", "audit.md", "counterfactuals.csv")
DERIVED_DIRS = ("report", "figures")


class RunMismatchError(InputError):
    """A run directory holds results made with other settings than the ones given now."""


def prepare_run(root, spec: dict, *, compare: tuple[str, ...], section: str | None = None,
                overwrite: bool = False, force: bool = False, flag: str = "--overwrite") -> dict:
    """Create ``root`` as a run directory for ``spec``, or check that it holds the same run.

    ``compare``: the spec keys (dotted for nested ones, ``model.sha256``) that must be equal for
    results to be mixed (e.g. ``data``, ``target``, ``methods``); a difference raises :class:`RunMismatchError` naming it
    and the flag that starts over. ``section``: a key this command owns (e.g. ``counterfactual``)
    that is added to an existing spec of the same model and data. ``overwrite``: delete the old
    results first. A folder that is not a run and holds files is refused (it is not ours to fill)
    unless ``force`` (the run's files are then added beside the others, which stay untouched;
    a file of theirs named like a run's export, e.g. ``report.html``, is refused even then).
    Returns the spec as written.
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise InputError(f"--out {root} is a file; pass a folder for the run directory")
    if root.is_dir() and any(root.iterdir()) and not is_run_dir(root):
        clash = [n for n in ("run.yaml", *DERIVED_FILES, *DERIVED_DIRS, INDEX_DIR, ARRAYS_DIR) if (root / n).exists()]
        if not force or clash:
            raise InputError(f"--out {root} is a folder with other files in it, not a counterlens run; pass a new or "
                             "empty folder" + (f" (its {', '.join(clash)} would be overwritten)" if clash else
                                               ", or --force to add the run beside them"))
    if overwrite and is_run_dir(root):
        clear_run(root)
    root.mkdir(parents=True, exist_ok=True)
    previous = read_spec(root)
    spec = {**spec, "store_version": SCHEMA_VERSION}
    if previous:
        diffs = [d for key in compare if key.split(".")[0] in previous     # absent: nothing of it was done yet
                 for d in spec_differences(_get(previous, key), _get(spec, key), key)]
        if previous.get("store_version") != SCHEMA_VERSION:
            diffs.insert(0, f"store_version: {previous.get('store_version')!r} in the run (written by another "
                            f"counterlens version), {SCHEMA_VERSION} now")
        if diffs:
            shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
            raise RunMismatchError(f"{root} holds a run with other settings ({shown}); results are never mixed: "
                                   f"pass {flag} to delete them and start over, or a new --out directory")
        merged = dict(previous)
        for key, value in spec.items():
            if key == section or key not in merged:
                merged[key] = value
        spec = merged
    write_spec(root, spec)
    return spec


def write_export(root, name: str, content) -> Path:
    """Write one of the run's export files (``metrics.csv``, ``curves.json``, ...; see
    ``DERIVED_FILES``) atomically: text as is, anything else as JSON."""
    if name not in DERIVED_FILES:
        raise InputError(f"{name!r} is not an export of a run directory; one of {DERIVED_FILES}")
    import json
    text = content if isinstance(content, str) else json.dumps(content, indent=1, ensure_ascii=False)
    path = Path(root) / name
    atomic_write(path, text.encode("utf-8"))
    return path


def _get(spec: dict, dotted: str):
    for part in dotted.split("."):
        spec = spec.get(part) if isinstance(spec, dict) else None
    return spec


def clear_run(root) -> None:
    """Delete a run directory's results (index, arrays, claims, spec, derived files); other files stay."""
    root = Path(root)
    for name in (INDEX_DIR, ARRAYS_DIR, CLAIMS_DIR, *DERIVED_DIRS):
        shutil.rmtree(root / name, ignore_errors=True)
    for name in ("run.yaml", "results.sqlite", *DERIVED_FILES):
        (root / name).unlink(missing_ok=True)
