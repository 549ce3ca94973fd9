"""The reference models at their ``counterlens train`` defaults, at every documented size.

    python benchmarks/train_defaults.py                                  # every case, after (lr auto)
    python benchmarks/train_defaults.py --lr 1e-3 --cases pneumonia-cnn:224   # before: the old default
    python benchmarks/train_defaults.py --table                          # print the table of the JSON

Each case is the path a user takes: ``counterlens data synth KIND --out D --size S --n-train N``
(written to PNG / NIfTI files) then ``counterlens train --data D --arch ARCH --out M --size S`` with
every other flag at its default (width 1.0, ``--epochs auto``, batch 32, Adam, ``--lr auto``; ``--lr X``
gives the run before the fix). The test split has ``--n-test`` images. Each result is merged into
the JSON (keyed by arch, size, lr and n-train), so cases can run one at a time or in parallel.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from counterlens.data.synthetic import make_dataset, write_dataset
from counterlens.data.volumes import make_volume_dataset, write_volume_dataset
from counterlens.train_folder import default_epochs, train_model

#: arch -> (synthetic set, documented sizes)
CASES = {
    "pneumonia-cnn": ("chest-xray", (32, 64, 128, 224)),
    "brain-tumor-cnn": ("brain-mri", (32, 64, 128, 224)),
    "small-resnet": ("chest-xray", (32, 64, 128, 224)),
    "chest-findings-cnn": ("chest-multilabel", (32, 64, 128, 224)),
    "brain-tumor-cnn3d": ("brain-mri-3d", (32,)),
}
RESULTS = Path(__file__).parent / "results" / "train-defaults.json"


def run_case(arch: str, size: int, n_train: int, n_test: int, lr, threads: int, epochs="auto") -> dict:
    kind = CASES[arch][0]
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        data, out = Path(tmp) / "data", Path(tmp) / "model"
        start = time.perf_counter()
        if kind == "brain-mri-3d":
            write_volume_dataset(make_volume_dataset(n_train=n_train, n_test=n_test, size=size, seed=0), data)
        else:
            write_dataset(make_dataset(kind, n_train=n_train, n_test=n_test, size=size, seed=0), data)
        synth_s = time.perf_counter() - start
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            card = train_model(data, arch, out, size=size, width=1.0, epochs=epochs, batch_size=32, lr=lr, seed=0,
                               device="cpu", progress=False, log=lambda line: print("  " + line, flush=True))
    training = card["training"]
    return {"arch": arch, "size": size, "kind": kind, "n_train": n_train, "n_test": n_test,
            "lr": "auto" if lr == "auto" else lr, "layer_lr": training.get("layer_lr", {}),
            "epochs": training["epochs"], "test_accuracy": round(card["test_accuracy"], 4),
            "test_auc": card.get("test_auc"), "val_acc_per_epoch": training["val_acc_per_epoch"],
            "chance_warning": any("at chance" in str(w.message) for w in caught),
            "train_seconds": training["seconds"], "synth_seconds": round(synth_s, 1), "threads": threads,
            "torch": torch.__version__, "cpu_count": os.cpu_count()}


def table(results: list[dict]) -> str:
    rows = ["| arch | size | n-train / n-test | epochs | --lr | test accuracy | chance warning | train s |",
            "|---|---:|---:|---:|---|---:|---|---:|"]
    for r in sorted(results, key=lambda r: (list(CASES).index(r["arch"]), r["size"], str(r["lr"]), r["epochs"])):
        lr = "auto" + (" (" + ", ".join(f"{k} {v:.3g}" for k, v in r["layer_lr"].items()) + ")"
                       if r["layer_lr"] else "") if r["lr"] == "auto" else f"{r['lr']:g} (before)"
        acc = f"{100 * r['test_accuracy']:.1f}%"
        if r.get("test_auc"):
            acc += " (AUC " + ", ".join(f"{v:.2f}" for v in r["test_auc"].values() if v is not None) + ")"
        epochs = f"{r['epochs']}" + ("" if r["epochs"] == default_epochs(r["arch"]) else " (before)")
        rows.append(f"| {r['arch']} | {r['size']} | {r['n_train']} / {r['n_test']} | {epochs} | {lr} | {acc} "
                    f"| {'yes' if r['chance_warning'] else 'no'} | {r['train_seconds']:.0f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="*", default=None,
                    help="ARCH:SIZE items (default: every arch at every documented size)")
    ap.add_argument("--lr", default="auto", help="'auto' (the default of counterlens train) or a number (before)")
    ap.add_argument("--epochs", default="auto", help="'auto' (the default of counterlens train: 8, 16 for "
                    "chest-findings-cnn) or a number (8: before, for chest-findings-cnn)")
    ap.add_argument("--n-train", type=int, default=1600, help="training images (default: 1600, the synth default)")
    ap.add_argument("--n-test", type=int, default=400, help="test images (default: 400)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=RESULTS)
    ap.add_argument("--table", action="store_true", help="only print the table of --json")
    args = ap.parse_args(argv)
    results = json.loads(args.json.read_text()) if args.json.exists() else []
    if not args.table:
        lr = args.lr if args.lr == "auto" else float(args.lr)
        cases = ([(a, int(s)) for a, s in (c.split(":") for c in args.cases)] if args.cases else
                 [(a, s) for a, (_, sizes) in CASES.items() for s in sizes])
        for arch, size in cases:
            print(f"{arch} {size} (n-train {args.n_train}, --lr {lr})", flush=True)
            epochs = args.epochs if args.epochs == "auto" else int(args.epochs)
            r = run_case(arch, size, args.n_train, args.n_test, lr, args.threads, epochs)
            print(f"  -> test accuracy {100 * r['test_accuracy']:.1f}%", flush=True)
            results = json.loads(args.json.read_text()) if args.json.exists() else []   # others may have written
            results = [o for o in results if (o["arch"], o["size"], o["lr"], o["n_train"], o["epochs"])
                       != (r["arch"], r["size"], r["lr"], r["n_train"], r["epochs"])] + [r]
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
