"""Image counterfactuals: counterlens against the hand-written loop everyone writes.

    python benchmarks/counterfactual.py                    # CPU, both models, full settings
    python benchmarks/counterfactual.py --device cuda      # on a GPU
    python benchmarks/counterfactual.py --quick            # small settings, a smoke run

The naive loop (the usual answer to "what is the smallest change that flips the model"): for one
image at a time, Adam on the pixels minimising ``-log p(target) + lambda * ||x' - x||_2^2``,
clamped to [0, 1] after each step, up to ``--naive-steps`` (1000) steps, stopping as soon as the
prediction is the target with probability >= the threshold.

counterlens: ``counterlens.counterfactual(clf, x, target, threshold=...)`` with its defaults on the
whole batch at once (its adaptive lambda, early stop and pruning pass included in the time).
Times are medians of ``--repeats`` runs of each method in the same process.

Models, trained briefly in the script (seeded):
- ``digits``: a small CNN on sklearn's 8x8 digits (1797 real images; 10 classes);
- ``pneumonia``: the tutorial pneumonia CNN on the synthetic chest X-rays, 1x224x224.

Per model and method: time per valid counterfactual (total seconds / valid rows), validity, mean
L1 and L2 of the edit (over the valid rows of each method), and IM1 (Van Looveren & Klaise: the
reconstruction error of the target class's autoencoder over that of the original class's; lower
is more plausible) when the prior and metrics modules are present (``--no-im1`` skips it). Both
methods get the same per-row target: the most likely other class of the original (for the binary
pneumonia model, the other class). Results go to stdout as a Markdown table and to ``--json``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import counterlens as cl
from counterlens.training import train_classifier


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- models and data ------------------------------------------------------------------------------
def digits_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))


def digits_setup(args, device):
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    n_test = 300
    x_tr, y_tr, x_te = x[n_test:], y[n_test:], x[:n_test]
    fit = train_classifier(digits_cnn, x_tr, y_tr, epochs=3 if args.quick else 15, batch_size=64, lr=2e-3,
                           seed=0, progress=False, device=device)
    clf = cl.Classifier(fit["module"], classes=[str(i) for i in range(10)], device=device, value_range=(0, 1))
    return clf, x_tr, y_tr, x_te[:args.digits_images]


def pneumonia_setup(args, device):
    from counterlens.data.synthetic import make_dataset
    from counterlens.models import pneumonia_cnn
    size = 64 if args.quick else args.size
    n_train = 64 if args.quick else args.pneumonia_train
    sets = make_dataset("chest-xray", n_train=n_train, n_test=max(64, args.pneumonia_images), size=size, seed=0)
    x_tr, y_tr = torch.from_numpy(sets["train"].images), torch.from_numpy(sets["train"].labels)
    pre = cl.Normalize([0.5], [0.25])       # as `counterlens train` does; without it this CNN can collapse
    fit = train_classifier(lambda: pneumonia_cnn(input_size=(size, size), width=args.width), x_tr, y_tr,
                           epochs=1 if args.quick else args.pneumonia_epochs, batch_size=32, lr=2e-3, seed=0,
                           progress=False, device=device, preprocess=pre)
    clf = cl.Classifier(fit["module"], preprocess=pre, classes=sets["train"].classes, device=device,
                        value_range=(0, 1))
    x_te = torch.from_numpy(sets["test"].images)
    with torch.no_grad():
        acc = float((clf.predict(x_te.to(device)).cpu() == torch.from_numpy(sets["test"].labels)).float().mean())
    print(f"pneumonia CNN (width {args.width}, {size}x{size}, {n_train} training films): test accuracy {acc:.3f}",
          flush=True)
    x_te = x_te[:args.pneumonia_images]
    return clf, x_tr, y_tr, x_te


# -- the two searches -----------------------------------------------------------------------------
def naive_counterfactuals(clf, x, target, *, lam: float, steps: int, lr: float, threshold: float):
    """The hand-written loop, one image at a time. Returns (x_cf [B, ...], valid [B], steps used [B])."""
    out, valid, used = [], [], []
    with clf.eval_mode():
        for i in range(x.shape[0]):
            x_cf, ok, k = _naive_one(clf, x[i:i + 1], target[i], lam=lam, steps=steps, lr=lr, threshold=threshold)
            out.append(x_cf)
            valid.append(ok)
            used.append(k)
    return torch.cat(out), torch.tensor(valid), torch.tensor(used)


def _naive_one(clf, x0, t, *, lam, steps, lr, threshold):
    xc = x0.clone().requires_grad_(True)
    opt = torch.optim.Adam([xc], lr=lr)
    ok, k = False, 0
    for k in range(steps + 1):
        logits = clf.forward(xc)
        logp = torch.log_softmax(logits, dim=1)
        if logits.argmax(1).item() == t.item() and logp[0, t].exp().item() >= threshold:
            ok = True
            break
        if k == steps:
            break
        loss = -logp[0, t] + lam * (xc - x0).square().sum()
        opt.zero_grad()
        loss.backward(inputs=[xc])      # gradient for the pixels only, never into the parameters
        opt.step()
        with torch.no_grad():
            xc.clamp_(0, 1)
    return xc.detach(), ok, k


def ours(clf, x, target, *, threshold: float, batch_size):
    import counterlens as cl
    r = cl.counterfactual(clf, x, target=target, threshold=threshold, batch_size=batch_size, seed=0)
    return r.x.to(x.device), r.valid.cpu(), r.iterations.cpu()


def check_valid(clf, x_cf, target, threshold):
    """Validity recomputed the same way for both methods."""
    with torch.no_grad():
        p = clf.probs(x_cf).cpu()
    t = target.cpu()
    return (p.argmax(1) == t) & (p.gather(1, t[:, None])[:, 0] >= threshold)


# -- IM1 ------------------------------------------------------------------------------------------
def class_autoencoders(x_tr, y_tr, n_classes, args, device):
    """One autoencoder per class for IM1 (None when the prior module is missing or the size does not fit)."""
    try:
        from counterlens.counterfactual.prior import fit_class_autoencoders
    except ImportError:
        return None
    if any(s % 4 for s in x_tr.shape[2:]):
        return None
    return fit_class_autoencoders(x_tr, y_tr, n_classes, seed=0, epochs=2 if args.quick else args.ae_epochs,
                                  device=device)


def im1_score(x_cf, target, orig_class, aes):
    if aes is None:
        return None
    try:
        from counterlens.metrics.counterfactual import im1
    except ImportError:
        return None
    return im1(x_cf, target, orig_class, aes)


# -- the benchmark --------------------------------------------------------------------------------
def run_model(name, setup, args, device):
    torch.manual_seed(0)
    clf, x_tr, y_tr, x = setup(args, device)
    x = x.to(device)
    with torch.no_grad():
        p0 = clf.probs(x)
    orig = p0.argmax(1)
    target = p0.clone()
    target[torch.arange(len(orig)), orig] = -1
    target = target.argmax(1)                  # the most likely other class
    aes = class_autoencoders(x_tr, y_tr, p0.shape[1], args, device) if args.im1 else None
    rows = []
    methods = [("naive loop", lambda: naive_counterfactuals(clf, x, target, lam=args.naive_lam,
                                                            steps=args.naive_steps, lr=args.lr,
                                                            threshold=args.threshold)),
               ("counterlens", lambda: ours(clf, x, target, threshold=args.threshold, batch_size=args.batch_size))]
    for method, fn in methods:
        times = []
        for _ in range(args.repeats):          # the median of repeated runs (both searches are deterministic)
            _sync(device)
            t0 = time.perf_counter()
            x_cf, valid_reported, iters = fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
        seconds = float(np.median(times))
        valid = check_valid(clf, x_cf, target, args.threshold)
        d = (x_cf - x).flatten(1).cpu()
        l1, l2 = d.abs().sum(1), d.norm(dim=1)
        n_valid = int(valid.sum())
        score = im1_score(x_cf[valid.to(x_cf.device)], target[valid.to(target.device)],
                          orig[valid.to(orig.device)], aes) if n_valid else None
        row = {"model": name, "method": method, "images": int(x.shape[0]), "seconds": seconds,
               "valid": n_valid, "validity": n_valid / x.shape[0],
               "seconds_per_valid": seconds / n_valid if n_valid else float("inf"),
               "l1": float(l1[valid].mean()) if n_valid else float("nan"),
               "l2": float(l2[valid].mean()) if n_valid else float("nan"),
               "im1": float(torch.as_tensor(score).float().mean()) if score is not None else None,
               "mean_iterations": float(iters.float().mean()), "seconds_all": times,
               "reported_valid_agrees": bool((valid_reported.cpu().bool() == valid).all())}
        rows.append(row)
        im1_txt = f"{row['im1']:.3f}" if row["im1"] is not None else "—"
        print(f"| {name} | {method} | {row['images']} | {row['seconds_per_valid']:.3f} | {row['validity']:.2f} | "
              f"{row['l1']:.3f} | {row['l2']:.3f} | {im1_txt} | {row['mean_iterations']:.0f} |", flush=True)
    if len(rows) == 2 and rows[0]["valid"] and rows[1]["valid"]:
        speedup = rows[0]["seconds_per_valid"] / rows[1]["seconds_per_valid"]
        print(f"\n{name}: counterlens takes {1 / speedup:.3g}x the naive loop's time per valid counterfactual "
              f"({speedup:.3g}x faster)\n")
        rows[1]["speedup_per_valid"] = speedup
    elif len(rows) == 2:
        print(f"\n{name}: no speed-up: {rows[0]['valid']} (naive) and {rows[1]['valid']} (counterlens) valid rows\n")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", default="digits,pneumonia")
    ap.add_argument("--size", type=int, default=224, help="pneumonia image side")
    ap.add_argument("--digits-images", type=int, default=100)
    ap.add_argument("--pneumonia-images", type=int, default=8)
    ap.add_argument("--pneumonia-train", type=int, default=400)
    ap.add_argument("--pneumonia-epochs", type=int, default=4)
    ap.add_argument("--width", type=float, default=0.5, help="width multiplier of the pneumonia CNN")
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--naive-lam", type=float, default=0.1)
    ap.add_argument("--naive-steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=0.01, help="Adam step of the naive loop")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="rows per chunk for counterlens (default: its own, sized by the input)")
    ap.add_argument("--ae-epochs", type=int, default=10)
    ap.add_argument("--no-im1", dest="im1", action="store_false")
    ap.add_argument("--quick", action="store_true", help="small settings: a smoke run, not a measurement")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per method; the median is reported")
    args = ap.parse_args(argv)
    if args.quick:
        args.digits_images = min(args.digits_images, 8)
        args.pneumonia_images = min(args.pneumonia_images, 2)
        args.naive_steps = min(args.naive_steps, 200)
        args.repeats = 1
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    setups = {"digits": digits_setup, "pneumonia": pneumonia_setup}
    print("| model | method | images | s / valid CF | validity | L1 | L2 | IM1 | mean steps |")
    print("|---|---|---|---|---|---|---|---|---|")
    results = []
    for name in args.models.split(","):
        if name not in setups:
            raise SystemExit(f"--models: unknown model {name!r}; known: {', '.join(setups)}")
        results += run_model(name, setups[name], args, device)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": str(device), "torch": torch.__version__, "threads": args.threads,
                                         "quick": args.quick, "args": {k: str(v) for k, v in vars(args).items()},
                                         "results": results}, indent=2, default=float))
    return results


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
