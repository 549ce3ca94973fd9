"""The local engine: the pipeline stages over a dataset on this machine.

The case list is cut into fixed batches (``images_per_batch`` consecutive cases), so a batch is
the same set of images whether the run goes through in one go or is resumed: results do not
depend on where a run was interrupted (a batch is written in one transaction, so it is either
all there or not at all). On a re-run, the cases not done yet of each batch are done: the whole
batch after a crash, only the failed files otherwise (they are tried again).

Work is spread over ``workers`` processes (forked, so they share the loaded model's memory) with
``threads`` torch threads each; every process claims batches (:class:`~counterlens.runs.store.
Claims`), reads the next one in a background thread while the model works on the current one,
and writes its own index shard. Two commands on the same run directory split the work the same
way. See :func:`plan_parallelism` for the defaults.
"""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import queue
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ...errors import CounterlensError, InputError, RunFailedError
from .. import pipeline
from ..records import Case, CaseResult
from ..store import Claims, ShardWriter, open_run


@dataclass
class Job:
    """What a run does with each batch: ``stage`` ``"explain"`` (``methods``, ``target``) or
    ``"counterfactual"`` (``target``, ``params``, optional ``train`` arrays). ``read``: keyword
    arguments of :func:`~counterlens.data.images.load_case`."""

    stage: str
    read: dict
    methods: dict | None = None
    target: object = "predicted"
    params: dict | None = None
    train: tuple | None = None

    def __post_init__(self):
        if self.stage not in ("explain", "counterfactual"):
            raise InputError(f"stage={self.stage!r}: 'explain' or 'counterfactual'")

    def run(self, clf, batch, tick=None) -> list[CaseResult]:
        """``tick``: called with a share of an image (images / methods) after each method of a batch."""
        if self.stage == "explain":
            methods = self.methods or {}
            on_method = (lambda n: tick(n / len(methods))) if tick is not None and methods else None
            return pipeline.explain_batch(clf, batch, methods, self.target, on_method=on_method)
        return pipeline.counterfactual_batch(clf, batch, self.target, self.params, self.train)

    def done(self, run) -> set[str]:
        return run.done_cases(list(self.methods or {})) if self.stage == "explain" else run.counterfactual_cases()


@dataclass
class RunSummary:
    done: int
    skipped: int
    failed: int
    seconds: float
    failures: list[tuple[str, str]] = field(default_factory=list)   #: (case, reason), the first 50
    workers: int = 1
    threads: int = 1


def plan_parallelism(device, n_batches: int, workers: int | None = None,
                     threads: int | None = None) -> tuple[int, int]:
    """``(workers, threads)`` for a run of ``n_batches`` batches.

    On a GPU: one worker (one model per device) and torch's threads. On the CPU: one
    single-threaded worker per core, at most one per batch (measured on a 2-core machine, 200
    images of 64x64, Grad-CAM + IG-32: 2 threads in one process 161-225 s, 1 thread 98 s, two
    1-thread workers 1.5x faster again; see BENCHMARKS.md). Either number may be given; the other
    then fills the cores.
    """
    for name, value in (("workers", workers), ("threads", threads)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InputError(f"{name}={value!r}: give a positive number (or leave it out to choose by the machine)")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if torch.device(device).type != "cpu":
        return workers or 1, threads or torch.get_num_threads()
    if workers is None:
        workers = max(1, min(cores // (threads or 1), n_batches))
    if threads is None:
        threads = max(1, cores // workers)
    return workers, threads


def batch_key(cases: list[Case]) -> str:
    return hashlib.sha1("\n".join(c.id for c in cases).encode("utf-8")).hexdigest()[:20]


def pending_batches(cases: list[Case], images_per_batch: int,
                    done: set[str]) -> tuple[list[tuple[str, list[Case]]], int]:
    """``([(batch key, cases not done yet)], cases skipped)``: ``cases`` cut into fixed batches of
    ``images_per_batch`` consecutive cases, each batch keyed by all its cases (so a batch and its
    key are the same on every run and in every engine), with the cases in ``done`` left out (a
    batch killed mid-way: all of it; otherwise its failed files) and empty batches dropped."""
    if isinstance(images_per_batch, bool) or not isinstance(images_per_batch, int) or images_per_batch < 1:
        raise InputError(f"images_per_batch={images_per_batch!r}: give a positive number of images")
    batches = [cases[i:i + images_per_batch] for i in range(0, len(cases), images_per_batch)]
    left = [[c for c in b if c.id not in done] for b in batches]
    todo = [(batch_key(b), b) for b in left if b]
    return todo, len(cases) - sum(len(b) for _, b in todo)


def run_local(clf, cases: list[Case], root, job: Job, *, images_per_batch: int = 16, workers: int | None = None,
              threads: int | None = None, progress: bool = True, map_dtype: str = "float32") -> RunSummary:
    """Run ``job`` over ``cases`` into the run directory ``root`` (prepared by
    :func:`~counterlens.runs.store.prepare_run`); resumes what is there."""
    pending_batches([], images_per_batch, set())           # the argument checked before the index is read
    start, listed = time.perf_counter(), time.time()
    todo, skipped = pending_batches(cases, images_per_batch, job.done(open_run(root)))
    workers, threads = plan_parallelism(clf.device, len(todo), workers, threads)
    bar = tqdm(total=len(cases), initial=skipped, desc=job.stage.replace("counterfactual", "counterfactuals")
               .replace("explain", "explaining"), unit="img", disable=not progress,
               bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} [{elapsed}<{remaining}]")
    tally = {"done": 0, "failed": 0, "failures": []}

    def report(n_done: int, failures: list[tuple[str, str]], ticked: float = 0.0) -> None:
        """A batch is written: its images, less the shares :func:`tick` already moved the bar by."""
        tally["done"] += n_done
        tally["failed"] += len(failures)
        tally["failures"] += failures[:max(0, 50 - len(tally["failures"]))]
        bar.update(n_done + len(failures) - ticked)

    def tick(share: float) -> None:          # one method of a batch is done: the bar moves within the batch
        bar.update(share)

    report.tick = tick

    try:
        if workers == 1 or len(todo) <= 1:
            saved = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                _work(clf, root, job, todo, map_dtype, report, listed)
            finally:
                torch.set_num_threads(saved)
            workers = 1
        else:
            _fork_workers(clf, root, job, todo, workers, threads, map_dtype, report, listed)
    finally:
        bar.close()
    return RunSummary(done=tally["done"], skipped=skipped, failed=tally["failed"],
                      seconds=time.perf_counter() - start, failures=tally["failures"], workers=workers,
                      threads=threads)


def _work(clf, root, job: Job, todo: list[tuple[str, list[Case]]], map_dtype: str, report, listed: float) -> None:
    """One process's loop: claim a batch, read the next one in the background, compute, write."""
    claims = Claims(root, job.stage, since=listed)
    waiting: list[tuple[str, list[Case]]] = []
    pending = iter(todo)
    with ThreadPoolExecutor(1, thread_name_prefix="counterlens-read") as reader, \
            ShardWriter(root, map_dtype=map_dtype) as writer:

        def next_claimed():
            for key, cases in pending:
                if claims.claim(key):
                    return key, reader.submit(pipeline.read_batch, cases, job.read)
                waiting.append((key, cases))
            return None

        current = next_claimed()
        while current is not None:
            following = next_claimed()              # its files are decoded while the model works
            key, future = current
            _process(clf, job, writer, claims, key, future.result(), report)
            current = following
        while waiting:                              # batches other processes held: wait, or take over
            left = []
            for key, cases in waiting:
                if claims.is_done(key):
                    continue                        # committed by its holder
                if claims.claim(key):
                    _process(clf, job, writer, claims, key, pipeline.read_batch(cases, job.read), report)
                else:
                    left.append((key, cases))
            waiting = left
            if waiting:
                time.sleep(0.2)


def _process(clf, job: Job, writer: ShardWriter, claims: Claims, key: str, batch, report) -> None:
    ticked = [0.0]
    tick = getattr(report, "tick", None)

    def moved(share: float) -> None:
        ticked[0] += share
        tick(share)

    results = job.run(clf, batch, tick=moved if tick is not None else None)
    writer.write(results)
    claims.mark_done(key)
    report(sum(r.status == "done" for r in results), [(r.case.id, r.error) for r in results if r.status != "done"],
           ticked[0])


def _child(clf, root, job, todo, threads, map_dtype, messages, listed) -> None:
    torch.set_num_threads(threads)
    try:
        def report(n, failures, ticked=0.0):
            messages.put(("progress", n, failures, ticked))
        report.tick = lambda share: messages.put(("tick", share))
        _work(clf, root, job, todo, map_dtype, report, listed)
    except BaseException as exc:                     # noqa: BLE001 - reported to the parent, then exit 1
        text = str(exc) if isinstance(exc, CounterlensError) else traceback.format_exc()
        messages.put(("error", type(exc).__name__, text))
        raise SystemExit(1) from None


def _fork_workers(clf, root, job, todo, workers: int, threads: int, map_dtype: str, report, listed: float) -> None:
    ctx = multiprocessing.get_context("fork")
    messages = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(clf, root, job, todo, threads, map_dtype, messages, listed), daemon=True)
             for _ in range(workers)]
    for p in procs:
        p.start()
    errors = []
    try:
        while any(p.is_alive() for p in procs) or not messages.empty():
            try:
                msg = messages.get(timeout=0.2)
            except queue.Empty:
                continue
            if msg[0] == "progress":
                report(msg[1], msg[2], msg[3])
            elif msg[0] == "tick":
                report.tick(msg[1])
            else:
                errors.append(msg)
    except BaseException:
        for p in procs:
            p.terminate()
        raise
    finally:
        for p in procs:
            p.join()
    if errors:
        kind, text = errors[0][1], errors[0][2]
        if kind in ("InputError", "DataFileError", "TargetError", "MethodError", "CounterlensError"):
            raise CounterlensError(text)
        raise RunFailedError(f"a worker process failed ({kind}); results written so far are kept, re-run to "
                             f"resume:\n{text}")
    bad = [p.exitcode for p in procs if p.exitcode not in (0, None)]
    if bad:
        raise RunFailedError(f"a worker process ended with status {bad[0]} (killed?); results written so far are "
                             "kept, re-run to resume")
