"""Deterministic training of a classifier on in-memory tensors (for the demos, tests and benchmarks);
:func:`counterlens.train_folder.train_model` trains a reference CNN on an image folder with it.

``x`` is always in *data space* (pixel values as loaded); ``preprocess`` (e.g. ``Normalize``) is
applied before the network during training exactly as :class:`~counterlens.model.Classifier`
applies it when explaining, so a model card saved with the same ``preprocess`` reproduces the
trained model.

On the CPU the same ``seed`` gives bitwise the same weights (same torch build and thread count).
On a GPU, cuDNN kernels may add run-to-run noise.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from .errors import InputError
from .model import Classifier, preprocess_from_spec, resolve_device

__all__ = ["train_classifier", "evaluate_accuracy", "random_flip_shift", "fan_in_lr"]


#: ``lr="auto"`` (:func:`fan_in_lr`): Adam's base rate, and the fan-in above which a dense layer's rate shrinks.
AUTO_LR, AUTO_LR_FAN_IN = 1e-3, 8192


def _as_xy(x, y, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate ``x [N, C, *spatial]`` (float) and ``y [N]`` (int class indices) or, multi-label,
    ``y [N, K]`` (1 present, 0 absent, -1 unknown per finding)."""
    x = torch.as_tensor(x)
    y = torch.as_tensor(y)
    if x.dim() < 3:
        raise InputError(f"{name}: x has shape {tuple(x.shape)}; expected [N, channels, *spatial]")
    if y.dim() == 2 and y.shape[0] == x.shape[0]:
        if not torch.isin(y, torch.tensor([-1, 0, 1], dtype=y.dtype)).all():
            raise InputError(f"{name}: multi-label y [N, K] holds values other than 1, 0 and -1 (unknown)")
        x = x.float() if not torch.is_floating_point(x) or x.dtype == torch.float64 else x
        if not torch.isfinite(x).all():
            raise InputError(f"{name}: x contains NaN or infinite values")
        return x, y.long()
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise InputError(f"{name}: y has shape {tuple(y.shape)}; expected [{x.shape[0]}] (one label per row of x) or "
                         f"[{x.shape[0]}, K] (multi-label: 0/1 per finding)")
    if x.shape[0] == 0:
        raise InputError(f"{name}: x is empty")
    if torch.is_floating_point(y) and not torch.equal(y, y.round()):
        raise InputError(f"{name}: y holds non-integer values; pass class indices 0..n_classes-1")
    y = y.long()
    x = x.float() if not torch.is_floating_point(x) or x.dtype == torch.float64 else x
    if not torch.isfinite(x).all():
        raise InputError(f"{name}: x contains NaN or infinite values")
    if y.min() < 0:
        raise InputError(f"{name}: y has negative labels; pass class indices 0..n_classes-1")
    return x, y


def _resolve_preprocess(preprocess, device):
    if isinstance(preprocess, list):
        preprocess = preprocess_from_spec(preprocess)
    if isinstance(preprocess, nn.Module):
        preprocess = preprocess.to(device).eval()
    return preprocess


def _batched_logits(forward: Callable, x: torch.Tensor, device, batch_size: int) -> torch.Tensor:
    return torch.cat([forward(x[i:i + batch_size].to(device)) for i in range(0, x.shape[0], batch_size)])


@torch.no_grad()
def evaluate_accuracy(classifier_or_module, x, y, batch_size: int = 256, preprocess=None) -> float:
    """Fraction of rows of ``x [N, C, *spatial]`` (data space) whose argmax logit equals ``y [N]``
    (multi-label ``y [N, K]``: of the known labels whose logit has the label's sign).

    A :class:`Classifier` uses its own preprocessing and device; a bare module gets ``preprocess``
    first and runs on its parameters' device. Runs in eval mode and restores the module's modes.
    """
    x, y = _as_xy(x, y, "evaluate_accuracy")
    if batch_size < 1:
        raise InputError(f"evaluate_accuracy: batch_size={batch_size}; pass a positive number")
    if isinstance(classifier_or_module, Classifier):
        if preprocess is not None:
            raise InputError("evaluate_accuracy: a Classifier carries its own preprocess; pass preprocess=None")
        clf = classifier_or_module
        logits = _batched_logits(clf.logits, x, clf.device, batch_size)
    elif isinstance(classifier_or_module, nn.Module):
        module = classifier_or_module
        param = next(iter(module.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
        pre = _resolve_preprocess(preprocess, device)
        modes = [(m, m.training) for m in module.modules()]
        try:
            module.eval()
            logits = _batched_logits(lambda xb: module(pre(xb) if pre is not None else xb), x, device, batch_size)
        finally:
            for m, flag in modes:
                m.training = flag
    else:
        raise InputError(f"evaluate_accuracy: expected a Classifier or nn.Module, got "
                         f"{type(classifier_or_module).__name__}")
    right, counted = hits(logits.cpu(), y)
    return right.item() / max(1, counted)


def multilabel_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of each finding's logit, over the known labels (``y`` -1: unknown, left out)."""
    known = (y >= 0).to(logits.dtype)
    loss = F.binary_cross_entropy_with_logits(logits, y.clamp(min=0).to(logits.dtype), weight=known, reduction="sum")
    return loss / known.sum().clamp(min=1)


def hits(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(correct, counted)``: rows whose argmax is ``y [N]``; multi-label (``y [N, K]``): known
    labels whose sigmoid side (logit > 0) agrees, each finding of each row counted once."""
    if y.dim() == 2:
        known = y >= 0
        return ((logits > 0) == (y > 0))[known].sum(), int(known.sum())
    return (logits.argmax(dim=1) == y).sum(), len(y)


def random_flip_shift(flip_axes: Sequence[int] = (-1,), max_shift: float = 0.0625) -> Callable:
    """A batched augmentation: random flips along ``flip_axes`` (each with probability 0.5) and
    random integer shifts of up to ``max_shift`` of each spatial side (edges repeated).

    Returns ``augment(x [B, C, *spatial]) -> same shape``, drawing from torch's global RNG (which
    :func:`train_classifier` seeds). Mind anatomy: a left-right flip moves the heart.
    """
    def augment(x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        for axis in flip_axes:
            flip = (torch.rand(b, device=x.device) < 0.5).view(-1, *[1] * (x.dim() - 1))
            x = torch.where(flip, x.flip(axis), x)
        for axis in range(2, x.dim()):
            n = x.shape[axis]
            m = int(round(max_shift * n))
            if m == 0:
                continue
            shift = torch.randint(-m, m + 1, (b,), device=x.device)
            idx = (torch.arange(n, device=x.device)[None] - shift[:, None]).clamp(0, n - 1)
            shape = [b] + [1] * (x.dim() - 1)
            shape[axis] = n
            x = x.gather(axis, idx.view(shape).expand_as(x))
        return x
    return augment


def train_classifier(module, x_train, y_train, *, x_val=None, y_val=None, epochs: int = 10,
                     batch_size: int = 32, lr: float = 1e-3, weight_decay: float = 0.0, seed: int = 0,
                     preprocess=None, augment: Callable | None = None, progress: bool = True,
                     device="auto", log: Callable[[str], None] | None = None,
                     layer_lr: dict[str, float] | None = None) -> dict:
    """Train ``module`` with Adam and cross-entropy (multi-label ``y [N, K]``: binary cross-entropy
    of each finding's logit, unknown labels left out); return the per-epoch history.

    Parameters
    ----------
    module : nn.Module, Classifier, or a zero-argument callable returning an nn.Module
        Maps ``preprocess(x)`` to logits ``[B, n_classes]``; trained in place. A callable is built
        right after ``torch.manual_seed(seed)``, so its initial weights depend on ``seed`` only. A
        Classifier contributes its module and (unless ``preprocess`` is given) its preprocessing.
    x_train, y_train : ``[N, C, *spatial]`` data-space values and ``[N]`` class indices, or ``[N, K]``
        findings (1 present, 0 absent, -1 unknown) for a multi-label model (one logit per finding).
    x_val, y_val : optional validation split, scored after every epoch in eval mode.
    epochs, batch_size, lr, weight_decay : the usual; defaults 10, 32, 1e-3, 0.
    seed : seeds the shuffling generator and (inside ``torch.random.fork_rng``, so the caller's
        global RNG is left as it was) dropout, augmentation and a callable's initialisation.
    preprocess : nn.Module, callable or JSON spec, applied to each batch before ``module``.
    augment : ``augment(x [B, C, *spatial]) -> same shape``, on data-space training batches
        (e.g. :func:`random_flip_shift`).
    progress : show a tqdm bar with running loss and accuracy. ``log`` gets one line per epoch.
    layer_lr : ``{module name: learning rate}`` for the parameters of those submodules of
        ``module`` (names as in ``named_modules()``, e.g. from :func:`fan_in_lr`); the rest train
        at ``lr``. Default None: every parameter at ``lr``.

    Returns
    -------
    dict with ``history`` (lists per epoch: ``epoch``, ``loss``, ``train_acc`` (running, dropout
    on), ``val_acc`` (None without a validation split), ``seconds``), the last epoch's ``loss``,
    ``train_acc``, ``val_acc``, total ``seconds``, ``config`` (the arguments) and ``module`` (the
    trained network, left in eval mode).
    """
    x, y = _as_xy(x_train, y_train, "train_classifier (x_train, y_train)")
    has_val = x_val is not None or y_val is not None
    if has_val:
        if x_val is None or y_val is None:
            raise InputError("train_classifier: pass both x_val and y_val, or neither")
        x_val, y_val = _as_xy(x_val, y_val, "train_classifier (x_val, y_val)")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if int(value) < 1:
            raise InputError(f"train_classifier: {name}={value}; pass a positive integer")
    if isinstance(module, Classifier):
        preprocess = module.preprocess if preprocess is None else preprocess
        module = module.module
    dev = resolve_device(device)
    config = {"epochs": int(epochs), "batch_size": int(batch_size), "lr": lr, "weight_decay": weight_decay,
              "seed": int(seed), "augment": getattr(augment, "__name__", None) if augment else None,
              "device": str(dev), "n_train": int(x.shape[0]), "n_val": int(x_val.shape[0]) if has_val else 0}
    if layer_lr:
        config["layer_lr"] = dict(layer_lr)
    history = {"epoch": [], "loss": [], "train_acc": [], "val_acc": [], "seconds": []}
    fork_devices = []
    if dev.type == "cuda":
        fork_devices = [dev.index if dev.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        if not isinstance(module, nn.Module):
            if not callable(module):
                raise InputError(f"train_classifier: module is a {type(module).__name__}; pass an nn.Module")
            module = module()
            if not isinstance(module, nn.Module):
                raise InputError("train_classifier: the module factory did not return an nn.Module")
        module.to(dev)
        pre = _resolve_preprocess(preprocess, dev)

        def forward(xb: torch.Tensor) -> torch.Tensor:
            return module(pre(xb) if pre is not None else xb)

        _check_fit(module, forward, x, y, dev)
        optimizer = torch.optim.Adam(_param_groups(module, lr, layer_lr), lr=lr, weight_decay=weight_decay)
        shuffle = torch.Generator().manual_seed(int(seed))
        n, bs = x.shape[0], int(batch_size)
        steps = math.ceil(n / bs)
        bar = tqdm(total=int(epochs) * steps, desc="train", unit="batch", disable=not progress, leave=False)
        try:
            for epoch in range(1, int(epochs) + 1):
                start = time.perf_counter()
                module.train()
                order = torch.randperm(n, generator=shuffle)
                loss_sum = torch.zeros((), device=dev)
                correct = torch.zeros((), device=dev, dtype=torch.long)
                seen = counted = 0
                for step, i in enumerate(range(0, n, bs)):
                    idx = order[i:i + bs]
                    if len(idx) == 1 and n > 1:  # BatchNorm cannot train on one row; skip the remainder
                        bar.update(1)
                        continue
                    xb, yb = x[idx].to(dev), y[idx].to(dev)
                    if augment is not None:
                        xb = augment(xb)
                    logits = forward(xb)
                    loss = multilabel_loss(logits, yb) if yb.dim() == 2 else F.cross_entropy(logits, yb)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    loss_sum += loss.detach() * len(idx)
                    right, n_labels = hits(logits.detach(), yb)
                    correct += right
                    seen += len(idx)
                    counted += n_labels
                    bar.update(1)
                    if progress and (step % 10 == 0 or step == steps - 1):
                        bar.set_postfix(epoch=epoch, loss=f"{loss_sum.item() / seen:.4f}",
                                        acc=f"{correct.item() / max(counted, 1):.3f}")
                if has_val or epoch == int(epochs):       # the statistics of the weights that are scored or kept
                    recalibrated = _recalibrate_batchnorm(module, pre, x, bs, dev)
                val_acc = None
                if has_val:
                    val_acc = evaluate_accuracy(module, x_val, y_val, batch_size=max(bs, 256), preprocess=pre)
                history["epoch"].append(epoch)
                history["loss"].append(loss_sum.item() / max(seen, 1))
                history["train_acc"].append(correct.item() / max(counted, 1))
                history["val_acc"].append(val_acc)
                history["seconds"].append(time.perf_counter() - start)
                if progress and has_val:
                    bar.set_postfix(epoch=epoch, loss=f"{history['loss'][-1]:.4f}",
                                    acc=f"{history['train_acc'][-1]:.3f}", val_acc=f"{val_acc:.3f}")
                if log is not None:
                    log(f"epoch {epoch}/{epochs}: loss {history['loss'][-1]:.4f}, train acc "
                        f"{history['train_acc'][-1]:.3f}" + (f", val acc {val_acc:.3f}" if has_val else "")
                        + f" ({history['seconds'][-1]:.1f} s)")
        finally:
            bar.close()
            module.eval()
    config["batchnorm_recalibrated"] = recalibrated
    return {"history": history, "loss": history["loss"][-1], "train_acc": history["train_acc"][-1],
            "val_acc": history["val_acc"][-1], "seconds": sum(history["seconds"]), "config": config,
            "module": module}


def _recalibrate_batchnorm(module: nn.Module, pre, x: torch.Tensor, batch_size: int, dev) -> bool:
    """Set the running statistics of every BatchNorm layer to the training images' own under the
    weights as they are now (``torch.optim.swa_utils.update_bn``: one no-grad pass, cumulative
    average); whether there were any. The exponential running average lags weights that are still
    moving fast, so an eval-mode model scored on it can swing from epoch to epoch (small-resnet at
    64 px: 0.50, 0.98, 0.51, 0.81 ...) and be saved at chance; training itself uses batch
    statistics and is not changed."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in module.modules()):
        return False
    from torch.optim.swa_utils import update_bn
    batches = ((pre(x[i:i + batch_size].to(dev)) if pre is not None else x[i:i + batch_size].to(dev))
               for i in range(0, x.shape[0], batch_size))
    update_bn(batches, module)
    return True


def _param_groups(module: nn.Module, lr: float, layer_lr: dict[str, float] | None) -> list[dict]:
    """Adam parameter groups: the parameters of each module named in ``layer_lr`` at its rate, the rest at ``lr``."""
    if not layer_lr:
        return [{"params": list(module.parameters())}]
    modules = dict(module.named_modules())
    unknown = sorted(set(layer_lr) - set(modules))
    if unknown:
        raise InputError(f"train_classifier: layer_lr names {unknown}, which are not submodules of the model; "
                         f"pass names from named_modules(), e.g. {sorted(n for n in modules if n)[:4]}")
    special = {id(p): layer_lr[name] for name in layer_lr for p in modules[name].parameters()}
    groups = [{"params": [p for p in module.parameters() if id(p) not in special]}]
    for rate in sorted(set(special.values()), reverse=True):
        groups.append({"params": [p for p in module.parameters() if special.get(id(p)) == rate], "lr": rate})
    return [g for g in groups if g["params"]]


def fan_in_lr(module: nn.Module, lr: float | None = None, max_fan_in: int | None = None) -> dict[str, float]:
    """The learning rate of each dense layer whose fan-in exceeds ``max_fan_in``: ``lr * max_fan_in / fan_in``
    (``{module name: rate}``; empty when no layer is that wide). What ``train --lr auto`` trains with;
    defaults :data:`AUTO_LR` and :data:`AUTO_LR_FAN_IN`.

    Adam moves every weight by about ``lr`` a step whatever its gradient, so a dense layer's output moves
    by about ``lr * fan_in * |input|``: the flatten -> dense 512 of the pneumonia CNN at 224x224 (fan-in
    100,352) moves 12x as far as at 64x64 and on the first steps pushes its units dead or its logits
    far past the labels (test accuracy at chance). Dividing the rate by the fan-in (as muP does for
    Adam) keeps that step the same at every input size; convolutions (fan-in 9 x channels) keep ``lr``.
    """
    lr = AUTO_LR if lr is None else lr
    max_fan_in = AUTO_LR_FAN_IN if max_fan_in is None else max_fan_in
    return {name: lr * max_fan_in / m.in_features for name, m in module.named_modules()
            if isinstance(m, nn.Linear) and m.in_features > max_fan_in}


@torch.no_grad()
def _check_fit(module: nn.Module, forward: Callable, x: torch.Tensor, y: torch.Tensor, device) -> None:
    """One eval-mode forward on two rows: the input fits and the labels are within the logits."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        out = forward(x[:2].to(device))
    except Exception as exc:
        raise InputError(f"train_classifier: x_train rows of shape {tuple(x.shape[1:])} do not fit the "
                         f"module: {exc}") from exc
    finally:
        for m, flag in modes:
            m.training = flag
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise InputError("train_classifier: the module must return logits [batch, n_classes]")
    if y.dim() == 2:
        if y.shape[1] != out.shape[1]:
            raise InputError(f"train_classifier: y_train has {y.shape[1]} findings per row but the module has "
                             f"{out.shape[1]} outputs; give it one output per finding")
    elif int(y.max()) >= out.shape[1]:
        raise InputError(f"train_classifier: y_train has label {int(y.max())} but the module has only "
                         f"{out.shape[1]} outputs; labels must be 0..{out.shape[1] - 1}")


def finding_auc(scores: torch.Tensor, y: torch.Tensor) -> float | None:
    """Area under the ROC curve of ``scores [N]`` for the known labels of ``y [N]`` (1, 0; -1
    unknown left out), ties counted half; None without both a positive and a negative."""
    known = y >= 0
    s, t = scores[known].double(), y[known] > 0
    n_pos, n_neg = int(t.sum()), int((~t).sum())
    if not n_pos or not n_neg:
        return None
    greater = (s[t][:, None] > s[~t][None]).double().sum() + 0.5 * (s[t][:, None] == s[~t][None]).double().sum()
    return round(float(greater / (n_pos * n_neg)), 4)
