"""The Ray engine: the same pipeline stages as the local engine, on a Ray cluster, through Ray Data.

The driver (the process that runs the command) lists the cases and cuts them into the same fixed
batches as the local engine (:func:`~counterlens.runs.engines.local.pending_batches`: the same
batch keys; done batches are skipped), and makes a Ray dataset with one small descriptor per
batch (its key and its cases: ids, file names, labels). ``map_batches`` hands the descriptors to
an actor pool: ``workers`` actors, each reserving ``cpus_per_worker`` CPUs and
``gpus_per_worker`` GPUs (fractions allowed, so several small models share a GPU). Each actor
builds the classifier once (from the model's bytes, sent by the driver, with the same safety
checks as :func:`~counterlens.loading.load_model`) and opens its own index shard; then, per
batch, it claims the batch, reads and decodes its files with counterlens' own readers (DICOM
LUTs, NIfTI orientation, 16-bit PNG: :func:`~counterlens.runs.pipeline.read_batch`), runs the
job, writes the results into its shard, marks the claim done and returns a few numbers (cases
done, failures) from which the driver's progress bar counts over all workers. The run directory
must be on a filesystem that every node sees under the same path; ``open_run``, the report and a
resumed run (with either engine) read it as any other.

Faults: Ray Data restarts an actor that died (``max_restarts=-1``) and runs its batches again
(``max_task_retries=-1``); the new actor takes over the claim of the dead one at once (a claim
held by an actor of the same run: Ray gives a batch to one actor at a time, so its holder
failed), and claims of other processes (another command on the same ``--out``) as in the
local engine. A batch written twice is one row per case (:func:`~counterlens.runs.store.open_run`).
When the driver dies, Ray stops its actors; what they wrote stays, and the same command resumes.
"""
from __future__ import annotations

import logging
import math
import os
import pickle
import sqlite3
import time
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm.auto import tqdm

from ...errors import CounterlensError, InputError, RunFailedError
from ..store import open_run
from .local import Job, RunSummary, pending_batches
from .ray_actor import Actor, RunBatch

RAY_REQUIREMENT = "ray[data]>=2.40,<3"
RAY_MISSING = (f"--engine ray needs Ray, which is not installed: pip install 'counterlens[ray]' "
               f"(that is {RAY_REQUIREMENT})")


def require_ray():
    """The ``ray`` module (with Ray Data), or an :class:`InputError` that says what to install."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        if (exc.name or "").split(".")[0] == "ray":
            raise InputError(RAY_MISSING) from None
        raise InputError(f"{RAY_MISSING}; Ray is there but cannot be imported: {exc}") from None
    return ray


@dataclass
class RaySummary(RunSummary):
    startup: float = 0.0        #: seconds to start or join the cluster (in ``seconds`` too)
    first_result: float = 0.0   #: seconds from the cluster being up to the first batch back (actors, model loaded)


@dataclass
class RayEngine:
    """Where and how a run goes on Ray.

    ``address``: a cluster to join (``ray://host:10001``, ``host:6379``, ``auto``); default:
    ``RAY_ADDRESS`` when set, else a cluster started on this machine with its cores (and shut
    down at the end). A process that has already called ``ray.init`` uses that cluster.
    ``workers``: actors (default: the cluster's CPUs / ``cpus_per_worker``, or its GPUs /
    ``gpus_per_worker``, at most one per batch). ``cpus_per_worker`` (default 1) and
    ``gpus_per_worker`` (default: 1 when the cluster has GPUs and the model's device is not
    ``cpu``, else 0; 0.25 puts four actors on one GPU) are what each actor reserves; ``threads``:
    torch threads per actor (default: its whole CPUs, at least 1).

    ``model``: how the actors build the classifier: keyword arguments of
    :func:`counterlens.runs.worker.load_classifier` with ``source`` the model's path (``factory``,
    ``trust_model_file``, ``classes``, ``logits_output``, ``device``). The driver reads the model
    and sends its bytes, so the nodes need not see it. Without ``model`` the driver's classifier
    itself is pickled to the actors (its module's class must be importable there).
    """

    address: str | None = None
    workers: int | None = None
    cpus_per_worker: float = 1.0
    gpus_per_worker: float | None = None
    threads: int | None = None
    model: dict | None = None

    def __post_init__(self):
        for name in ("workers", "threads"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InputError(f"{name}={value!r}: give a positive number (or leave it out to fill the cluster)")
        for name, low in (("cpus_per_worker", 0.0), ("gpus_per_worker", 0.0)):
            value = getattr(self, name)
            if value is None and name == "gpus_per_worker":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < low or (name == "cpus_per_worker" and value == 0):
                raise InputError(f"{name.replace('_', '-')}={value!r}: give a number "
                                 f"{'above 0' if name == 'cpus_per_worker' else 'of 0 or more'} (fractions allowed)")

    # -- explain / counterfactual ---------------------------------------------------------------------
    def run(self, clf, cases, root, job: Job, *, images_per_batch: int = 16, progress: bool = True,
            map_dtype: str = "float32") -> RaySummary:
        """Run ``job`` over ``cases`` into the run directory ``root`` (prepared by
        :func:`~counterlens.runs.store.prepare_run`) on the cluster; resumes what is there."""
        pending_batches([], images_per_batch, set())           # the argument checked before the index is read
        start, listed = time.perf_counter(), time.time()
        todo, skipped = pending_batches(cases, images_per_batch, job.done(open_run(root)))
        bar = tqdm(total=len(cases), initial=skipped, desc=job.stage.replace("counterfactual", "counterfactuals")
                   .replace("explain", "explaining") + " (ray)", unit="img", disable=not progress)
        tally = {"done": 0, "failed": 0, "failures": []}

        def report(_, result: dict) -> None:
            failures = result["failures"]
            tally["done"] += result["done"]
            tally["failed"] += len(failures)
            tally["failures"] += failures[:max(0, 50 - len(tally["failures"]))]
            bar.update(result["done"] + len(failures) + result["others"])

        work = RunBatch(str(Path(root).resolve()), job, map_dtype, listed, uuid.uuid4().hex)
        try:
            used = (self.map(clf, todo, work, report) if todo else
                    {"workers": 0, "threads": 0, "startup": 0.0, "first_result": 0.0})
        finally:
            bar.close()
        return RaySummary(done=tally["done"], skipped=skipped, failed=tally["failed"],
                          seconds=time.perf_counter() - start, failures=tally["failures"], workers=used["workers"],
                          threads=used["threads"], startup=used["startup"], first_result=used["first_result"])

    # -- any work, one payload per task ------------------------------------------------------------------
    def map(self, clf, payloads: list, work, on_result) -> dict:
        """Call ``work(classifier, payload)`` on the actor pool for every payload (each actor builds
        the classifier once); ``on_result(index, result)`` runs on the driver as each one ends.
        ``work`` is pickled to every actor; whatever state it makes on its first call stays there.
        Returns ``{"workers", "threads", "startup", "first_result"}`` (seconds)."""
        device = self._requested_device(clf)
        t0 = time.perf_counter()
        with self._connected() as ray:
            startup = time.perf_counter() - t0
            workers, gpus = self._plan(ray, len(payloads), device)
            threads = self.threads or max(1, int(self.cpus_per_worker))
            model = self._worker_model(clf)
            rows = [{"index": i, "payload": pickle.dumps(p, protocol=5)} for i, p in enumerate(payloads)]
            ds = ray.data.from_items(rows, override_num_blocks=len(rows))    # a block per batch: spread evenly
            options = dict(batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=workers),
                           num_cpus=self.cpus_per_worker,
                           fn_constructor_kwargs=dict(model=model, work=work, threads=threads,
                                                      device="cuda" if gpus else "cpu", cwd=os.getcwd()))
            if gpus:
                options["num_gpus"] = gpus
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)   # Ray's named retry arguments, while it takes them
                ds = ds.map_batches(Actor, **options, **_retries(ds.map_batches))
            first, failed = None, None
            try:
                for row in ds.iter_rows():
                    first = first or time.perf_counter() - t0 - startup
                    result = pickle.loads(row["result"])
                    if "error" in result:                # stop at the first: the other actors stop with the dataset
                        failed = result
                        break
                    on_result(int(row["index"]), result["value"])
            except Exception as exc:                     # noqa: BLE001 - Ray's own failures
                raise _worker_error(exc) from None
            if failed is not None:
                raise _raised_in_worker(failed)
        return {"workers": workers, "threads": threads, "startup": startup, "first_result": first or 0.0}

    # -- the cluster ----------------------------------------------------------------------------------
    @contextmanager
    def _connected(self):
        ray = require_ray()
        started = False
        if not ray.is_initialized():
            address = self.address or os.environ.get("RAY_ADDRESS") or "local"
            kwargs = dict(logging_level=logging.WARNING, log_to_driver=False)
            if address == "local":
                kwargs.update(num_cpus=_cores(), include_dashboard=False)
                token_note = logging.getLogger("ray._private.authentication.authentication_token_setup")
                if _not_about_our_settings not in token_note.filters:
                    token_note.addFilter(_not_about_our_settings)
            try:
                ray.init(address=address, **kwargs)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                what = "start a local Ray cluster" if address == "local" else f"join the Ray cluster at {address}"
                said = str(exc).strip().splitlines()
                raise InputError(f"cannot {what}: {said[0] if said else type(exc).__name__}; pass --ray-address of a "
                                 "running cluster (or unset RAY_ADDRESS to start one here)") from None
            started = True
        _quiet_ray_data()
        try:
            yield ray
        finally:
            if started:
                ray.shutdown()

    def _requested_device(self, clf) -> str:
        wanted = (self.model or {}).get("device")
        return str(wanted) if wanted not in (None, "auto") else ("auto" if self.model else str(clf.device))

    def _plan(self, ray, n_batches: int, device: str) -> tuple[int, float]:
        resources = ray.cluster_resources()
        cpus, gpus_there = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
        gpus = self.gpus_per_worker
        if gpus is None:
            gpus = 1.0 if gpus_there and not device.startswith("cpu") else 0.0
            if device.startswith("cuda") and not gpus_there:
                raise InputError(f"device {device} asked for, but the Ray cluster has no GPU; pass --device cpu or "
                                 "join a cluster with GPUs")
        if gpus and not gpus_there:
            raise InputError(f"--gpus-per-worker {gpus:g}, but the Ray cluster has no GPU (it has {cpus:g} CPUs); "
                             "leave it out or join a cluster with GPUs")
        if self.cpus_per_worker > cpus:
            raise InputError(f"--cpus-per-worker {self.cpus_per_worker:g}, but the Ray cluster has {cpus:g} CPUs")
        if self.workers is not None:
            return max(1, min(self.workers, n_batches)), gpus
        fit = int(cpus // self.cpus_per_worker)
        if gpus:
            fit = min(fit, int(gpus_there // gpus))
        return max(1, min(fit, n_batches)), gpus

    def _worker_model(self, clf) -> dict:
        if self.model and self.model.get("source") is not None:
            from ..worker import pack_model
            kwargs = {k: v for k, v in self.model.items() if k not in ("source", "device")}
            return {"bytes": pack_model(self.model["source"]), "kwargs": kwargs,
                    "sha256": getattr(clf, "source_hash", None)}
        return {"classifier": clf}


def as_ray_engine(engine, workers: int | None = None, threads: int | None = None) -> RayEngine:
    """``"ray"`` or a :class:`RayEngine` -> a RayEngine, ``workers``/``threads`` filling what it leaves out."""
    if isinstance(engine, str) and engine == "ray":
        engine = RayEngine()
    if not isinstance(engine, RayEngine):
        raise InputError(f"engine={engine!r}: 'local' (this machine), 'ray' or a RayEngine(...)")
    require_ray()
    return replace(engine, workers=engine.workers or workers, threads=engine.threads or threads)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _retries(map_batches) -> dict:
    """Restart actors that die and retry their batches, for ever (Ray Data's own default for actor
    pools), said explicitly while ``map_batches`` takes Ray's remote arguments."""
    import inspect
    takes = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(map_batches).parameters.values())
    return {"max_restarts": -1, "max_task_retries": -1} if takes else {}


def _not_about_our_settings(record: logging.LogRecord) -> bool:
    """Leaves out Ray's notes on what this engine chose on purpose: its progress bars are off (the
    run has its own), and a cluster it starts for itself has token authentication."""
    return not record.getMessage().startswith(("Progress bars disabled", "Progress bars for operators disabled",
                                               "Token authentication is enabled"))


def _quiet_ray_data() -> None:
    """No Ray Data progress bars or execution banners: the driver shows one bar for the run.
    Ray Data's warnings (e.g. a cluster too small for the actors asked for) still show."""
    import ray.data
    ctx = ray.data.DataContext.get_current()
    for name in ("enable_progress_bars", "enable_operator_progress_bars", "print_on_execution_start"):
        if hasattr(ctx, name):
            setattr(ctx, name, False)
    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)
            if _not_about_our_settings not in handler.filters:
                handler.addFilter(_not_about_our_settings)


class WorkerTraceback(Exception):
    """Where an unexpected error was raised in a worker (its traceback, as text)."""


def _raised_in_worker(failed: dict) -> BaseException:
    """What an actor caught (see :class:`~counterlens.runs.engines.ray_actor.Actor`): our errors and the system's as themselves (the
    command says them in one line), anything else as a RunFailedError naming it."""
    if failed["error"] is not None:
        return failed["error"]
    err = RunFailedError(f"a Ray worker failed ({failed['text']}); results written so far are kept, re-run to resume "
                         "(--debug shows where)")
    err.__cause__ = WorkerTraceback(failed["traceback"])
    return err


def _worker_error(exc: BaseException) -> BaseException:
    """An error of Ray's (a worker lost for good, the cluster gone): the error inside it when it is
    ours or the system's, else a RunFailedError naming it."""
    seen, stack, innermost = set(), [exc], exc
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)
        if isinstance(cause, BaseException):          # RayTaskError: the exception raised in the worker
            stack.append(cause)
            innermost = cause
            continue
        if isinstance(e, (CounterlensError, OSError, MemoryError, sqlite3.Error)) \
                and not type(e).__module__.startswith("ray"):
            return e
        stack += [n for n in (e.__cause__, e.__context__) if isinstance(n, BaseException)]
    said = [line for line in str(innermost).splitlines() if line.strip()]
    return RunFailedError(f"a Ray worker failed ({type(innermost).__name__}: {said[0].strip() if said else ''}); "
                          "results written so far are kept, re-run to resume (--debug shows where)")
