"""Attribution methods side by side with Captum, and against each method's floor.

    python benchmarks/attribution.py                       # CPU, both models, full settings
    python benchmarks/attribution.py --device cuda         # on a GPU
    python benchmarks/attribution.py --quick               # small settings, a smoke run

For each model (the tutorial pneumonia CNN and the small ResNet, 1x224x224 input) it measures:

- the floor: the model's best time per sample, forward only and forward+backward (gradient with
  respect to the input), over a sweep of batch sizes; a method's floor is the number of model
  evaluations it needs times that best time;
- counterlens with ``batch_size="auto"`` and with the default ``batch_size=64``;
- Captum with its defaults, and with its best batching (``internal_batch_size``,
  ``nt_samples_batch_size``, ``perturbations_per_eval``) set to the floor's best batch size;
- peak memory of each call: on CUDA ``max_memory_allocated``; on the CPU the rise of the process's
  peak resident set (VmHWM, reset before each call), with glibc told to return large blocks.

Each time is the median of ``--repeats`` runs after one warm-up. Results go to stdout as a
Markdown table and to ``--json``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

if "MALLOC_MMAP_THRESHOLD_" not in os.environ:   # large blocks mmapped, so freed memory leaves RSS
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch  # noqa: E402

import counterlens as cl  # noqa: E402
from counterlens.attribution import METHODS  # noqa: E402
from counterlens.models import build_model  # noqa: E402


# -- measuring ------------------------------------------------------------------------------------
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_reset():
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def _status(field_name: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024   # MiB
    return float("nan")


def measure(fn, device, repeats: int) -> tuple[float, float]:
    """(median seconds, peak MiB above the starting point) of ``fn()``."""
    fn()   # warm-up
    times, peaks = [], []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        else:
            _rss_reset()
            base = _status("VmRSS")
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        if device.type == "cuda":
            peaks.append((torch.cuda.max_memory_allocated(device) - base) / 2**20)
        else:
            peaks.append(_status("VmHWM") - base)
    return statistics.median(times), max(peaks)


def floor_sweep(module, shape, device, repeats, sizes=(1, 2, 4, 8, 16, 32, 64)):
    """Best seconds per sample for forward and forward+backward, and the batch size of each."""
    best = {"forward": (float("inf"), 0), "backward": (float("inf"), 0)}
    for bs in sizes:
        x = torch.rand(bs, *shape, device=device)

        def fwd():
            with torch.no_grad():
                module(x)

        def fwd_bwd():
            xg = x.detach().requires_grad_(True)
            torch.autograd.grad(module(xg)[:, 0].sum(), xg)
        for kind, fn in (("forward", fwd), ("backward", fwd_bwd)):
            t, _ = measure(fn, device, repeats)
            if t / bs < best[kind][0]:
                best[kind] = (t / bs, bs)
    return best


# -- the methods ----------------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    params: dict
    evals: callable            # (n_images, clf, x) -> model evaluations needed
    kind: str                  # "forward" or "backward"
    captum: callable | None = None     # (net, layer, x, target, best_bs) -> callable running Captum; None: no peer
    notes: str = ""
    extra: dict = field(default_factory=dict)


def cases(quick: bool, size: int):
    from captum import attr as ca
    steps, samples = (4, 4) if quick else (16, 16)
    lime_samples = 16 if quick else 100
    win = size // 4
    stride = win // 2
    n_windows = ((size - win) // stride + 1) ** 2

    def grid_mask(x):
        cell = size // 8
        idx = torch.arange(size, device=x.device) // cell
        return (idx[:, None] * 8 + idx[None, :]).expand(x.shape[0], 1, size, size).contiguous()

    def captum_ig(net, layer, x, t, bs, best):
        return lambda: ca.IntegratedGradients(net).attribute(
            x, baselines=torch.zeros_like(x), target=t, n_steps=steps, method="gausslegendre",
            internal_batch_size=bs if best else None)

    def captum_nt(kind):
        def make(net, layer, x, t, bs, best):
            return lambda: ca.NoiseTunnel(ca.Saliency(net)).attribute(
                x, nt_type=kind, nt_samples=samples, stdevs=0.15, target=t, abs=True,
                nt_samples_batch_size=bs if best else None)
        return make

    def captum_occlusion(net, layer, x, t, bs, best):
        return lambda: ca.Occlusion(net).attribute(
            x, sliding_window_shapes=(1, win, win), strides=(1, stride, stride), target=t, baselines=0.0,
            perturbations_per_eval=bs if best else 1)

    def captum_surrogate(kind):
        def make(net, layer, x, t, bs, best):
            method = ca.Lime(net) if kind == "lime" else ca.KernelShap(net)
            return lambda: method.attribute(x, target=t, feature_mask=grid_mask(x), n_samples=lime_samples,
                                            baselines=0.0, perturbations_per_eval=bs if best else 1)
        return make

    def simple(cls, **kw):
        return lambda net, layer, x, t, bs, best: (lambda: cls(net).attribute(x, target=t, **kw))

    def captum_gradcam(net, layer, x, t, bs, best):
        def run():
            a = ca.LayerGradCam(net, layer).attribute(x, target=t, relu_attributions=True)
            return ca.LayerAttribution.interpolate(a, x.shape[2:], interpolate_mode="bilinear")
        return run

    def captum_guided_gradcam(net, layer, x, t, bs, best):
        return lambda: ca.GuidedGradCam(net, layer).attribute(x, target=t, interpolate_mode="bilinear")

    def n_channels(clf, x):
        from counterlens.attribution.cam import find_target_layer
        name = find_target_layer(clf, x)
        store = {}
        layer = dict(clf.module.named_modules())[name]
        def hook(_m, _i, out):
            store["c"] = out.shape[1]
        h = layer.register_forward_hook(hook)
        with torch.no_grad():
            clf.logits(x[:1])
        h.remove()
        return store["c"]

    one = lambda n, clf, x: n  # noqa: E731
    return [
        Case("saliency", {}, one, "backward", simple(ca.Saliency, abs=True)),
        Case("input_x_gradient", {}, one, "backward", simple(ca.InputXGradient)),
        Case("guided_backprop", {}, one, "backward", simple(ca.GuidedBackprop)),
        Case("deconvnet", {}, one, "backward", simple(ca.Deconvolution)),
        Case("integrated_gradients", {"steps": steps}, lambda n, c, x: n * steps, "backward", captum_ig),
        Case("smoothgrad", {"samples": samples}, lambda n, c, x: n * samples, "backward", captum_nt("smoothgrad")),
        Case("vargrad", {"samples": samples}, lambda n, c, x: n * samples, "backward", captum_nt("vargrad")),
        Case("squaregrad", {"samples": samples}, lambda n, c, x: n * samples, "backward", captum_nt("smoothgrad_sq")),
        Case("gradcam", {}, one, "backward", captum_gradcam),
        Case("gradcam_plus_plus", {}, one, "backward"),
        Case("layercam", {}, one, "backward"),
        Case("guided_gradcam", {}, lambda n, c, x: 2 * n, "backward", captum_guided_gradcam),
        Case("scorecam", {}, lambda n, c, x: n * (n_channels(c, x) + 1), "forward"),
        Case("occlusion", {"window": win, "stride": stride}, lambda n, c, x: n * (n_windows + 1), "forward",
             captum_occlusion),
        Case("rise", {"samples": 2 * lime_samples}, lambda n, c, x: n * 2 * lime_samples, "forward"),
        Case("lime", {"samples": lime_samples, "segmentation": "grid", "cell": size // 8},
             lambda n, c, x: n * lime_samples, "forward", captum_surrogate("lime")),
        Case("kernel_shap", {"samples": lime_samples, "segmentation": "grid", "cell": size // 8},
             lambda n, c, x: n * lime_samples, "forward", captum_surrogate("kernel_shap")),
    ]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", default="pneumonia-cnn,small-resnet")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--images", type=int, default=2, help="images per call for methods needing many evaluations")
    ap.add_argument("--cheap-images", type=int, default=16,
                    help="images per call for methods needing at most 2 evaluations per image")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", default=None, help="comma-separated subset")
    ap.add_argument("--quick", action="store_true", help="small settings: a smoke run, not a measurement")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message="You are providing multiple inputs")   # Captum's LIME note
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = []
    for arch in args.models.split(","):
        torch.manual_seed(0)
        net = build_model(arch, input_size=args.size).to(device).eval()
        clf = cl.Classifier(net, device=device)
        x_all = torch.rand(max(args.images, args.cheap_images), 1, args.size, args.size, device=device)
        t_all = clf.predict(x_all)
        x, t = x_all[:args.images], t_all[:args.images]
        floor = floor_sweep(net, (1, args.size, args.size), device, args.repeats)
        layer_name = __import__("counterlens.attribution.cam", fromlist=["x"]).find_target_layer(clf, x)
        layer = dict(net.named_modules())[layer_name]
        print(f"\n## {arch}, 1x{args.size}x{args.size}, {device}: {args.cheap_images} images per call for methods "
              f"with <= 2 evaluations per image, {args.images} for the others\n")
        print(f"floor: forward {1e3 * floor['forward'][0]:.2f} ms/sample (batch {floor['forward'][1]}), "
              f"forward+backward {1e3 * floor['backward'][0]:.2f} ms/sample (batch {floor['backward'][1]})\n")
        print("| method | evals/img | floor s/img | ours auto s/img | ours/floor | ours bs=64 s/img "
              "| Captum default s/img | Captum best s/img | Captum best / ours | peak MiB ours | peak MiB Captum best |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        wanted = set(args.methods.split(",")) if args.methods else None
        for case in cases(args.quick, args.size):
            if case.name not in METHODS or (wanted and case.name not in wanted):
                continue
            n = args.images
            if case.evals(1, clf, x) <= 2:
                n = args.cheap_images
            x, t = x_all[:n], t_all[:n]
            evals = case.evals(n, clf, x)
            per_sample, best_bs = floor[case.kind]
            floor_s = evals * per_sample / n
            fn = METHODS[case.name].function
            ours_auto, mem_auto = measure(lambda: fn(clf, x, t, batch_size="auto", **case.params), device, args.repeats)
            ours_64, _ = measure(lambda: fn(clf, x, t, batch_size=64, **case.params), device, args.repeats)
            row = {"model": arch, "method": case.name, "evals_per_image": evals / n, "floor_s": floor_s,
                   "ours_auto_s": ours_auto / n, "ours_64_s": ours_64 / n, "ours_peak_mib": mem_auto,
                   "params": case.params}
            if case.captum is not None:
                cd, _ = measure(case.captum(net, layer, x, t, best_bs, False), device, args.repeats)
                cb, mem_cb = measure(case.captum(net, layer, x, t, best_bs, True), device, args.repeats)
                row.update(captum_default_s=cd / n, captum_best_s=cb / n, captum_best_peak_mib=mem_cb)
            results.append(row)
            cap = (f"{row['captum_default_s']:.3f} | {row['captum_best_s']:.3f} | "
                   f"{row['captum_best_s'] / row['ours_auto_s']:.2f}x" if "captum_best_s" in row else "— | — | —")
            cap_mem = f"{row['captum_best_peak_mib']:.0f}" if "captum_best_peak_mib" in row else "—"
            print(f"| {case.name} | {evals / n:.0f} | {floor_s:.3f} | {row['ours_auto_s']:.3f} | "
                  f"{row['ours_auto_s'] / floor_s:.2f} | {row['ours_64_s']:.3f} | {cap} | {mem_auto:.0f} | {cap_mem} |",
                  flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": str(device), "torch": torch.__version__, "threads": args.threads,
                                         "images": args.images, "size": args.size, "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
