"""Half precision: every method's maps against float32, and the speed ratio.

    python benchmarks/precision.py                     # CPU: digits CNN (trained here), 8 images
    python benchmarks/precision.py --device cuda       # on a GPU
    python benchmarks/precision.py --quick             # small settings, a smoke run

Measured on the CPU it says "CPU (n threads)"; on a GPU the device's name.

For the same trained network and images, each of the 17 methods runs four ways:

- ``float32``: the reference;
- ``bf16 model``: ``Classifier(net.to(torch.bfloat16))`` (the module's own dtype);
- ``autocast bf16`` / ``autocast fp16``: ``Classifier(net, precision="bf16" | "fp16")``.

Per method and way: the mean over images of the Spearman rank correlation of the map with the
float32 map (``counterlens.metrics.sanity.spearman``, signed maps; random methods with the same
seed), and the speed ratio ``time(float32) / time(way)`` (above 1: faster), each time the best of
``--repeats`` rounds after a warm-up, the four ways interleaved in every round (a busy machine then
slows them alike). Results go to stdout as a Markdown table and to ``--json``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import counterlens as cl
from counterlens.attribution import METHODS
from counterlens.metrics.sanity import spearman

WAYS = ("bf16_model", "autocast_bf16", "autocast_fp16")


def digits_net(size: int, epochs: int, seed: int = 0):
    """A small CNN trained on sklearn's digits upsampled to ``size`` x ``size``; (net, x_test)."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    y = torch.tensor(d.target)
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    opt = torch.optim.Adam(net.parameters(), lr=5e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(1400, generator=gen).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net, x[1400:]


def method_params(quick: bool) -> dict:
    """Settings per method: small enough for a CPU, the same for every way."""
    n = 0.25 if quick else 1.0
    return {"integrated_gradients": {"steps": int(32 * n)},
            "smoothgrad": {"samples": int(16 * n)}, "squaregrad": {"samples": int(16 * n)},
            "vargrad": {"samples": int(16 * n)}, "rise": {"samples": int(500 * n)},
            "lime": {"samples": int(400 * n), "segmentation": "grid", "n_segments": 16},
            "kernel_shap": {"samples": int(400 * n), "segmentation": "grid", "n_segments": 16}}


def classifiers(net: nn.Module, device) -> dict:
    import copy
    return {"float32": cl.Classifier(net, device=device),
            "bf16_model": cl.Classifier(copy.deepcopy(net).to(torch.bfloat16), device=device),
            "autocast_bf16": cl.Classifier(net, device=device, precision="bf16"),
            "autocast_fp16": cl.Classifier(net, device=device, precision="fp16")}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ways(fns: dict, device, repeats: int) -> tuple[dict, dict]:
    """Each way's output (a warm-up call) and its best time over ``repeats`` rounds that run the ways
    interleaved, so load from other processes hits every way alike (the minimum: the least disturbed)."""
    outs = {way: fn() for way, fn in fns.items()}
    times = {way: [] for way in fns}
    for _ in range(repeats):
        for way, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[way].append(time.perf_counter() - t0)
    return outs, {way: min(t) for way, t in times.items()}


def run(size: int = 32, images: int = 8, epochs: int = 10, repeats: int = 3, quick: bool = False,
        device: str = "cpu", batch_size: int = 64, methods=None, seed: int = 0) -> dict:
    """``{method: {way: {"spearman": float, "speed_ratio": float, "error": str | None}}}``."""
    dev = cl.model.resolve_device(device)
    net, x_all = digits_net(size, epochs, seed)
    x = x_all[:images].to(dev)
    clfs = classifiers(net.to(dev), dev)
    target = clfs["float32"].predict(x)
    params = method_params(quick)
    out = {}
    for name in methods or METHODS:
        kwargs = {**params.get(name, {}), "batch_size": batch_size}
        if "seed" in METHODS[name].defaults():
            kwargs["seed"] = seed
        fn = METHODS[name].function
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fns, row = {}, {}
            for way, clf in clfs.items():
                try:                                    # a way that fails is reported, not timed
                    fn(clf, x[:1], target[:1], **kwargs)
                    fns[way] = (lambda c: lambda: fn(c, x, target, **kwargs))(clf)
                except Exception as exc:  # noqa: BLE001 - a benchmark reports what fails
                    row[way] = {"spearman": None, "speed_ratio": None, "error": f"{type(exc).__name__}: {exc}"}
            maps, seconds = timed_ways(fns, dev, repeats)
            ref, t_ref = maps.pop("float32"), seconds["float32"]
            for way, m in maps.items():
                rho = spearman(ref, m.float().cpu())
                ok = ~rho.isnan()
                row[way] = {"spearman": float(torch.nanmean(rho)),
                            "min_spearman": float(rho[ok].min()) if ok.any() else None,
                            "speed_ratio": t_ref / seconds[way], "seconds": seconds[way],
                            "dtype": str(m.dtype).replace("torch.", ""), "finite": bool(torch.isfinite(m).all()),
                            "error": None}
        out[name] = {"float32_seconds": t_ref, **row}
        print(name, {w: (round(r["spearman"], 4) if r["spearman"] is not None else r["error"][:60])
                     for w, r in row.items()}, flush=True)
    return out


def markdown(results: dict, device: str) -> str:
    head = ("| method | float32 s | " + " | ".join(f"{w}: rho (min) / speed" for w in WAYS) + " |\n"
            + "|---" * (2 + len(WAYS)) + "|\n")
    rows = []
    for name, r in results.items():
        cells = []
        for w in WAYS:
            v = r[w]
            cells.append("fails" if v["error"] else f"{v['spearman']:.4f} ({v['min_spearman'] or float('nan'):.3f}) / {v['speed_ratio']:.2f}x")
        rows.append(f"| {name} | {r['float32_seconds']:.3f} | " + " | ".join(cells) + " |")
    return f"Device: {device}\n\n" + head + "\n".join(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--methods", help="comma-separated (default: all 17)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run(args.size, args.images, args.epochs, args.repeats, args.quick, args.device,
                  methods=args.methods.split(",") if args.methods else None)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    print(markdown(results, name))
    if args.json:
        args.json.write_text(json.dumps({"device": name, "torch": torch.__version__, "size": args.size,
                                         "images": args.images, "results": results}, indent=1))


if __name__ == "__main__":
    main()
