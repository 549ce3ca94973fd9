"""``counterlens train``: a reference CNN trained on an image folder and saved as a model directory
(:func:`train_model`), with the learning-rate rule it records and the warning for a model that
ended at chance (:func:`chance_warning`). The training loop itself is :mod:`counterlens.training`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import InputError
from .model import Classifier, Normalize
from .training import (AUTO_LR, AUTO_LR_FAN_IN, _batched_logits, evaluate_accuracy, fan_in_lr, finding_auc,
                       train_classifier)

__all__ = ["train_model", "chance_warning", "default_epochs"]

#: ``epochs="auto"``: training epochs per architecture (every other one: :data:`AUTO_EPOCHS`). The
#: multi-label chest CNN averages weak evidence for three findings over the film: at 8 epochs it
#: learns effusion only beyond 32 px; at 16 every finding (BENCHMARKS.md, "Reference models at their defaults").
AUTO_EPOCHS = 8
EPOCHS_BY_ARCH = {"chest-findings-cnn": 16}


def default_epochs(arch: str) -> int:
    """The epochs ``counterlens train`` runs for ``arch`` when ``--epochs`` is not given."""
    return EPOCHS_BY_ARCH.get(arch, AUTO_EPOCHS)


def train_model(data: Path, arch: str, out: Path, *, size: int, width: float, epochs: int | str = "auto", batch_size: int,
                lr: float | str = "auto", seed: int, device: str, progress: bool, log=print,
                volume: bool | None = None) -> dict:
    """Train ``arch`` on ``data`` and write a model directory; returns the model card.

    ``lr``: Adam's learning rate for every layer, or ``"auto"``: :data:`AUTO_LR`, and for each dense
    layer wider than :data:`AUTO_LR_FAN_IN` inputs the smaller rate of :func:`fan_in_lr` (the card's
    ``training`` section records the rule and the rates). ``volume``: train on whole volumes resized
    to ``size``^3 (NIfTI files, DICOM series folders) and build the 3-D network; default: when ``arch``
    is a 3-D architecture (``brain-tumor-cnn3d``). ``epochs``: a number, or ``"auto"``:
    :func:`default_epochs` (8; 16 for ``chest-findings-cnn``)."""
    from .data.folders import load_arrays, split_folders
    from .data.images import ImageFolder
    from .loading import save_model_card
    from .models import architecture_name, build_model

    arch = architecture_name(arch)   # fail before loading any data
    if epochs == "auto":
        epochs = default_epochs(arch)
    elif isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise InputError(f"train: epochs={epochs!r}; pass a positive integer or 'auto'")
    auto_lr = isinstance(lr, str)
    if auto_lr and lr != "auto":
        raise InputError(f"train: lr={lr!r}; pass a positive number or 'auto'")
    if not auto_lr and not lr > 0:
        raise InputError(f"train: lr={lr!r}; pass a positive number such as 1e-3, or 'auto'")
    from .models import VOLUME_ARCHITECTURES
    shape = (size,) * (3 if (arch in VOLUME_ARCHITECTURES if volume is None else volume) else 2)
    train_dir, test_dir = split_folders(Path(data))
    train_set = ImageFolder(train_dir, channels=1, size=shape)
    classes = train_set.classes
    x, y = load_arrays(train_set, progress)
    x_test = y_test = None
    if test_dir is not None:
        x_test, y_test = load_arrays(ImageFolder(test_dir, channels=1, size=shape, classes=classes), progress)
    else:   # hold out 20%, seeded
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        n_test = max(1, len(x) // 5)
        x_test, y_test, x, y = x[perm[:n_test]], y[perm[:n_test]], x[perm[n_test:]], y[perm[n_test:]]
    kwargs = {"num_classes": len(classes), "in_channels": 1, "input_size": list(shape), "width": width}
    torch.manual_seed(seed)
    module = build_model(arch, **kwargs)
    preprocess = Normalize([0.5], [0.25])
    lr, layer_lr = (AUTO_LR, fan_in_lr(module)) if auto_lr else (float(lr), {})
    log(f"training {arch} on {len(x)} images of {'x'.join(map(str, shape))} ({', '.join(classes)}"
        f"{'; multi-label: a sigmoid per finding' if train_set.multilabel else ''}), {epochs} epochs, "
        f"learning rate {lr:g}{' (auto)' if auto_lr else ''}"
        + "".join(f", {name} {rate:.3g} (fan-in {module.get_submodule(name).in_features})"
                  for name, rate in layer_lr.items()))
    result = train_classifier(module, x, y, x_val=x_test, y_val=y_test, epochs=epochs, batch_size=batch_size,
                               lr=lr, seed=seed, preprocess=preprocess, progress=progress, device=device,
                               layer_lr=layer_lr)
    clf = Classifier(module, preprocess=preprocess, classes=classes, device=device,
                     output="multilabel" if train_set.multilabel else "auto")
    accuracy = evaluate_accuracy(clf, x_test, y_test)
    head = {}
    if train_set.multilabel:         # the card says how to read the outputs, and how well each finding does
        scores = _batched_logits(clf.logits, x_test, clf.device, 256).detach().cpu()
        head = {"test_auc": {c: finding_auc(scores[:, k], y_test[:, k]) for k, c in enumerate(classes)}}
    save_model_card(module.cpu(), out, architecture=arch, kwargs=kwargs, classes=classes, preprocess=preprocess,
                    in_channels=1, input_size=list(shape), value_range=[0, 1],
                    output="multilabel" if train_set.multilabel else None,
                    extra={**head, "test_accuracy": accuracy, "n_test": len(x_test),
                           "trained_on": str(Path(data).resolve()),
                           "training": {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
                                        "width": width, "lr_rule": _lr_rule(auto_lr),
                                        "layer_lr": {k: float(f"{v:.6g}") for k, v in layer_lr.items()},
                                        "seconds": round(float(result["seconds"]), 1),
                                        "val_acc_per_epoch": [round(a, 4) for a in result["history"]["val_acc"]]}})
    auc = ", ".join(f"{c} {v:.3f}" for c, v in head.get("test_auc", {}).items() if v is not None)
    log(f"test accuracy {100 * accuracy:.1f}%{' per finding' if head else ''} on {len(x_test)} images"
        f"{f' (AUC {auc})' if auc else ''}; model written to {out}")
    at_chance = chance_warning(accuracy, len(classes), head.get("test_auc"))
    if at_chance:
        import warnings
        warnings.warn(at_chance, stacklevel=2)
    return json.loads((Path(out) / "model.json").read_text())


def _lr_rule(auto: bool) -> str:
    if not auto:
        return "given: every layer at lr"
    f = AUTO_LR_FAN_IN
    return f"auto: lr {AUTO_LR:g}; a dense layer with fan-in F > {f} at lr * {f} / F (layer_lr)"


CHANCE_MARGIN = 0.05


def chance_warning(accuracy: float, n_classes: int, aucs: dict | None = None) -> str | None:
    """The warning for a model that ended at chance on its test images, else None.

    Single-label: accuracy within ``CHANCE_MARGIN`` of ``1 / n_classes`` (or below it). Multi-label
    (``aucs``: the test AUC per finding): the mean AUC within ``CHANCE_MARGIN`` of 0.5 (or below it),
    or else any one finding's AUC there (named)."""
    fix = ("the model learned nothing usable; try a lower --lr, a smaller --width (e.g. 0.25) "
           "or more --epochs")
    if aucs is not None:
        values = [v for v in aucs.values() if v is not None]
        if values and sum(values) / len(values) <= 0.5 + CHANCE_MARGIN:
            return f"test AUC {sum(values) / len(values):.3f} (mean over findings) is at chance (0.5): {fix}"
        weak = [f"{name} {v:.3f}" for name, v in aucs.items() if v is not None and v <= 0.5 + CHANCE_MARGIN]
        if weak:                     # one finding learned nothing while the others hide it in the mean
            return (f"test AUC at chance (0.5) for {len(weak)} of {len(values)} findings ({', '.join(weak)}): "
                    f"maps and counterfactuals of those findings show nothing the model learned; {fix.replace('the model learned nothing usable; ', '')}")
        return None
    chance = 1.0 / max(int(n_classes), 1)
    if accuracy <= chance + CHANCE_MARGIN:
        return (f"test accuracy {100 * accuracy:.1f}% is at chance for {n_classes} classes "
                f"({100 * chance:.0f}%): {fix}")
    return None
