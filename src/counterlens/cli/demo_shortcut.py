"""``counterlens demo --shortcut``: a model that reads a marker instead of the lung, and the audit
that catches it.

1. synthesise chest X-rays whose corner marker (a lead letter) agrees with the label in 90% of the
   training films; in the test films the marker is on half of each class, independent of the label;
2. train the pneumonia CNN on them (small and briefly, as a hurried project would);
3. audit the marker region on the test films: inpaint it, compare with random regions of the same
   area, score Grad-CAM and integrated gradients inside it;
4. write the run directory (audit.json, audit.md, maps) and the report with the audit's verdict.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

SHORTCUT_RATE = 0.9
ARCH, WIDTH, SIZE, EPOCHS, N_TRAIN, N_TEST = "pneumonia-cnn", 0.25, 64, 6, 800, 200


def run_shortcut_demo(args) -> Path:
    from ..data.synthetic import make_dataset, write_dataset
    from ..train_folder import train_model
    from ..viz.report import write_report
    from .audit import audit_cmd
    from .common import reusable_card

    say = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    out = Path(args.out) if str(args.out) != "demo-run" else Path("demo-shortcut-run")
    work = Path(args.work) if args.work else out.with_name(out.name + "-work")
    data_dir, model_dir = work / "data", work / "model"
    t_start = time.perf_counter()
    n_train = args.n_train if args.n_train != 1600 else N_TRAIN      # the brain demo's defaults -> this demo's
    n_test = args.n_test if args.n_test != 400 else N_TEST
    size = args.size if args.size != 64 else SIZE
    epochs = args.epochs or EPOCHS

    meta = data_dir / "dataset.json"
    have = json.loads(meta.read_text()) if meta.exists() else {}
    wanted = {"kind": "chest-xray", "size": size, "seed": args.seed, "shortcut_rate": SHORTCUT_RATE}
    counts = {split: sum(c.values()) for split, c in have.get("counts", {}).items()}
    if any(have.get(k) != v for k, v in wanted.items()) or counts != {"train": n_train, "test": n_test}:
        say(f"[1/4] synthesising {n_train} + {n_test} chest X-rays of {size}x{size}; in training the marker "
            f"agrees with the label in {round(100 * SHORTCUT_RATE)}% of the films ...")
        shutil.rmtree(data_dir, ignore_errors=True)
        sets = make_dataset("chest-xray", n_train=n_train, n_test=n_test, size=size, seed=args.seed,
                            shortcut_rate=SHORTCUT_RATE)
        write_dataset(sets, data_dir)
        shutil.rmtree(model_dir, ignore_errors=True)
    else:
        say(f"[1/4] reusing the synthetic data in {data_dir}")

    card = reusable_card(model_dir, ARCH, epochs)
    if card is None:
        say(f"[2/4] training {ARCH} (width {WIDTH}) for {epochs} epochs ...")
        card = train_model(data_dir, ARCH, model_dir, size=size, width=WIDTH, epochs=epochs, batch_size=32, lr=2e-3,
                           seed=args.seed, device=args.device, progress=not args.quiet, log=say)
    else:
        say(f"[2/4] reusing the model in {model_dir} (test accuracy {100 * card['test_accuracy']:.1f}%)")

    say("[3/4] auditing the marker region on the test films (inpainted vs random regions of the same area) ...")
    shutil.rmtree(out, ignore_errors=True)
    methods = ["gradcam", "integrated_gradients"] if not args.methods or args.methods == ["all"] else args.methods
    audit_args = argparse.Namespace(
        model=str(model_dir), factory=None, trust_model_file=False, classes=None, device=args.device,
        data=data_dir / "Testing", region=str(data_dir / "masks" / "marker"), out=out, methods=methods,
        param=["integrated_gradients.steps=32"] if "integrated_gradients" in methods else None, limit=None,
        batch_size=64, seed=args.seed, n_random=8, inpaint="normalized", min_flip_rate=0.1, fail_on_shortcut=False)
    audit_cmd(audit_args)
    result = json.loads((out / "audit.json").read_text())

    say("[4/4] writing the report ...")
    report = write_report(out)
    print(f"shortcut demo done in {time.perf_counter() - t_start:.0f} s: model test accuracy "
          f"{100 * card['test_accuracy']:.1f}% (films with and without markers); relies on the marker: "
          f"{'yes' if result['relies_on_region'] else 'no'}")
    print(f"report: {report.resolve()}")
    return report
