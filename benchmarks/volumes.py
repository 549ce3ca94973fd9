"""Volumes per second of every attribution method on 3-D inputs (the reference 3-D CNN).

    python benchmarks/volumes.py                         # CPU: 32^3 volumes, all 17 methods, defaults
    python benchmarks/volumes.py --device cuda           # on a GPU
    python benchmarks/volumes.py --quick                 # 16^3, fewer samples: a smoke run

Model: ``brain_tumor_cnn3d`` (width 1, ~80 k parameters, 4 classes) on synthetic brain-MRI volumes
(:mod:`counterlens.data.volumes`), target "predicted". Every method runs with its defaults
(``batch_size=64``; IG 50 steps, SmoothGrad/VarGrad/SquareGrad 25 samples, RISE 2000 masks, LIME
1000 and KernelSHAP 2048 samples of 50 supervoxels, occlusion with its default window). For each
method: one warm-up call, then ``--repeats`` calls on ``--volumes`` volumes; volumes per second is
``volumes / median time`` (occlusion, whose default 1/8-side window makes 3,375 windows a volume,
RISE, LIME and KernelSHAP: one call on one volume). Results are written after every method, so a
long run stopped halfway keeps what it measured. The model's own floor is given too: forward and forward+backward time per
volume at batch 16 (the best of 5). Writes a Markdown table to stdout and ``--json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import counterlens as cl
from counterlens.attribution import METHODS
from counterlens.data.volumes import generate_volumes
from counterlens.models import brain_tumor_cnn3d

QUICK = {"integrated_gradients": {"steps": 8}, "smoothgrad": {"samples": 4}, "vargrad": {"samples": 4},
         "squaregrad": {"samples": 4}, "rise": {"samples": 64}, "lime": {"samples": 64, "n_segments": 8},
         "kernel_shap": {"samples": 64, "n_segments": 8}}


def floor(clf, x: torch.Tensor, repeats: int = 5) -> dict:
    """Best seconds per volume of the model: forward, and forward + input gradient, at batch ``len(x)``."""
    def fwd():
        with torch.no_grad():
            clf.logits(x)

    def fwd_bwd():
        xi = x.clone().requires_grad_(True)
        clf.logits(xi)[:, 0].sum().backward()

    out = {}
    for name, fn in (("forward", fwd), ("forward_backward", fwd_bwd)):
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name] = min(times) / len(x)
    return out


#: Methods of thousands of model calls a volume (a minute or more each at 32^3 on 2 cores): timed once on
#: one volume, without a warm-up (their time is the sum of many equal calls, so it varies little).
ONCE = ("occlusion", "rise", "lime", "kernel_shap")


def measure(clf, x: torch.Tensor, method: str, params: dict, repeats: int) -> dict:
    if method in ONCE:
        x, repeats = x[:1], 1
    else:
        cl.explain(clf, x[:1], methods=[method], **({method: params} if params else {}))      # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        maps = cl.explain(clf, x, methods=[method], **({method: params} if params else {}))
        times.append(time.perf_counter() - t0)
    assert maps[method].shape == x.shape[:1] + x.shape[2:]
    median = statistics.median(times)
    return {"method": method, "seconds": times, "median_s": median, "volumes_per_s": len(x) / median,
            "params": params, "volumes": len(x), "repeats": repeats}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=32, help="volume side (default: 32)")
    p.add_argument("--volumes", type=int, default=2, help="volumes per call (default: 2)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per method (default: 3)")
    p.add_argument("--methods", default="all", help="comma-separated methods (default: all)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="16^3, one volume, one repeat, few samples")
    p.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "volumes-cpu.json")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.volumes, args.repeats = 16, 1, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = list(METHODS) if args.methods == "all" else [m.strip() for m in args.methods.split(",")]
    torch.manual_seed(0)
    net = brain_tumor_cnn3d(4, 1, args.size).eval()
    clf = cl.Classifier(net, preprocess=cl.Normalize([0.5], [0.25]), classes=["glioma", "meningioma", "notumor",
                                                                               "pituitary"], device=args.device)
    vols = generate_volumes(max(16, args.volumes), size=args.size, seed=0, split="test")
    x = torch.from_numpy(vols.images[: args.volumes]).to(clf.device)
    base = floor(clf, torch.from_numpy(vols.images[:16]).to(clf.device))
    load_before = os.getloadavg()[0]
    rows = []
    for m in methods:
        row = measure(clf, x, m, QUICK.get(m, {}) if args.quick else {}, args.repeats)
        row["load_average_1min"] = os.getloadavg()[0]
        rows.append(row)
        print(f"{m}: {row['volumes_per_s']:.3g} volumes/s", file=sys.stderr)
        _write(args, rows, base, load_before)
    result = _write(args, rows, base, load_before)
    print(f"| method ({args.size}^3, {args.volumes} volumes a call, median of {args.repeats}) | volumes/s | s/volume |")
    print("|---|---:|---:|")
    for r in result["methods"]:
        once = " (1 volume, once)" if r["method"] in ONCE else ""
        print(f"| {r['method']}{once} | {r['volumes_per_s']:.3g} | {r['median_s'] / r['volumes']:.3g} |")
    print(f"\nfloor: forward {1000 * base['forward']:.2f} ms/volume, forward+backward "
          f"{1000 * base['forward_backward']:.2f} ms/volume (batch 16); load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after, on {os.cpu_count()} cores")
    return 0


def _write(args, rows, base, load_before) -> dict:
    """The results so far; rows of methods measured in an earlier run (same settings) are kept."""
    result = {"size": args.size, "volumes": args.volumes, "repeats": args.repeats, "device": str(args.device),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.processor() or
              platform.machine(), "floor_s_per_volume": base, "quick": args.quick,
              "load_average_1min": {"before": load_before, "after": os.getloadavg()[0], "cores": os.cpu_count()},
              "methods": rows}
    if args.json:
        earlier = json.loads(args.json.read_text()) if args.json.exists() else {}
        same = all(earlier.get(k) == result[k] for k in ("size", "volumes", "repeats", "device", "quick"))
        if same:
            mine = {r["method"] for r in rows}
            result["methods"] = [r for r in earlier.get("methods", []) if r["method"] not in mine] + rows
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    sys.exit(main())
