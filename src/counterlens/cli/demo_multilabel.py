"""``counterlens demo --multilabel``: a multi-label chest model, one map per image and finding.

1. synthesise chest films where opacity, pleural effusion and an enlarged heart occur
   independently (any two or all three together, or none), with a mask per finding and a
   ``labels.csv`` per split;
2. train the multi-label chest CNN (one sigmoid per finding, binary cross-entropy; the card says
   ``output: multilabel``, so every later step reads it as multi-label without flags);
3. explain test films with ``--target all-positive``: one map per image and positive finding;
4. switch the most probable finding of a few films off (counterfactuals; the other findings'
   probabilities are reported);
5. score every map against its own finding's mask and on its finding's score, and write the
   report (per-finding maps, probabilities and metric tables).
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

ARCH, WIDTH, SIZE, EPOCHS, N_TRAIN, N_TEST = "chest-findings-cnn", 1.0, 32, 12, 1000, 120
METHODS = ["gradcam", "gradcam_plus_plus", "integrated_gradients", "saliency", "occlusion"]
PARAMS = {"integrated_gradients": {"steps": 16}, "occlusion": {"window": 8, "stride": 4}}
STEPS = 5


def run_multilabel_demo(args) -> Path:
    from ..data.images import ImageFolder
    from ..data.synthetic import make_dataset, write_dataset
    from ..loading import load_model
    from ..runs.dataset import counterfactual_folder, explain_folder
    from ..runs.evaluate import evaluate_run
    from ..runs.store import open_run
    from ..train_folder import train_model
    from ..viz.report import write_report
    from .common import reusable_card

    say = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    progress = not args.quiet
    out = Path(args.out) if str(args.out) != "demo-run" else Path("demo-multilabel-run")
    work = Path(args.work) if args.work else out.with_name(out.name + "-work")
    data_dir, model_dir = work / "data", work / "model"
    n_train = args.n_train if args.n_train != 1600 else N_TRAIN      # the brain demo's defaults -> this demo's
    n_test = args.n_test if args.n_test != 400 else N_TEST
    size = args.size if args.size != 64 else SIZE
    epochs = args.epochs or EPOCHS
    t_start = time.perf_counter()

    meta = data_dir / "dataset.json"
    have = json.loads(meta.read_text()) if meta.exists() else {}
    if (have.get("kind"), have.get("size"), have.get("seed"), have.get("images")) != \
            ("chest-multilabel", size, args.seed, {"train": n_train, "test": n_test}):
        say(f"[1/{STEPS}] synthesising {n_train} + {n_test} chest films of {size}x{size} with any of opacity, "
            "effusion and an enlarged heart ...")
        shutil.rmtree(data_dir, ignore_errors=True)
        write_dataset(make_dataset("chest-multilabel", n_train=n_train, n_test=n_test, size=size, seed=args.seed),
                      data_dir)
        shutil.rmtree(model_dir, ignore_errors=True)   # a model of other data is stale
    else:
        say(f"[1/{STEPS}] reusing the synthetic data in {data_dir}")

    card = reusable_card(model_dir, ARCH, epochs)
    if card is None:
        say(f"[2/{STEPS}] training {ARCH} (a sigmoid per finding) for {epochs} epochs ...")
        card = train_model(data_dir, ARCH, model_dir, size=size, width=WIDTH, epochs=epochs, batch_size=32, lr=3e-3,
                           seed=args.seed, device=args.device, progress=progress, log=say)
    else:
        say(f"[2/{STEPS}] reusing the model in {model_dir}")
    auc = ", ".join(f"{k} {v:.2f}" for k, v in (card.get("test_auc") or {}).items() if v is not None)

    clf = load_model(model_dir, device=args.device)
    test = ImageFolder(data_dir / "Testing", channels=1, size=size, classes=clf.classes, masks=data_dir / "masks",
                       limit=args.cases)
    methods = METHODS if not args.methods or args.methods == ["all"] else list(args.methods)
    say(f"[3/{STEPS}] explaining {len(test)} test films, one map per positive finding ({', '.join(methods)}) ...")
    shutil.rmtree(out, ignore_errors=True)
    summary = explain_folder(clf, test, out, methods=methods, params={m: p for m, p in PARAMS.items() if m in methods},
                             target="all-positive", seed=args.seed, progress=progress, model_source=str(model_dir),
                             data_source=str(data_dir / "Testing"))
    run = open_run(out)
    n_maps = len(run.attributions[run.attributions.method == methods[0]])
    say(f"      {summary.done} films, {n_maps} findings explained, "
        f"{int((run.cases['prediction'] == 'none').sum())} with no positive finding")

    positive = run.cases[run.cases["prediction"] != "none"]
    n_cf = min(args.counterfactuals, len(positive))
    say(f"[4/{STEPS}] switching the most probable finding off in {n_cf} films (edits inside the lungs) ...")
    cf_set = ImageFolder(data_dir / "Testing", channels=1, size=size, classes=clf.classes,
                         masks=data_dir / "masks" / "lungs")
    chosen = set(positive["path"].head(n_cf))
    cf_set.records = [r for r in cf_set.records if r.path.name in chosen]
    cf = counterfactual_folder(clf, cf_set, out, target="other", params={"seed": args.seed, "steps": 300},
                               settings={"editable_masks": str(data_dir / "masks" / "lungs")}, progress=progress,
                               model_source=str(model_dir), data_source=str(data_dir / "Testing"))
    n_valid = int(open_run(out).counterfactuals["valid"].sum()) if cf.done else 0
    say(f"      {n_valid} of {cf.done} valid")

    say(f"[5/{STEPS}] scoring each map against its own finding's mask and on its finding's score; the report ...")
    evaluate_run(out, clf, seed=args.seed, steps=10, n_subsets=16, sanity=False, progress=progress)
    report = write_report(out)
    print(f"multi-label demo done in {time.perf_counter() - t_start:.0f} s: test AUC per finding {auc or '-'}; "
          f"{n_maps} finding maps per method for {summary.done} films; {n_valid}/{cf.done} findings switched off")
    print(f"report: {report.resolve()}")
    return report
