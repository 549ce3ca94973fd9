"""Advisory claims: which process works on which batch, so that several processes writing the
same run (``--workers``, two commands on one ``--out``, cluster workers) split the work.

A claim is a file ``claims/<stage>-<batch>`` created with ``O_EXCL`` holding the claimer's host,
pid and process start time; once the batch is committed it is marked done with the time (and
stays, so a process that listed its work before that time does not redo it; a process that
listed its work later knows from the index what is done, and ignores older marks, so failed
files are tried again on every re-run). A claim is stale (and may be taken
over) when its process is gone: on this host, no live process with that pid and start time; on
another host, the file is older than ``lease`` seconds. Claims only save work: correctness never
depends on them, since a batch done twice is written twice with the same case ids and readers
keep one row per case.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .layout import CLAIMS_DIR


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    if fields and fields[0] in ("Z", "X"):           # a zombie: killed, not yet reaped
        return None
    return fields[19] if len(fields) > 19 else ""


def _alive(pid: int, start: str | None) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    now = _start_time(pid)
    if now is None:
        return Path("/proc").is_dir() is False      # no /proc (not Linux): trust kill(0)
    return start is None or now == start


class Claims:
    def __init__(self, root, stage: str, *, since: float = 0.0, lease: float = 1800.0):
        """``since``: when the caller read the index to list its work; done marks from before
        that are already in what it listed and do not count."""
        self.dir = Path(root) / CLAIMS_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self.stage, self.lease, self.since = stage, lease, since
        self.me = {"host": os.uname().nodename, "pid": os.getpid(), "start": _start_time(os.getpid())}
        self.held: set[str] = set()      # claims this object took (others of this process are leftovers)

    def _path(self, key: str) -> Path:
        return self.dir / f"{self.stage}-{key}"

    def claim(self, key: str) -> bool:
        """Take the batch ``key``; False when a live process holds it or it is done."""
        path = self._path(key)
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder(key)
                if self.is_done(key) or (not (holder or {}).get("done") and not self.stale(key)):
                    return False
                path.unlink(missing_ok=True)         # its holder is gone: take it over
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(self.me, fh)
            self.held.add(key)
            return True
        return False

    def is_done(self, key: str) -> bool:
        holder = self._holder(key)
        return bool(holder and holder.get("done") and float(holder.get("time", 0)) >= self.since)

    def held_by_me(self, key: str) -> bool:
        holder = self._holder(key)
        return bool(holder) and {k: holder.get(k) for k in self.me} == self.me and not holder.get("done")

    def _holder(self, key: str) -> dict | None:
        try:
            return json.loads(self._path(key).read_text())
        except (OSError, ValueError):
            return None

    def stale(self, key: str) -> bool:
        path = self._path(key)
        holder = self._holder(key)
        if holder is None:
            try:                                    # half-written by a process killed while claiming
                return time.time() - path.stat().st_mtime > 5
            except OSError:
                return True
        if holder.get("host") == self.me["host"]:
            if {k: holder.get(k) for k in self.me} == self.me:
                return key not in self.held        # this process, from an earlier call that failed
            return not _alive(int(holder.get("pid", -1)), holder.get("start"))
        try:
            return time.time() - path.stat().st_mtime > self.lease
        except OSError:
            return True

    def mark_done(self, key: str) -> None:
        """After the batch is committed: mark it done (through a rename, never half written)."""
        path = self._path(key)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**self.me, "done": True, "time": time.time()}))
        os.replace(tmp, path)
