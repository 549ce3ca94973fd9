"""Dataset-scale runs: what the run layer adds to the methods, memory against N, files, the report,
and the work redone after a kill -9 (issue 12).

    .venv/bin/python benchmarks/scale.py --n 1000 10000 --json benchmarks/results/scale-cpu.json

Synthetic brain-MRI slices of 64x64 as PNG files, the demo's brain-tumour CNN (width 0.5, trained
briefly here: timing does not depend on how well), Grad-CAM + integrated gradients (16 steps).
For each N, each measurement runs in a fresh process (so peak memory is that of the measurement);
the timings are medians of ``--repeats`` runs for N up to 2,000 and single runs above:

* methods alone: the same methods on the same images already in memory (one process, one torch
  thread, 16 images per call: the floor the pipeline is compared with);
* pipeline, 1 worker x 1 thread: ``explain_folder`` from the PNG files into a run directory
  (reading, prefetch, store, bookkeeping included); overhead = pipeline / methods alone - 1;
* pipeline, auto: the workers x threads the engine picks on this machine;
* report: ``write_report`` of the auto run (seconds, bytes, files);
* kill -9 at 50%: the auto run started afresh, killed (workers and parent) once half the cases
  are written, then re-run: cases written twice (redone) and the resume's wall time.

With ``--engine ray`` (issue 14), each N is run with both engines instead, in fresh processes,
alternately, ``--repeats`` times each (medians): the local engine as ``pipeline, auto`` above, and
the Ray engine on a cluster started in the measuring process with this machine's cores (one
1-CPU, 1-thread actor per core, the model sent as bytes). Reported: wall time of the run and
images per second; for Ray also the cluster's start-up (``ray.init``) and the time to the first
batch back (actors started, model loaded); and peak memory as PSS summed over every process of the
run (driver, forked workers or Ray's processes and actors; shared pages counted once), sampled
every 0.5 s. ``--device cuda`` measures one actor per GPU against the local engine's one worker on
the GPU.

    .venv/bin/python benchmarks/scale.py --engine ray --n 2000 --json benchmarks/results/scale-ray-cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
WORK = ROOT / ".work" / "scale"
METHODS = ["gradcam", "integrated_gradients"]
PARAMS = {"integrated_gradients": {"steps": 16}}


def prepare(n_max: int) -> tuple[Path, Path]:
    from counterlens.data.synthetic import make_dataset, write_dataset
    from counterlens.train_folder import train_model
    data = WORK / f"data-{n_max}"
    if not (data / "Testing").is_dir():
        t0 = time.perf_counter()
        write_dataset(make_dataset("brain-mri", n_train=800, n_test=n_max, size=64, seed=0), data)
        print(f"synthesised {n_max} test images in {time.perf_counter() - t0:.0f} s", flush=True)
    model = WORK / "model"
    if not (model / "model.json").exists():
        train_model(data, "brain-tumor-cnn", model, size=64, width=0.5, epochs=2, batch_size=32, lr=2e-3, seed=0,
                    device="cpu", progress=False, log=print)
    return data, model


# -- the measurements, each in its own process ------------------------------------------------------
def _peak() -> dict:
    return {"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_child_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def _folder(data: Path, model: Path, n: int):
    from counterlens.data.images import ImageFolder
    from counterlens.loading import load_model
    clf = load_model(model, device="cpu")
    return clf, ImageFolder(data / "Testing", channels=1, size=64, classes=clf.classes, limit=n)


def measure_methods(data: Path, model: Path, n: int) -> dict:
    import numpy as np
    import torch

    from counterlens.runs.pipeline import explain_arrays
    from counterlens.runs.spec import resolved_methods
    torch.set_num_threads(1)
    clf, ds = _folder(data, model, n)
    x = np.stack([ds.load(i)[0] for i in range(len(ds))])
    methods = resolved_methods(METHODS, PARAMS, 64, 0)
    t0 = time.perf_counter()
    for a in range(0, len(x), 16):
        explain_arrays(clf, x[a:a + 16], methods)
    return {"seconds": time.perf_counter() - t0, **_peak()}


def measure_pipeline(data: Path, model: Path, n: int, out: Path, workers: int | None, threads: int | None) -> dict:
    from counterlens.runs.dataset import explain_folder
    clf, ds = _folder(data, model, n)
    t0 = time.perf_counter()
    s = explain_folder(clf, ds, out, methods=METHODS, params=PARAMS, workers=workers, threads=threads,
                       progress=False, model_source=str(model), data_source=str(data / "Testing"))
    files = sum(1 for p in out.rglob("*") if p.is_file())
    return {"seconds": time.perf_counter() - t0, "done": s.done, "skipped": s.skipped, "workers": s.workers,
            "threads": s.threads, "files": files, "files_per_image": files / n,
            "bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file()), **_peak()}


def _in_process(kind: str, *args) -> dict:
    cmd = [sys.executable, __file__, "--_measure", kind, *map(str, args)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _written(out: Path) -> int:
    from counterlens.runs.store import open_run
    try:
        return open_run(out).written_rows("cases")
    except Exception:            # noqa: BLE001 - not created yet
        return 0


def kill_and_resume(data: Path, model: Path, n: int, out: Path) -> dict:
    import shutil
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, __file__, "--_measure", "pipeline", str(data), str(model), str(n), str(out), "0", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while _written(out) < n // 2 and proc.poll() is None:
        time.sleep(0.05)
    at = _written(out)
    for stat in Path("/proc").glob("[0-9]*/stat"):          # its forked workers first
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == proc.pid:
                os.kill(int(stat.parent.name), signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            pass
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _written(out)
    resumed = _in_process("pipeline", data, model, n, out, 0, 0)
    total = _written(out)
    return {"killed_at_cases": killed_at, "poll_saw": at, "resume_seconds": resumed["seconds"],
            "resume_done": resumed["done"], "redone_cases": total - n}


def report(out: Path) -> dict:
    from counterlens.viz.report import write_report
    t0 = time.perf_counter()
    path = write_report(out)
    seconds = time.perf_counter() - t0
    files = [path] + (list((out / "report").rglob("*")) if (out / "report").is_dir() else [])
    files = [f for f in files if f.is_file()]
    return {"seconds": seconds, "bytes": sum(f.stat().st_size for f in files), "files": len(files)}


def _median_of(runs: list[dict]) -> dict:
    """The run with the median wall time, with every run's seconds listed."""
    ordered = sorted(runs, key=lambda r: r["seconds"])
    return {**ordered[len(ordered) // 2], "all_seconds": [r["seconds"] for r in runs]}


def run_n(data: Path, model: Path, n: int, repeats: int) -> dict:
    import shutil
    row = {"n": n, "repeats": repeats}
    row["methods"] = _median_of([_in_process("methods", data, model, n) for _ in range(repeats)])
    print(f"N={n}: methods alone {row['methods']['all_seconds']} s", flush=True)
    for name, (w, t) in {"pipeline_1x1": (1, 1), "pipeline_auto": (0, 0)}.items():
        runs = []
        for _ in range(repeats):
            out = WORK / f"run-{n}-{name}"
            shutil.rmtree(out, ignore_errors=True)
            runs.append(_in_process("pipeline", data, model, n, out, w, t))
        row[name] = _median_of(runs)
        print(f"N={n}: {name} {row[name]['all_seconds']} s", flush=True)
    row["report"] = report(WORK / f"run-{n}-pipeline_auto")
    print(f"N={n}: report {row['report']['seconds']:.1f} s", flush=True)
    row["kill"] = kill_and_resume(data, model, n, WORK / f"run-{n}-kill")
    print(f"N={n}: kill at {row['kill']['killed_at_cases']}, redone {row['kill']['redone_cases']}", flush=True)
    row["overhead_1x1"] = row["pipeline_1x1"]["seconds"] / row["methods"]["seconds"] - 1
    return row


def table(rows: list[dict]) -> str:
    lines = ["| N | runs | methods alone s | pipeline 1x1 s | overhead | pipeline auto s (workers x threads) | speed-up auto "
             "vs methods alone | peak MiB 1x1 | peak MiB auto (parent / largest worker) | files / image | "
             "report s | report MB (files) | kill -9 at | cases redone | resume s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m, p1, pa, rep, k = r["methods"], r["pipeline_1x1"], r["pipeline_auto"], r["report"], r["kill"]
        lines.append(
            f"| {r['n']:,} | {r['repeats']} | {m['seconds']:.1f} | {p1['seconds']:.1f} | {100 * r['overhead_1x1']:+.1f}% | "
            f"{pa['seconds']:.1f} ({pa['workers']}x{pa['threads']}) | {m['seconds'] / pa['seconds']:.2f}x | "
            f"{p1['peak_mib']:.0f} | {pa['peak_mib']:.0f} / {pa['peak_child_mib']:.0f} | {pa['files_per_image']:.3f} | "
            f"{rep['seconds']:.1f} | {rep['bytes'] / 1e6:.1f} ({rep['files']}) | {k['killed_at_cases']:,} | "
            f"{k['redone_cases']} | {k['resume_seconds']:.1f} |")
    return "\n".join(lines)


# -- the Ray engine against the local one (--engine ray, issue 14) ------------------------------------
class _TreeMemory:
    """Peak PSS (MiB) summed over a process and all its descendants, sampled in a thread."""

    def __init__(self, root: int, every: float = 0.5):
        import threading
        self.root, self.every, self.peak, self.peak_processes = root, every, 0.0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _tree(self) -> list[int]:
        parent = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                parent[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
        tree, grew = {self.root}, True
        while grew:
            new = {p for p, pp in parent.items() if pp in tree and p not in tree}
            tree |= new
            grew = bool(new)
        return sorted(tree)

    @staticmethod
    def _pss_kib(pid: int) -> int:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    return int(line.split()[1])
        except (OSError, ValueError):
            pass
        return 0

    def _loop(self) -> None:
        while not self._stop.is_set():
            pids = self._tree()
            total = sum(self._pss_kib(p) for p in pids) / 1024
            if total > self.peak:
                self.peak, self.peak_processes = total, len(pids)
            self._stop.wait(self.every)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {"peak_pss_mib": self.peak, "processes_at_peak": self.peak_processes}


def measure_engine(engine: str, data: Path, model: Path, n: int, out: Path, device: str = "cpu") -> dict:
    """One explain run of N images with ``engine``: ``local`` (the auto workers x threads) or
    ``ray`` (a cluster of this machine's cores started here, one 1-CPU actor per core; with
    ``device`` cuda, one actor per GPU, against the local engine's one worker on the GPU)."""
    import logging

    from counterlens.data.images import ImageFolder
    from counterlens.loading import load_model
    from counterlens.runs.dataset import explain_folder
    memory = _TreeMemory(os.getpid())
    clf = load_model(model, device=device)
    ds = ImageFolder(data / "Testing", channels=1, size=64, classes=clf.classes, limit=n)
    row, run_engine = {"engine": engine, "device": device}, "local"
    if engine == "ray":
        import ray

        from counterlens.runs.engines.ray import RayEngine
        t0 = time.perf_counter()
        ray.init(num_cpus=len(os.sched_getaffinity(0)), include_dashboard=False, logging_level=logging.ERROR,
                 log_to_driver=False)
        row["cluster_start_s"] = time.perf_counter() - t0
        run_engine = RayEngine(model={"source": str(model), "device": device})
    t0 = time.perf_counter()
    s = explain_folder(clf, ds, out, methods=METHODS, params=PARAMS, progress=False, model_source=str(model),
                       data_source=str(data / "Testing"), engine=run_engine)
    row.update(seconds=time.perf_counter() - t0, done=s.done, workers=s.workers, threads=s.threads,
               first_result_s=getattr(s, "first_result", None))
    if engine == "ray":
        import ray
        ray.shutdown()
    return {**row, **memory.stop(), **_peak()}


def run_engines(data: Path, model: Path, n: int, repeats: int, device: str = "cpu") -> dict:
    import shutil
    runs = {"local": [], "ray": []}
    for _ in range(repeats):
        for engine in runs:                       # alternately, so a slow spell of the machine hits both
            out = WORK / f"run-{n}-engine-{engine}"
            shutil.rmtree(out, ignore_errors=True)
            runs[engine].append(_in_process("engine", data, model, n, out, engine, device))
            print(f"N={n}: {engine} {runs[engine][-1]['seconds']:.1f} s", flush=True)
    row = {"n": n, "repeats": repeats, **{engine: _median_of(r) for engine, r in runs.items()}}
    row["ray_vs_local"] = row["local"]["seconds"] / row["ray"]["seconds"]
    return row


def engine_table(rows: list[dict]) -> str:
    lines = ["| N | runs | local s (workers x threads) | local img/s | Ray cluster start s | Ray first batch back s | "
             "Ray run s (actors x threads) | Ray img/s | Ray / local throughput | Ray img/s incl. cluster start | "
             "peak memory local MiB (PSS, processes) | peak memory Ray MiB (PSS, processes) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, ra, n = r["local"], r["ray"], r["n"]
        lines.append(
            f"| {n:,} | {r['repeats']} | {lo['seconds']:.1f} ({lo['workers']}x{lo['threads']}) | {n / lo['seconds']:.1f} | "
            f"{ra['cluster_start_s']:.1f} | {ra['first_result_s']:.1f} | {ra['seconds']:.1f} ({ra['workers']}x{ra['threads']}) | "
            f"{n / ra['seconds']:.1f} | {r['ray_vs_local']:.2f}x | {n / (ra['seconds'] + ra['cluster_start_s']):.1f} | "
            f"{lo['peak_pss_mib']:.0f} ({lo['processes_at_peak']}) | {ra['peak_pss_mib']:.0f} ({ra['processes_at_peak']}) |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed runs per measurement for N up to 2,000 (medians); larger N run once (default: 3)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--engine", choices=["local", "ray"], default="local",
                    help="ray: the Ray engine against the local one instead (issue 14; needs counterlens[ray])")
    ap.add_argument("--device", default="cpu",
                    help="--engine ray: cpu (one 1-CPU actor per core), or cuda (one actor per GPU) (default: cpu)")
    ap.add_argument("--_measure", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._measure:
        kind, data, model, n, *rest = args._measure
        if kind == "methods":
            result = measure_methods(Path(data), Path(model), int(n))
        elif kind == "engine":
            result = measure_engine(rest[1], Path(data), Path(model), int(n), Path(rest[0]), *rest[2:])
        else:
            out, w, t = rest
            result = measure_pipeline(Path(data), Path(model), int(n), Path(out), int(w) or None, int(t) or None)
        print(json.dumps(result))
        return
    data, model = prepare(max(args.n))
    if args.engine == "ray":
        rows = [run_engines(data, model, n, args.repeats if n <= 2000 else 1, args.device) for n in args.n]
        print(engine_table(rows))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"rows": rows, "cores": len(os.sched_getaffinity(0))}, indent=1))
        return
    rows = [run_n(data, model, n, args.repeats if n <= 2000 else 1) for n in args.n]
    print(table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "cores": len(os.sched_getaffinity(0))}, indent=1))


if __name__ == "__main__":
    main()
