"""What every attribution method shares: targets, the batched evaluator, the registry.

Every method is "many model evaluations". They all go through :class:`Evaluator`, which feeds the
model chunks of at most ``batch_size`` rows, keeps tensors on the model's device and halves the
chunk when CUDA runs out of memory, so no method loops in Python per sample or per image.
"""
from __future__ import annotations

import dataclasses
import inspect
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..errors import InputError, MethodError, TargetError
from ..model import Classifier


# -- targets --------------------------------------------------------------------------------------
def resolve_targets(clf: Classifier, x: torch.Tensor, target, logits: torch.Tensor | None = None,
                    batch_size: int = 64) -> torch.Tensor:
    """One class index per row, ``LongTensor[B]`` on ``clf.device``.

    ``target`` may be ``"predicted"``, a class name, an int, or one of those per row
    (list / tensor of length B). Multi-label models: a finding (index or name) per row;
    ``"predicted"`` is the most probable finding (``"all-positive"``: see :func:`expand_targets`).
    """
    if isinstance(target, str) and target.lower() in ("all-positive", "all_positive"):
        raise TargetError("target 'all-positive' gives a variable number of targets per image; expand it first "
                          "with counterlens.attribution.base.expand_targets(clf, x, 'all-positive')")
    batch = x.shape[0]
    predicted = isinstance(target, str) and target == "predicted"
    if logits is None and (predicted or clf.n_classes is None):
        # chunked: the whole batch for argmax, one row to learn the number of classes
        logits = Evaluator(clf, batch_size).logits(x if predicted else x[:1])
    n_classes = logits.shape[1] if logits is not None else clf.n_classes
    names = clf.class_names(n_classes)

    def one(t) -> int:
        if isinstance(t, str):
            if t == "predicted":
                raise TargetError("'predicted' cannot be mixed with other targets in a list")
            lowered = {n.lower(): i for i, n in enumerate(names)}
            if t.lower() not in lowered:
                raise TargetError(f"target {t!r} is not a class of this model; classes: {names}")
            return lowered[t.lower()]
        try:
            i = int(t)
        except (TypeError, ValueError) as exc:
            raise TargetError(f"target {t!r} is not a class index or name; classes: {names}") from exc
        if not 0 <= i < n_classes:
            raise TargetError(f"target {i} is out of range: the model has {n_classes} classes ({names})")
        return i

    if predicted:
        out = logits.argmax(dim=1)
    elif isinstance(target, (str, int)) or (isinstance(target, torch.Tensor) and target.dim() == 0):
        out = torch.full((batch,), one(target.item() if isinstance(target, torch.Tensor) else target))
    else:
        items = target.tolist() if isinstance(target, torch.Tensor) else list(target)
        if len(items) != batch:
            raise TargetError(f"{len(items)} targets for a batch of {batch}; pass one per row or a single one")
        out = torch.tensor([one(t) for t in items])
    return out.to(device=clf.device, dtype=torch.long)


# -- the evaluator --------------------------------------------------------------------------------
AUTO_MAX_ROWS = {False: 64, True: 512}   # batch_size="auto" explores up to this many rows (CPU, CUDA)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is a device running out of memory (CUDA's error or a backend's "out of memory")."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


class Evaluator:
    """Runs many model evaluations in chunks of at most ``batch_size`` rows.

    ``run(n_rows, work)`` calls ``work(start, stop)`` for consecutive chunks covering
    ``range(n_rows)`` and returns the list of results. A chunk that runs out of CUDA memory is
    retried at half the size (down to one row); the smaller size is kept for the rest of the call.
    Rows can be anything a method indexes: (image, IG step), (image, noise sample), (image, window).

    ``batch_size="auto"`` measures instead of assuming that bigger is faster: the first chunks
    double in size (1, 2, 4, ... up to :data:`AUTO_MAX_ROWS` for the device, or until a size is
    clearly slower per row), the rest run at the fastest size seen, and the search state is kept
    on the classifier for the same method, so calls with few rows go on where the last stopped. Every row is still evaluated exactly once. (On some CPUs a chunk of 64
    large images is slower per row than a chunk of 4.) Chunk sizes can change the last bits of
    float results, so a fixed integer ``batch_size`` is the choice for bitwise reproducibility.
    """

    def __init__(self, clf: Classifier, batch_size: int | str = 64):
        self.auto = batch_size == "auto"
        if self.auto:
            batch_size = AUTO_MAX_ROWS[clf.device.type == "cuda"]
        elif not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
            raise InputError(f"batch_size={batch_size!r}; pass a positive number of rows per model call or 'auto'")
        self.clf = clf
        self.batch_size = int(batch_size)
        self.calls = 0      # model calls made (chunks)
        self.rows = 0       # rows evaluated

    def run(self, n_rows: int, work: Callable[[int, int], object]) -> list:
        # auto: state per method (its work function) kept on the classifier: the per-row times
        # measured so far, the next size to try, and whether the search is over. A call with few
        # rows goes on exploring where the previous one stopped.
        cache = self.clf.__dict__.setdefault("_chunk_sizes", {})
        key = (work.__code__.co_filename, work.__code__.co_firstlineno)
        state = cache.setdefault(key, {"timings": {}, "next": 1, "best": None}) if self.auto else None
        size = (state["best"] or state["next"]) if self.auto else self.batch_size
        results, start = [], 0
        while start < n_rows:
            size = min(size, self.batch_size)
            stop = min(start + size, n_rows)
            t0 = time.perf_counter()
            try:
                results.append(work(start, stop))
            except RuntimeError as exc:
                if not is_out_of_memory(exc) or stop - start == 1:
                    raise
                self.batch_size = size = max(1, (stop - start) // 2)
                if self.clf.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            if self.auto and state["best"] is None and stop - start == size:
                if self.clf.device.type == "cuda":
                    torch.cuda.synchronize(self.clf.device)
                size = self._explore(state, size, time.perf_counter() - t0)
            self.calls += 1
            self.rows += stop - start
            start = stop
        return results

    def _explore(self, state: dict, size: int, seconds: float) -> int:
        """Record a timed chunk of ``size`` rows; return the next size (the best once settled)."""
        timings = state["timings"]
        timings[size] = seconds / size
        best = min(timings, key=timings.get)
        if size >= self.batch_size or timings[size] > 1.5 * timings[best]:   # clearly worse: stop
            state["best"] = best
            return best
        state["next"] = size * 2
        return size * 2

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, K]`` of the rows of ``x``, in chunks."""
        with self.clf.eval_mode():
            return torch.cat(self.run(x.shape[0], lambda a, b: self.clf.forward(x[a:b])))

    def scores(self, x: torch.Tensor, target: torch.Tensor, *, grad: bool = False, output: str = "logit"):
        """Target scores of each row of ``x`` (``[N]``), and their input gradients if ``grad``.

        ``x``: ``[N, C, *spatial]`` data-space rows; ``target``: ``[N]`` class per row.
        ``output``: ``"logit"`` (default) or ``"prob"`` (the head's probability: softmax, or the
        finding's sigmoid for a multi-label model).
        """
        score_parts, grad_parts = [], []

        def work(a: int, b: int):
            xb = x[a:b].detach().requires_grad_(grad)
            with torch.set_grad_enabled(grad):
                s = target_score(self.clf.forward(xb), target[a:b], output, self.clf.multilabel)
                g = gradient_of(s, xb) if grad else None
            score_parts.append(s.detach())
            if grad:
                grad_parts.append(g)

        with self.clf.eval_mode():
            self.run(x.shape[0], work)
        s = torch.cat(score_parts)
        return (s, torch.cat(grad_parts)) if grad else s


def target_score(logits: torch.Tensor, target: torch.Tensor, output: str = "logit",
                 multilabel: bool = False) -> torch.Tensor:
    """``[N]`` score of each row's target class (or finding) from scores ``[N, K]``.

    ``output``: ``"logit"`` (the score itself) or ``"prob"`` / ``"probability"``: the softmax
    probability, or with ``multilabel=True`` (pass ``clf.multilabel``) the finding's own sigmoid.
    """
    if output in ("prob", "probability"):
        if multilabel:
            return torch.sigmoid(logits.gather(1, target.view(-1, 1)).squeeze(1))
        logits = torch.softmax(logits, dim=1)
    elif output != "logit":
        raise InputError(f"output={output!r}; pass 'logit' or 'prob'")
    return logits.gather(1, target.view(-1, 1)).squeeze(1)


def expand_targets(clf: Classifier, x, target="all-positive", *, threshold: float = 0.5,
                   batch_size: int = 64, logits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and targets to explain: ``(rows LongTensor[M], targets LongTensor[M])`` on ``clf.device``.

    ``"all-positive"`` (multi-label models): one pair per image and finding whose sigmoid
    probability is at least ``threshold``, in image then finding order; an image with no positive
    finding gets no pair (not an error: compare ``rows`` with ``range(B)`` to report it). Any other
    ``target`` is resolved by :func:`resolve_targets` into one pair per image. ``logits``: the
    rows' scores when already computed (saves a pass).
    """
    x = clf.as_input(x)
    if not (isinstance(target, str) and target.lower() in ("all-positive", "all_positive")):
        tgt = resolve_targets(clf, x, target, logits=logits, batch_size=batch_size)
        return torch.arange(x.shape[0], device=clf.device), tgt
    if not 0.0 < float(threshold) < 1.0:
        raise InputError(f"threshold={threshold!r}; pass a probability between 0 and 1, e.g. 0.5")
    logits = Evaluator(clf, batch_size).logits(x) if logits is None else logits
    if not clf.multilabel:
        raise TargetError(f"target 'all-positive' is for multi-label models; this one's head is {clf.output!r} "
                          "(pass 'predicted' or a class, or load the model with output='multilabel')")
    rows, targets = (torch.sigmoid(logits) >= float(threshold)).nonzero(as_tuple=True)
    return rows.to(clf.device), targets.to(clf.device)


def gradient_of(score: torch.Tensor, wrt: torch.Tensor) -> torch.Tensor:
    """d sum(score) / d wrt, with a clear error for a model that is not differentiable."""
    if not score.requires_grad:
        raise MethodError("the model's output does not depend differentiably on its input "
                          "(no autograd graph); use a perturbation method such as occlusion instead")
    (g,) = torch.autograd.grad(score.sum(), wrt, allow_unused=True)
    if g is None:
        raise MethodError("the model's output does not depend on its input through autograd; "
                          "use a perturbation method instead")
    return g


def spatial_dims(x: torch.Tensor) -> tuple[int, ...]:
    """All axes after batch and channel: (2, 3) for 2D, (2, 3, 4) for 3D."""
    return tuple(range(2, x.dim()))


# -- the registry ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MethodInfo:
    name: str
    function: Callable
    summary: str
    kind: str            # "gradient", "cam", "perturbation", "surrogate"

    def defaults(self) -> dict:
        """Keyword parameters and their defaults (``return_*`` switches change the output type: not listed)."""
        sig = inspect.signature(self.function)
        return {k: p.default for k, p in sig.parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty
                and not k.startswith("return_")}


METHODS: dict[str, MethodInfo] = {}


def register(kind: str, summary: str):
    """Decorator: add ``fn`` to :data:`METHODS` under its own name."""
    def wrap(fn):
        METHODS[fn.__name__] = MethodInfo(fn.__name__, fn, summary, kind)
        return fn
    return wrap


def get_method(name: str) -> MethodInfo:
    key = name.strip().lower().replace("-", "_")
    if key not in METHODS:
        raise MethodError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[key]


def check_params(info: MethodInfo, params: dict) -> dict:
    """Reject parameters the method does not take, naming the ones it does."""
    known = info.defaults()
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise MethodError(f"{info.name} has no parameter {', '.join(unknown)}; "
                          f"its parameters: {', '.join(f'{k}={v!r}' for k, v in known.items())}")
    for key, value in params.items():      # a word where a number or a switch belongs (--param m.steps=abc)
        default = known[key]
        if key == "batch_size" and value == "auto":
            continue
        if isinstance(default, bool) and not isinstance(value, bool):
            raise MethodError(f"{info.name}.{key}={value!r}: pass true or false (got {type(value).__name__})")
        if isinstance(default, (int, float)) and not isinstance(default, bool) and isinstance(value, (str, bool)):
            kind = "an integer" if isinstance(default, int) else "a number"
            raise MethodError(f"{info.name}.{key}={value!r}: pass {kind}, e.g. {key}={default!r} "
                              f"(got {type(value).__name__})")
    return params


def prepare(clf: Classifier, x, target, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate ``x`` and resolve ``target``: the first lines of every method."""
    x = clf.as_input(x)
    return x, resolve_targets(clf, x, target, batch_size=batch_size)


def explain(clf: Classifier, x, target="predicted", methods: Sequence[str] = ("gradcam",),
            batch_size: int = 64, seed: int = 0, **params) -> dict[str, torch.Tensor]:
    """Run several attribution methods on one batch.

    Parameters
    ----------
    clf : Classifier
    x : Tensor ``[B, C, *spatial]`` in data space.
    target : "predicted", class name, int, or one per row.
    methods : method names (see ``counterlens methods``).
    batch_size : rows per model call for every method.
    seed : seed of the random methods.
    params : ``{"integrated_gradients": {"steps": 64}}`` or flat ``integrated_gradients__steps=64``.

    Returns ``{method: Tensor[B, *spatial]}`` on the CPU.
    """
    x = clf.as_input(x)
    tgt = resolve_targets(clf, x, target, batch_size=batch_size)
    per_method: dict[str, dict] = {}
    for key, value in params.items():
        if "__" in key:
            name, arg = key.split("__", 1)
            per_method.setdefault(name, {})[arg] = value
        elif isinstance(value, dict):
            per_method.setdefault(key, {}).update(value)
        else:
            raise MethodError(f"parameter {key!r}: say which method it is for, e.g. "
                              f"integrated_gradients__steps=64 or params={{'integrated_gradients': {{...}}}}")
    infos = [get_method(m) for m in methods]
    unknown = set(per_method) - {i.name for i in infos}
    if unknown:
        raise MethodError(f"parameters given for {sorted(unknown)}, which are not among methods={list(methods)}")
    out = {}
    for info in infos:
        kwargs = check_params(info, dict(per_method.get(info.name, {})))
        defaults = info.defaults()
        if "batch_size" in defaults:
            kwargs.setdefault("batch_size", batch_size)
        if "seed" in defaults:
            kwargs.setdefault("seed", seed)
        out[info.name] = info.function(clf, x, tgt, **kwargs).detach().cpu()
    return out
