"""``counterlens demo``: the whole path on synthetic brain MRI, offline, in a few minutes on a CPU.

1. synthesise brain-MRI slices (4 classes, tumour and brain masks) as PNG folders;
2. train the brain-tumour CNN (reused when the model directory is already there);
3. pick test cases, correct and incorrect ones, across the classes;
4. explain them with every attribution method into a run directory;
5. search counterfactuals for 8 of them (edits only inside the brain);
6. score the maps (faithfulness, localisation in the tumour mask, complexity, randomisation
   sanity check) and write the report with per-case figures.

``counterlens demo --shortcut`` runs the chest X-ray shortcut case instead (see :mod:`.demo_shortcut`);
``counterlens demo --multilabel`` the multi-label chest model (see :mod:`.demo_multilabel`).
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from ..attribution.base import METHODS, Evaluator
from ..data.folders import load_arrays
from ..train_folder import train_model
from .common import reusable_card

DEMO_ARCH = "brain-tumor-cnn"
DEMO_WIDTH = 0.5
DEMO_EPOCHS = 8
DEMO_COUNTERFACTUALS = 8
# every method, with sample counts that keep the demo in minutes on 2 CPU cores (each one's own
# defaults are larger; see `counterlens methods`)
DEMO_PARAMS = {"integrated_gradients": {"steps": 32}, "smoothgrad": {"samples": 16}, "vargrad": {"samples": 16},
               "squaregrad": {"samples": 16}, "lime": {"samples": 300}, "kernel_shap": {"samples": 300},
               "rise": {"samples": 500}}
SANITY_METHODS = ("saliency", "input_x_gradient", "guided_backprop", "deconvnet", "integrated_gradients", "gradcam",
                  "gradcam_plus_plus", "layercam", "guided_gradcam")   # the randomisation test reruns each per layer
STEPS = 6


def pick_cases(predictions: torch.Tensor, labels: torch.Tensor, n: int, max_incorrect: int | None = None) -> list[int]:
    """Indices of ``n`` cases: the incorrect ones first (at most a quarter of n), then correct ones
    taken round-robin over the classes, so the report shows both kinds and every class."""
    max_incorrect = n // 4 if max_incorrect is None else max_incorrect
    wrong = [i for i in range(len(labels)) if predictions[i] != labels[i]][:max_incorrect]
    by_class: dict[int, list[int]] = {}
    for i in range(len(labels)):
        if predictions[i] == labels[i]:
            by_class.setdefault(int(labels[i]), []).append(i)
    right: list[int] = []
    while len(wrong) + len(right) < n and any(by_class.values()):
        for c in sorted(by_class):
            if by_class[c] and len(wrong) + len(right) < n:
                right.append(by_class[c].pop(0))
    return sorted(wrong + right)


def demo(args) -> int:
    run_demo(args)
    return 0


def run_demo(args) -> Path:
    if getattr(args, "shortcut", False):
        from .demo_shortcut import run_shortcut_demo
        return run_shortcut_demo(args)
    if getattr(args, "multilabel", False):
        from .demo_multilabel import run_multilabel_demo
        return run_multilabel_demo(args)
    from ..data.images import ImageFolder
    from ..data.synthetic import make_dataset, write_dataset
    from ..loading import load_model
    from ..runs.evaluate import evaluate_run
    from ..runs.dataset import counterfactual_folder, explain_folder
    from ..runs.store import open_run
    from ..viz.report import write_report

    progress = not args.quiet
    say = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    out = Path(args.out)
    work = Path(args.work) if args.work else out.with_name(out.name + "-work")
    data_dir, model_dir = work / "data", work / "model"
    epochs = args.epochs or DEMO_EPOCHS
    t_start = time.perf_counter()

    wanted = {"kind": "brain-mri", "size": args.size, "seed": args.seed, "train": args.n_train, "test": args.n_test}
    if not _same_dataset(data_dir, wanted):
        say(f"[1/{STEPS}] synthesising {args.n_train} + {args.n_test} brain-MRI slices of {args.size}x{args.size} ...")
        shutil.rmtree(data_dir, ignore_errors=True)
        sets = make_dataset("brain-mri", n_train=args.n_train, n_test=args.n_test, size=args.size, seed=args.seed)
        write_dataset(sets, data_dir)
        shutil.rmtree(model_dir, ignore_errors=True)   # a model of other data is stale
    else:
        say(f"[1/{STEPS}] reusing the synthetic data in {data_dir}")

    card = reusable_card(model_dir, DEMO_ARCH, epochs)
    if card is None:
        say(f"[2/{STEPS}] training {DEMO_ARCH} (width {DEMO_WIDTH}) for {epochs} epochs ...")
        card = train_model(data_dir, DEMO_ARCH, model_dir, size=args.size, width=DEMO_WIDTH, epochs=epochs,
                           batch_size=32, lr=2e-3, seed=args.seed, device=args.device, progress=progress, log=say)
    else:
        say(f"[2/{STEPS}] reusing the model in {model_dir} (test accuracy {100 * card['test_accuracy']:.1f}%)")

    clf = load_model(model_dir, device=args.device)
    test = ImageFolder(data_dir / "Testing", channels=1, size=args.size, classes=clf.classes,
                       masks=data_dir / "masks" / "tumor")
    x, y = load_arrays(test)
    pred = Evaluator(clf, 256).logits(x.to(clf.device)).argmax(dim=1).cpu()
    cases = pick_cases(pred, y, args.cases)
    n_wrong = sum(int(pred[i] != y[i]) for i in cases)
    say(f"[3/{STEPS}] picked {len(cases)} test cases ({n_wrong} misclassified) of {len(test)}")
    test.records = [test.records[i] for i in cases]

    methods = sorted(METHODS) if not getattr(args, "methods", None) or args.methods == ["all"] else list(args.methods)
    say(f"[4/{STEPS}] explaining them with all {len(methods)} attribution methods into {out} ...")
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    params = {m: p for m, p in DEMO_PARAMS.items() if m in methods}
    summary = explain_folder(clf, test, out, methods=methods, params=params, seed=args.seed, progress=progress,
                             model_source=str(model_dir), data_source=str(data_dir / "Testing"))
    say(f"      {summary.done} cases in {time.perf_counter() - t0:.0f} s")

    n_cf = min(getattr(args, "counterfactuals", DEMO_COUNTERFACTUALS), len(test.records))
    say(f"[5/{STEPS}] counterfactuals for {n_cf} cases (any other class; edits only inside the brain) ...")
    cf_set = ImageFolder(data_dir / "Testing", channels=1, size=args.size, classes=clf.classes,
                         masks=data_dir / "masks" / "brain")
    cf_set.records = [r for r in cf_set.records if r.path in {t.path for t in test.records}][:n_cf]
    train = load_arrays(ImageFolder(data_dir / "Training", channels=1, size=args.size, classes=clf.classes))
    cf = counterfactual_folder(clf, cf_set, out, target="other", params={"seed": args.seed}, progress=progress,
                               train=train, settings={"editable_masks": str(data_dir / "masks" / "brain"),
                                                      "train_data": str(data_dir / "Training")},
                               model_source=str(model_dir), data_source=str(data_dir / "Testing"))
    n_valid = int(open_run(out).counterfactuals["valid"].sum())
    say(f"      {n_valid} of {cf.done} valid in {cf.seconds:.0f} s")

    say(f"[6/{STEPS}] scoring the maps (faithfulness, localisation in the tumour, sanity check) and writing the report ...")
    t0 = time.perf_counter()
    evaluate_run(out, clf, masks_dir=data_dir / "masks" / "tumor", seed=args.seed, progress=progress,
                 steps=10, n_subsets=16, sanity_images=4, sanity_methods=SANITY_METHODS)
    report = write_report(out, figures=True)
    say(f"      {time.perf_counter() - t0:.0f} s")
    print(f"demo done in {time.perf_counter() - t_start:.0f} s: model test accuracy "
          f"{100 * card['test_accuracy']:.1f}%, {summary.done} cases explained with {len(methods)} methods, "
          f"{n_valid}/{cf.done} valid counterfactuals, metrics in {out / 'metrics.csv'}")
    print(f"report: {report.resolve()}")
    return report


def _same_dataset(data_dir: Path, wanted: dict) -> bool:
    meta = data_dir / "dataset.json"
    if not meta.exists():
        return False
    have = json.loads(meta.read_text())
    have.update({split: sum(per_class.values()) for split, per_class in have.get("counts", {}).items()})
    return all(have.get(k) == v for k, v in wanted.items())
