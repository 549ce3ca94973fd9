"""What each CLI subcommand does, on top of the library. One function per subcommand."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from .attribution.base import METHODS, get_method
from .errors import CounterlensError, InputError



def _say(args, text: str) -> None:
    if not getattr(args, "quiet", False):
        print(text, flush=True)


# -- data synth -----------------------------------------------------------------------------------
def data_synth(args) -> int:
    from .data.synthetic import make_dataset, write_dataset
    if args.shortcut_rate is not None and args.kind != "chest-xray":
        raise InputError("--shortcut-rate plants a marker in chest-xray images only; drop it for brain-mri")
    t0 = time.perf_counter()
    sets = make_dataset(args.kind, n_train=args.n_train, n_test=args.n_test, size=args.size, seed=args.seed,
                        shortcut_rate=args.shortcut_rate)
    out = write_dataset(sets, args.out)
    print(f"wrote {args.n_train} training and {args.n_test} test {args.kind} images to {out} "
          f"in {time.perf_counter() - t0:.1f} s (classes: {', '.join(sets['train'].classes)}; "
          f"masks in {out / 'masks'})")
    return 0


# -- train ----------------------------------------------------------------------------------------
def load_arrays(dataset, progress: bool = False, labels: bool = True):
    """Every image of an ImageFolder in memory: ``x [N, C, *S]`` float32 and, with ``labels``,
    ``y [N]`` int64 (then every image must have a label)."""
    from tqdm.auto import tqdm
    images, ys = [], []
    for i in tqdm(range(len(dataset)), desc=f"loading {dataset.root.name}", unit="img", disable=not progress):
        image, label, _ = dataset.load(i)
        if labels and label is None:
            raise InputError(f"{dataset.root}: training needs labels; put images in class subfolders")
        images.append(image)
        ys.append(label)
    x = torch.from_numpy(np.stack(images))
    return (x, torch.tensor(ys, dtype=torch.long)) if labels else x


def split_folders(root: Path) -> tuple[Path, Path | None]:
    """``(train_dir, test_dir)``: ``Training``/``Testing`` (or train/test) subfolders when present."""
    for train_name, test_name in (("Training", "Testing"), ("train", "test")):
        if (root / train_name).is_dir():
            return root / train_name, (root / test_name) if (root / test_name).is_dir() else None
    return root, None


def train_model(data: Path, arch: str, out: Path, *, size: int, width: float, epochs: int, batch_size: int,
                lr: float, seed: int, device: str, progress: bool, log=print) -> dict:
    """Train ``arch`` on ``data`` and write a model directory; returns the model card."""
    from .data.images import ImageFolder
    from .loading import save_model_card
    from .model import Classifier, Normalize
    from .models import architecture_name, build_model
    from .training import evaluate_accuracy, train_classifier

    arch = architecture_name(arch)   # fail before loading any data
    train_dir, test_dir = split_folders(Path(data))
    train_set = ImageFolder(train_dir, channels=1, size=size)
    classes = train_set.classes
    x, y = load_arrays(train_set, progress)
    x_test = y_test = None
    if test_dir is not None:
        x_test, y_test = load_arrays(ImageFolder(test_dir, channels=1, size=size, classes=classes), progress)
    else:   # hold out 20%, seeded
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        n_test = max(1, len(x) // 5)
        x_test, y_test, x, y = x[perm[:n_test]], y[perm[:n_test]], x[perm[n_test:]], y[perm[n_test:]]
    kwargs = {"num_classes": len(classes), "in_channels": 1, "input_size": [size, size], "width": width}
    torch.manual_seed(seed)
    module = build_model(arch, **kwargs)
    preprocess = Normalize([0.5], [0.25])
    log(f"training {arch} on {len(x)} images of {size}x{size} ({', '.join(classes)}), {epochs} epochs")
    result = train_classifier(module, x, y, x_val=x_test, y_val=y_test, epochs=epochs, batch_size=batch_size,
                               lr=lr, seed=seed, preprocess=preprocess, progress=progress, device=device)
    clf = Classifier(module, preprocess=preprocess, classes=classes, device=device)
    accuracy = evaluate_accuracy(clf, x_test, y_test)
    save_model_card(module.cpu(), out, architecture=arch, kwargs=kwargs, classes=classes, preprocess=preprocess,
                    in_channels=1, input_size=[size, size], value_range=[0, 1],
                    extra={"test_accuracy": accuracy, "n_test": len(x_test), "trained_on": str(Path(data).resolve()),
                           "training": {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
                                        "seconds": round(float(result["seconds"]), 1),
                                        "val_acc_per_epoch": [round(a, 4) for a in result["history"]["val_acc"]]}})
    log(f"test accuracy {100 * accuracy:.1f}% on {len(x_test)} images; model written to {out}")
    return json.loads((Path(out) / "model.json").read_text())


def train(args) -> int:
    train_model(args.data, args.arch, args.out, size=args.size, width=args.width, epochs=args.epochs,
                batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device, progress=not args.quiet)
    return 0


# -- explain --------------------------------------------------------------------------------------
def load_classifier(args):
    from .loading import load_model
    return load_model(args.model, factory=args.factory, trust_model_file=args.trust_model_file,
                      device=args.device, classes=args.classes)


def model_spec(clf, source: str) -> dict:
    """How ``run.yaml`` describes the model: source, SHA-256, classes, sizes, preprocessing."""
    card = getattr(clf, "card", None) or {}
    return {"source": str(source), "sha256": getattr(clf, "source_hash", None),
            "description": card.get("architecture") or card.get("factory") or type(clf.module).__name__,
            "classes": clf.classes, "in_channels": clf.in_channels,
            "input_size": list(clf.input_size) if clf.input_size else None,
            "value_range": list(clf.value_range) if clf.value_range else None,
            "preprocess": card.get("preprocess"), "test_accuracy": card.get("test_accuracy")}


def run_explain(clf, dataset, out: Path, *, methods: list[str], params: dict, target="predicted",
                batch_size: int = 64, seed: int = 0, images_per_batch: int = 16, progress: bool = True,
                model_source: str = "", data_source: str = "", report: bool = True, clip_percentile: float = 0.5):
    """Write (or resume) a run directory for ``dataset`` and its report; returns (summary, report path)."""
    from .runs.runner import explain_dataset, package_versions, resolved_methods
    from .runs.store import RunStore
    from .viz.report import write_report

    resolved = resolved_methods(methods, params, batch_size, seed)
    spec = {
        "model": model_spec(clf, model_source),
        "data": {"path": data_source, "images": len(dataset), "classes": dataset.classes},
        "target": target, "seed": seed, "batch_size": batch_size,
        "methods": resolved, "device": str(clf.device), "versions": package_versions(),
    }
    with RunStore(out) as store:
        previous = store.read_spec()
        if previous and (previous.get("model", {}).get("sha256") != spec["model"]["sha256"]
                         or previous.get("methods") != spec["methods"]):
            raise CounterlensError(f"{out} holds a run with another model or other method settings; "
                                   "pass a new --out directory (or delete the old one)")
        store.write_spec(spec)
        summary = explain_dataset(clf, dataset, store, methods=resolved, target=target,
                                  images_per_batch=images_per_batch, progress=progress)
    path = write_report(out, clip_percentile=clip_percentile) if report else None
    return summary, path


def explain(args) -> int:
    from .cli import parse_params
    from .data.images import ImageFolder
    methods = list(METHODS) if args.methods == ["all"] else [get_method(m).name for m in args.methods]
    params = parse_params(args.param)
    clf = load_classifier(args)
    size = clf.input_size
    dataset = ImageFolder(args.data, channels=1 if (clf.in_channels or 1) == 1 else clf.in_channels,
                          size=size, classes=clf.classes if _has_class_folders(args.data) else None,
                          masks=args.masks, limit=args.limit)
    target = _target_arg(args.target)
    summary, report = run_explain(clf, dataset, args.out, methods=methods, params=params, target=target,
                                  batch_size=args.batch_size, seed=args.seed,
                                  images_per_batch=args.images_per_batch, progress=not args.quiet,
                                  model_source=str(args.model), data_source=str(args.data),
                                  report=not args.no_report, clip_percentile=args.clip_percentile)
    print(f"explained {summary.done} images ({summary.skipped} already done, {summary.failed} failed) "
          f"in {summary.seconds:.1f} s; run directory: {args.out}")
    if report:
        print(f"report: {report}")
    return 1 if summary.failed and not summary.done and not summary.skipped else 0


def _has_class_folders(root: Path) -> bool:
    root = Path(root)
    return root.is_dir() and any(d.is_dir() and not d.name.startswith(".") for d in root.iterdir())


def _target_arg(text: str):
    return int(text) if text.lstrip("-").isdigit() else text


# -- counterfactual --------------------------------------------------------------------------------
def counterfactual_cmd(args) -> int:
    from .data.images import ImageFolder
    from .runs.runner import counterfactual_dataset, package_versions
    from .runs.store import RunStore
    from .viz.report import write_report
    clf = load_classifier(args)
    channels = 1 if (clf.in_channels or 1) == 1 else clf.in_channels
    dataset = ImageFolder(args.data, channels=channels,
                          size=clf.input_size, classes=clf.classes if _has_class_folders(args.data) else None,
                          masks=args.editable_masks, limit=args.limit)
    params = {"threshold": args.threshold, "steps": args.steps, "candidates": args.candidates,
              "l1": args.l1, "l2": args.l2, "tv": args.tv, "schedule": args.schedule, "early_stop": args.early_stop,
              "batch_size": args.batch_size, "seed": args.seed}
    if (args.prototypes or args.latent) and args.prior is None:
        raise InputError(f"{'--prototypes' if args.prototypes else '--latent'} needs --prior PRIOR "
                         "(an autoencoder from `counterlens fit-prior`)")
    if args.prototypes and args.train_data is None:
        raise InputError("--prototypes needs --train-data DIR: the labelled training images the prototypes are "
                         "the class means of")
    train = None
    if args.train_data is not None:
        if not _has_class_folders(args.train_data):
            raise InputError(f"--train-data {args.train_data}: expected a folder with one subfolder per class")
        train_set = ImageFolder(args.train_data, channels=channels, size=clf.input_size, classes=clf.classes)
        train = load_arrays(train_set, progress=not args.quiet)
    if args.prior is not None:
        from .counterfactual.prior import AutoencoderPrior, class_prototypes
        prior = AutoencoderPrior.load(args.prior, device=clf.device)
        prior_weight = 0.0 if args.prototypes else args.prior_weight
        params.update(prior=prior, prior_weight=prior_weight if not args.latent else 0.0, latent=args.latent)
        if args.prototypes:
            n_classes = len(clf.classes) if clf.classes else int(train[1].max()) + 1
            params.update(prototypes=class_prototypes(prior, train[0], train[1], n_classes),
                          proto_weight=args.proto_weight)
    target = _target_arg(args.target)
    with RunStore(args.out) as store:
        spec = store.read_spec()
        if spec and spec.get("model", {}).get("sha256") != getattr(clf, "source_hash", None):
            raise CounterlensError(f"{args.out} holds a run of another model; pass a new --out directory")
        spec.setdefault("model", model_spec(clf, args.model))
        spec.setdefault("data", {"path": str(args.data), "images": len(dataset), "classes": dataset.classes})
        spec.setdefault("device", str(clf.device))
        spec.setdefault("versions", package_versions())
        spec["counterfactual"] = {"target": target, "editable_masks": str(args.editable_masks or ""),
                                  "prior": str(args.prior or ""), "train_data": str(args.train_data or ""),
                                  **{k: v for k, v in params.items() if k not in ("prior", "prototypes")}}
        store.write_spec(spec)
        summary = counterfactual_dataset(clf, dataset, store, target=target, params=params,
                                         images_per_batch=args.images_per_batch, progress=not args.quiet,
                                         train=train)
    print(f"counterfactuals for {summary.done} images ({summary.skipped} already done, {summary.failed} failed) "
          f"in {summary.seconds:.1f} s; run directory: {args.out}")
    if not args.no_report:
        print(f"report: {write_report(args.out)}")
    return 0


# -- methods, report --------------------------------------------------------------------------------
def methods(args) -> int:
    width = max(len(n) for n in METHODS)
    for name, info in sorted(METHODS.items()):
        print(f"{name:<{width}}  {info.summary}")
        defaults = ", ".join(f"{k}={v!r}" for k, v in info.defaults().items())
        print(f"{'':<{width}}  parameters: {defaults}")
    return 0


def report(args) -> int:
    from .viz.report import write_report
    path = write_report(args.run, clip_percentile=args.clip_percentile, figures=args.figures,
                        page_size=args.page_size)
    print(f"report: {path}")
    print(f"all metrics: {Path(args.run) / 'results.csv'}"
          + (f"; figures: {Path(args.run) / 'figures'}" if args.figures else ""))
    return 0


def demo(args) -> int:
    from .demo import run_demo
    run_demo(args)
    return 0
