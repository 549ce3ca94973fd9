"""What runs in the Ray engine's actors (:mod:`counterlens.runs.engines.ray`): the actor class that
builds the classifier once and calls the work per batch descriptor, and the work of an explain or
counterfactual run (claim, read, compute, write, mark done). Imported by the actors, never by
anything that needs Ray itself: this module does not import ``ray``.
"""
from __future__ import annotations

import os
import pickle
import sqlite3
import time
from dataclasses import dataclass, field, replace

import numpy as np

from ...errors import CounterlensError
from .. import pipeline
from ..store import Claims, ShardWriter
from .local import Job


def _on_device(clf, device: str):
    """A pickled classifier moved to this actor's device."""
    import torch
    dev = torch.device(device)
    if clf.device != dev:
        clf.device = dev
        for part in (clf.module, clf.preprocess):
            if isinstance(part, torch.nn.Module):
                part.to(dev)
    return clf


class Actor:
    """One actor of the pool: the classifier built once, then ``work(clf, payload)`` per descriptor.

    An error of the work (or of building the classifier) is caught and sent back as the result
    (``{"error": ...}``, otherwise ``{"value": ...}``): it would be the same on a retry, and the
    driver ends the run with it in one line. Only a crash of the process (killed, out of memory)
    is left to Ray, which restarts the actor and gives it the batch again.
    """

    def __init__(self, model: dict, work, threads: int, device: str, cwd: str):
        self.work, self.clf, self.failed = work, None, None
        try:
            import torch
            torch.set_num_threads(threads)
            if cwd and os.path.isdir(cwd):             # relative data paths mean what they meant to the driver
                os.chdir(cwd)
            if "classifier" in model:
                self.clf = _on_device(model["classifier"], device)
            else:
                from ..worker import load_classifier
                self.clf = load_classifier(model["bytes"], device=device, sha256=model["sha256"], **model["kwargs"])
        except Exception as exc:                       # noqa: BLE001 - sent back with the first batch
            self.failed = caught(exc)

    def __call__(self, batch: dict) -> dict:
        results = []
        for payload in batch["payload"]:
            if self.failed is not None:
                result = self.failed
            else:
                try:
                    result = {"value": self.work(self.clf, pickle.loads(payload))}
                except Exception as exc:               # noqa: BLE001 - sent back to the driver
                    result = caught(exc)
            results.append(pickle.dumps(result, protocol=5))
        return {"index": np.asarray(batch["index"]), "result": np.array(results, dtype=object)}


def caught(exc: Exception) -> dict:
    """An exception as a result: itself when it is ours or the system's (and pickles), else its text
    and traceback."""
    import traceback
    if isinstance(exc, (CounterlensError, OSError, MemoryError, sqlite3.Error)):
        try:
            pickle.loads(pickle.dumps(exc))
            return {"error": exc}
        except Exception:                              # noqa: BLE001 - not picklable: as text
            pass
    said = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return {"error": None, "text": f"{type(exc).__name__}: {said[0] if said else ''}",
            "traceback": traceback.format_exc()}


class JobClaims(Claims):
    """Claims of one Ray run: a claim held by another actor of the same run is stale (Ray gives a
    batch to one actor at a time and again only when that one failed: its actor died)."""

    def __init__(self, root, stage: str, *, since: float, token: str):
        super().__init__(root, stage, since=since)
        self.me = {**self.me, "job": token}

    def stale(self, key: str) -> bool:
        holder = self._holder(key)
        if holder and not holder.get("done") and holder.get("job") == self.me["job"]:
            return True
        return super().stale(key)


@dataclass
class RunBatch:
    """The work of an explain or counterfactual run, per batch: claim, read, compute, write, mark done."""

    root: str
    job: Job
    map_dtype: str
    listed: float
    token: str
    _state: dict = field(default_factory=dict, repr=False)

    def __call__(self, clf, payload) -> dict:
        key, cases = payload
        if not self._state:
            self._state.update(writer=ShardWriter(self.root, map_dtype=self.map_dtype),
                               claims=JobClaims(self.root, self.job.stage, since=self.listed, token=self.token),
                               job=_job_on(self.job, clf.device))
        writer, claims, job = self._state["writer"], self._state["claims"], self._state["job"]
        while not claims.claim(key):
            if claims.is_done(key):              # another command on the same run did it
                return {"done": 0, "failures": [], "others": len(cases)}
            time.sleep(0.2)
        results = job.run(clf, pipeline.read_batch(cases, job.read))
        writer.write(results)
        claims.mark_done(key)
        return {"done": sum(r.status == "done" for r in results), "others": 0,
                "failures": [(r.case.id, r.error) for r in results if r.status != "done"]}


def _job_on(job: Job, device) -> Job:
    """The job with its tensors and modules (a counterfactual's prior, prototypes) on ``device``."""
    import torch
    if not job.params or torch.device(device).type == "cpu":
        return job
    params = {k: v.to(device) if isinstance(v, (torch.Tensor, torch.nn.Module)) else v for k, v in job.params.items()}
    return replace(job, params=params)
