"""Keras models: the converted torch model against the wrapped Keras model (KERAS_BACKEND=torch).

    python benchmarks/keras_conversion.py                 # the issue's seed CNN, grey 128x128 and 256x256
    python benchmarks/keras_conversion.py --quick         # 64x64 only, fewer repeats (a smoke run)
    python benchmarks/keras_conversion.py --device cuda   # on a GPU

The seed architecture of issue 15 (grey input; Conv2D 32, 32, 64, 64 with ReLU, MaxPool, Flatten,
Dense 64, Dropout, Dense 4 softmax; untrained weights: speed does not depend on them) is built in
Keras and explained both ways through :class:`counterlens.Classifier`:

- ``wrapped``: ``Classifier.from_keras(model, convert=False)``, the Keras model itself, fed
  channels-last;
- ``converted``: ``Classifier.from_keras(model)``, native ``nn.Conv2d`` / ``nn.Linear`` ... modules.

The time is one forward + backward pass (the input gradient of the predicted class's score, what
every gradient method costs per evaluation) of a batch, the median of ``--repeats`` runs after two
warm-ups, the two models timed in alternation; the speed-up is the median of the per-pair ratios
wrapped / converted. Also printed: the largest probability difference
between the two and the correlation of their saliency maps (must be ~1). Output: a Markdown table
on stdout and ``--json``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")

import torch  # noqa: E402

import counterlens as cl  # noqa: E402


def seed_model(size: int):
    import keras
    keras.utils.set_random_seed(0)
    L = keras.layers
    return keras.Sequential([
        keras.Input((size, size, 1)),
        L.Conv2D(32, 3, activation="relu"), L.Conv2D(32, 3, activation="relu"),
        L.Conv2D(64, 3, activation="relu"), L.Conv2D(64, 3, activation="relu"),
        L.MaxPooling2D(), L.Flatten(), L.Dense(64, activation="relu"), L.Dropout(0.5),
        L.Dense(4, activation="softmax")], name=f"seed_cnn_{size}")


def forward_backward(clf, x: torch.Tensor) -> float:
    """Seconds of one forward + backward pass to the input (eval mode, the predicted class)."""
    if clf.device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    xg = x.detach().clone().requires_grad_(True)
    scores = clf.logits(xg)
    torch.autograd.grad(scores.gather(1, scores.argmax(1, keepdim=True)).sum(), xg)
    if clf.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def paired_times(a, b, x, repeats: int) -> tuple[float, float, float]:
    """Median seconds of ``a`` and of ``b`` and the median of the per-pair ratios a / b, timed in
    alternation (a, b, a, b ...) after two warm-ups each, so a load change on a shared machine
    hits both alike."""
    for _ in range(2):
        forward_backward(a, x), forward_backward(b, x)
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(forward_backward(a, x))
        tb.append(forward_backward(b, x))
    return statistics.median(ta), statistics.median(tb), statistics.median(p / q for p, q in zip(ta, tb))


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten(1).double(), b.flatten(1).double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return float(((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-30)).min())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="64x64, 3 repeats")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.batches, args.repeats = [64], [4], 3
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    print(f"device {args.device}, {torch.get_num_threads()} torch threads, median of {args.repeats}\n")
    print("| input | wrapped Keras (ms) | converted torch (ms) | speed-up | max |dp| | saliency corr |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        model = seed_model(size)
        wrapped = cl.Classifier.from_keras(model, convert=False, device=args.device)
        converted = cl.Classifier.from_keras(model, device=args.device)
        for batch in args.batches:
            x = torch.rand(batch, 1, size, size, generator=torch.Generator().manual_seed(0)).to(converted.device)
            t_wrapped, t_converted, ratio = paired_times(wrapped, converted, x, args.repeats)
            dp = float((wrapped.probs(x) - converted.probs(x)).abs().max())
            sal = cl.explain(converted, x[:2], methods=["saliency"])["saliency"]
            sal_w = cl.explain(wrapped, x[:2], methods=["saliency"])["saliency"]
            row = {"size": size, "batch": batch, "wrapped_ms": 1e3 * t_wrapped, "converted_ms": 1e3 * t_converted,
                   "speedup": ratio, "max_prob_diff": dp, "saliency_corr": corr(sal, sal_w)}
            rows.append(row)
            print(f"| {size}x{size} x{batch} | {row['wrapped_ms']:.1f} | {row['converted_ms']:.1f} | "
                  f"{ratio:.2f}x | {dp:.1e} | {row['saliency_corr']:.6f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"device": args.device, "threads": torch.get_num_threads(),
                                         "repeats": args.repeats, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
