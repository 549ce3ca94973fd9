"""Validate the shortcut audit and the localisation metrics on known truth (synthetic data).

    python benchmarks/trust_validation.py                  # the settings of docs/trust.md
    python benchmarks/trust_validation.py --quick          # small settings, a smoke run

1. chest-xray: the pneumonia CNN trained (seeded) on films whose corner marker agrees with the
   label at several rates (100%, 90%, 75%), on films with an uninformative marker (50%: present in
   half of each class) and on films without markers. Each model is audited on the same test films
   (half of each class carries a marker; the region is the marker mask): region and random flip
   rates, the verdict, and per method (Grad-CAM, integrated gradients) mass lift in the marker and
   confounder sensitivity. The flip rates are also measured with the biharmonic fill.
   The true flip rate is measured without inpainting: each marked film against the same film
   rendered without its marker (the generator draws the marker last).
2. Inpainting quality: the generator draws the marker last, so the same films without markers are
   the true background; mean absolute error of each fill inside the marker, and its time.
3. brain-mri: the brain-tumour CNN; Grad-CAM and integrated gradients on test slices with a tumour:
   mass lift, relevance mass, relevance rank and pointing game in the tumour mask, and the cascading
   model-randomisation test of Grad-CAM (Spearman similarity to the original map).

Prints Markdown tables and writes ``--json``. Training runs on ``--threads`` CPU threads (1 by
default: small models on a shared 2-core machine are fastest on one).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from counterlens.attribution.base import Evaluator, explain
from counterlens.data.synthetic import generate
from counterlens.metrics.localization import (
    mass_lift,
    pointing_game,
    relevance_mass,
    relevance_rank,
)
from counterlens.metrics.sanity import model_randomisation
from counterlens.metrics.shortcut import audit, inpaint
from counterlens.model import Classifier, Normalize
from counterlens.models import brain_tumor_cnn, pneumonia_cnn
from counterlens.training import evaluate_accuracy, train_classifier

CHEST_RATES = (1.0, 0.9, 0.75, 0.5, None)


def _train(kind, factory, rate, args, log):
    data = generate(kind, args.n_train, size=args.size, seed=args.seed, split="train", shortcut_rate=rate)
    torch.manual_seed(args.seed)
    module = factory(len(data.classes), 1, (args.size, args.size), width=args.width)
    pre = Normalize([0.5], [0.25])
    t0 = time.perf_counter()
    train_classifier(module, torch.from_numpy(data.images), torch.from_numpy(data.labels), epochs=args.epochs,
                     batch_size=32, lr=2e-3, seed=args.seed, preprocess=pre, progress=False, device=args.device)
    clf = Classifier(module, preprocess=pre, classes=data.classes, device=args.device)
    log(f"  trained {kind} (marker rate {rate}) in {time.perf_counter() - t0:.1f} s")
    return clf


def _label(rate) -> str:
    if rate is None:
        return "clean: no markers"
    if rate == 0.5:
        return "marker uninformative (50%)"
    return f"shortcut: marker agrees {round(100 * rate)}%"


def chest(args, log) -> dict:
    test = generate("chest-xray", args.n_test, size=args.size, seed=args.seed, split="test", shortcut_rate=0.5)
    truth = generate("chest-xray", args.n_test, size=args.size, seed=args.seed, split="test", shortcut_rate=None)
    x, region, y = (torch.from_numpy(a) for a in (test.images, test.masks["marker"], test.labels))
    x_true = torch.from_numpy(truth.images)        # the same films, never marked
    has = region.flatten(1).any(1)
    fills = {}
    for method in ("normalized", "biharmonic"):
        inpaint(x[:4], region[:4], method)                                   # warm-up
        t0 = time.perf_counter()
        filled = inpaint(x[has], region[has], method)
        seconds = time.perf_counter() - t0
        hole = region[has].unsqueeze(1)
        err = (filled - x_true[has])[hole]
        fills[method] = {"mae": round(err.abs().mean().item(), 4), "bias": round(err.mean().item(), 4),
                         "ms_per_image": round(1000 * seconds / int(has.sum()), 2)}
    fills["marker itself"] = {"mae": round((x[has] - x_true[has])[region[has].unsqueeze(1)].abs().mean().item(), 4)}
    rows = []
    for rate in args.rates:
        clf = _train("chest-xray", pneumonia_cnn, rate, args, log)
        t0 = time.perf_counter()
        r = audit(clf, x, region, ("gradcam", "integrated_gradients"), y, batch_size=64, seed=args.seed,
                  n_random=args.n_random, params={"integrated_gradients": {"steps": args.ig_steps}})
        seconds = time.perf_counter() - t0
        pred = Evaluator(clf, 256).logits(torch.cat([x[has], x_true[has]])).argmax(1).cpu()
        true_flips = (pred[: int(has.sum())] != pred[int(has.sum()):]).double().mean().item()
        bi = audit(clf, x, region, (), y, seed=args.seed, n_random=args.n_random, inpaint="biharmonic")
        rows.append({"model": _label(rate), "shortcut_rate": rate,
                     "test_accuracy_clean_films": round(evaluate_accuracy(clf, x[~has], y[~has]), 4),
                     "audit_seconds": round(seconds, 1), "true_flip_rate": round(true_flips, 4),
                     "biharmonic": {k: bi[k] for k in ("region_flip_rate", "random_flip_rate", "relies_on_region")},
                     **{k: r[k] for k in ("relies_on_region", "region_flip_rate", "random_flip_rate", "n_images",
                                          "accuracy", "accuracy_region_removed", "flips", "methods", "verdict")}})
        log(f"  {rows[-1]['model']}: {r['verdict']}")
    return {"fills": fills, "audits": rows}


def brain(args, log) -> dict:
    clf = _train("brain-mri", brain_tumor_cnn, None, args, log)
    test = generate("brain-mri", args.n_test, size=args.size, seed=args.seed, split="test")
    x, y, tumour = (torch.from_numpy(a) for a in (test.images, test.labels, test.masks["tumor"]))
    keep = tumour.flatten(1).any(1)
    x, y, tumour = x[keep], y[keep], tumour[keep]
    acc = evaluate_accuracy(clf, x, y)
    maps = explain(clf, x, "predicted", methods=["gradcam", "integrated_gradients"], seed=args.seed,
                   integrated_gradients__steps=args.ig_steps)
    table = {}
    for method, m in maps.items():
        table[method] = {name: round(float(fn(m, tumour).nanmean()), 4) for name, fn in
                         (("mass_lift", mass_lift), ("relevance_mass", relevance_mass),
                          ("relevance_rank", relevance_rank), ("pointing_game", pointing_game))}
    sanity = model_randomisation(clf, x[: args.sanity_images], "gradcam", seed=args.seed)
    out = {"n_images": int(keep.sum()), "accuracy_on_tumour_slices": round(acc, 4),
           "tumour_share": round(tumour.flatten(1).float().mean().item(), 4), "methods": table,
           "gradcam_randomisation": {"layers": sanity.layers, "similarity": [round(s, 4) for s in sanity.similarity],
                                     "passed": sanity.passed, "n_images": args.sanity_images}}
    log(f"  brain-mri: {json.dumps(table)}")
    return out


def _rate_list(text: str) -> list:
    return [None if t.strip().lower() == "none" else float(t) for t in text.split(",")]


def _fmt(v, pct=False):
    if v is None:
        return "n/a"
    return f"{100 * v:.1f}%" if pct else f"{v:.2f}"


def markdown(res: dict) -> str:
    a = res["args"]
    lines = [(f"Chest-xray, pneumonia CNN (width {a['width']}), {a['size']}x{a['size']}, {a['n_train']} training "
              f"films, {a['epochs']} epochs, seed {a['seed']}; audited on {res['chest']['audits'][0]['n_images']} test "
              f"films with a marker (marker independent of the label), {a['n_random']} random regions each."), "",
             ("| trained on | accuracy, films without marker | true flip rate | relies on marker | region flip rate "
              "| random flip rate | biharmonic fill: region / random | Grad-CAM mass lift | Grad-CAM confounder sens. "
              "| IG mass lift | IG confounder sens. |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["chest"]["audits"]:
        g, ig = r["methods"]["gradcam"], r["methods"]["integrated_gradients"]
        lines.append(f"| {r['model']} | {_fmt(r['test_accuracy_clean_films'], 1)} | {_fmt(r['true_flip_rate'], 1)} "
                     f"| {'**yes**' if r['relies_on_region'] else 'no'} | {_fmt(r['region_flip_rate'], 1)} "
                     f"| {_fmt(r['random_flip_rate'], 1)} | {_fmt(r['biharmonic']['region_flip_rate'], 1)} / "
                     f"{_fmt(r['biharmonic']['random_flip_rate'], 1)} | {_fmt(g['mass_lift'])} "
                     f"| {_fmt(g['confounder_sensitivity'], 1)} | {_fmt(ig['mass_lift'])} "
                     f"| {_fmt(ig['confounder_sensitivity'], 1)} |")
    lines += ["", "Inpainting the marker (true background known): mean absolute error inside the marker, time per image.",
              "", "| fill | MAE | bias | ms / image |", "|---|---|---|---|"]
    for name, f in res["chest"]["fills"].items():
        lines.append(f"| {name} | {f['mae']:.4f} | {f.get('bias', 'n/a')} | {f.get('ms_per_image', 'n/a')} |")
    b = res["brain"]
    if b is None:
        return "\n".join(lines)
    lines += ["", (f"Brain-mri, brain-tumour CNN: {b['n_images']} test slices with a tumour (tumour = "
                   f"{100 * b['tumour_share']:.1f}% of the slice on average), "
                   f"accuracy {100 * b['accuracy_on_tumour_slices']:.1f}%."),
              "", "| method | mass lift | relevance mass | relevance rank | pointing game |", "|---|---|---|---|---|"]
    for m, v in b["methods"].items():
        lines.append(f"| {m} | {v['mass_lift']:.2f} | {v['relevance_mass']:.3f} | {v['relevance_rank']:.3f} "
                     f"| {v['pointing_game']:.3f} |")
    s = b["gradcam_randomisation"]
    lines += ["", f"Grad-CAM cascading randomisation ({s['n_images']} slices), Spearman similarity of |map| to the "
                  "original after randomising the layers from the top: "
              + ", ".join(f"{layer} {sim:.2f}" for layer, sim in zip(s["layers"], s["similarity"]))
              + f" (passed: {s['passed']})."]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--n-train", type=int, default=800)
    p.add_argument("--n-test", type=int, default=400)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--n-random", type=int, default=8)
    p.add_argument("--ig-steps", type=int, default=32)
    p.add_argument("--sanity-images", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="tiny settings (a smoke run)")
    p.add_argument("--rates", type=_rate_list, default=list(CHEST_RATES),
                   help="marker agreement rates of the chest models, 'none' for no markers (default: 1,0.9,0.75,0.5,none)")
    p.add_argument("--skip-brain", action="store_true")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.width, args.n_train, args.n_test, args.epochs = 32, 0.25, 300, 80, 3
        args.n_random, args.ig_steps, args.sanity_images = 2, 8, 4
    torch.set_num_threads(args.threads)
    log = lambda s: print(s, file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    res = {"args": vars(args) | {"json": str(args.json) if args.json else None},
           "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads},
           "chest": chest(args, log), "brain": None if args.skip_brain else brain(args, log)}
    res["seconds"] = round(time.perf_counter() - t0, 1)
    print(markdown(res))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
