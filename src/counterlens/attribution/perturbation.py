"""Perturbation methods: occlusion and RISE. Forward passes only, no gradients.

Both evaluate the model on many perturbed copies of each image. A row is (image, window) for
occlusion and (mask, image) for RISE; every chunk of ``batch_size`` rows is built inside the
evaluator's ``work(start, stop)``, so peak memory is set by ``batch_size``, not by the number of
windows or masks. Perturbations span all channels, so a pixel's value is the effect of hiding
the whole pixel (every channel): the maps have the input's spatial shape and are not summed over
channels (summing would count the same effect once per channel).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import InputError
from .base import Evaluator, prepare, register, spatial_dims, target_score
from .gradients import make_baseline


def perturbation_baseline(x: torch.Tensor, baseline, seed: int = 0) -> torch.Tensor:
    """What hidden pixels are replaced with, ``[B, C, *spatial]``.

    A number (``0.0``), ``"mean"`` (each image's per-channel mean), ``"blur"`` (a heavy Gaussian
    blur of the image), ``"zeros"``, ``"uniform"``, or a tensor broadcastable to ``x``.
    """
    if isinstance(baseline, str) and baseline == "mean":
        return x.mean(dim=spatial_dims(x), keepdim=True).expand_as(x).clone()
    if isinstance(baseline, bool):
        raise InputError(f"baseline={baseline!r}; pass a number, 'mean', 'blur' or a tensor")
    try:
        return make_baseline(x, baseline, seed)
    except InputError as exc:
        raise InputError(f"{exc} (perturbation methods also take 'mean')") from None


def _per_axis(value, n_axes: int, name: str) -> tuple[int, ...]:
    """An int or one int per spatial axis -> a tuple of positive ints."""
    values = (value,) * n_axes if isinstance(value, (int, float)) and not isinstance(value, bool) else tuple(value)
    if len(values) != n_axes or any(int(v) != v or int(v) < 1 for v in values):
        raise InputError(f"{name}={value!r}; pass a positive int or one positive int per spatial axis "
                         f"({n_axes} axes)")
    return tuple(int(v) for v in values)


# -- occlusion ------------------------------------------------------------------------------------
def occlusion_windows(size, window, stride) -> list[torch.Tensor]:
    """Start index of every window position, per axis (Captum's rule).

    Along an axis of length ``n`` there are ``ceil((n - w) / s) + 1`` positions starting at
    ``0, s, 2s, ...``; the last one may be cut off by the border.
    """
    return [torch.arange(math.ceil((n - w) / s) + 1) * s for n, w, s in zip(size, window, stride)]


@register("perturbation", "mean drop of the target score when a sliding window hides the pixel (Zeiler & Fergus 2014)")
def occlusion(clf, x, target="predicted", *, window=None, stride=None, baseline=0.0,
              output: str = "logit", batch_size: int = 64) -> torch.Tensor:
    """Occlusion: slide a window over the image, replace it by ``baseline``, record the score drop.

    The attribution of a pixel is the mean, over the windows covering it, of
    ``score(x) - score(x with the window replaced by the baseline)`` (Zeiler & Fergus, "Visualizing
    and understanding convolutional networks", ECCV 2014), exactly as Captum's ``Occlusion`` with
    ``sliding_window_shapes=(C, *window)`` and ``strides=(C, *stride)``: windows cover every
    channel, and the map is Captum's attribution of any one channel (all channels carry the same
    value), ``[B, *spatial]``.

    Parameters
    ----------
    window : int or one int per spatial axis. Default ``None``: 1/8 of each side (at least 1), so
        a call costs about 15 windows per axis (225 per 2D image, 3375 per 3D volume) whatever the
        resolution.
    stride : int or one per axis, at most ``window``. Default ``None``: ``window // 2`` (at least 1).
    baseline : what hidden pixels become: a number (default 0.0), ``"mean"``, ``"blur"`` or a tensor.
    output : ``"logit"`` (default) or ``"prob"``: the score whose drop is measured.
    batch_size : rows (image, window) per model call.
    """
    x, tgt = prepare(clf, x, target, batch_size)
    size, nd = tuple(x.shape[2:]), x.dim() - 2
    win = tuple(max(1, n // 8) for n in size) if window is None else _per_axis(window, nd, "window")
    if any(w > n for w, n in zip(win, size)):
        raise InputError(f"window={win} is larger than the input's spatial size {size}; pass a smaller window")
    step = tuple(max(1, w // 2) for w in win) if stride is None else _per_axis(stride, nd, "stride")
    if any(s > w and w < n for s, w, n in zip(step, win, size)):
        raise InputError(f"stride={step} is larger than window={win}: some pixels would never be hidden; "
                         "pass stride <= window")
    base = perturbation_baseline(x, baseline)
    starts = [s.to(x.device) for s in occlusion_windows(size, win, step)]
    counts = [len(s) for s in starts]
    n_win, batch = math.prod(counts), x.shape[0]
    positions = [torch.arange(n, device=x.device) for n in size]
    evaluator = Evaluator(clf, batch_size)
    score0 = evaluator.scores(x, tgt, output=output)
    total = torch.zeros((batch, *size), device=x.device)

    def inside(widx: torch.Tensor) -> torch.Tensor:
        """Boolean window masks ``[n, *spatial]`` of window indices ``widx`` (row-major over axes)."""
        mask = None
        for axis in range(nd):
            k = (widx // math.prod(counts[axis + 1:])) % counts[axis]
            lo = starts[axis][k][:, None]
            hit = (positions[axis] >= lo) & (positions[axis] < lo + win[axis])      # [n, size_axis]
            hit = hit.view(hit.shape[0], *[size[axis] if a == axis else 1 for a in range(nd)])
            mask = hit if mask is None else mask & hit
        return mask

    def work(a: int, b: int):
        rows = torch.arange(a, b, device=x.device)
        img, widx = rows // n_win, rows % n_win
        mask = inside(widx)
        hidden = torch.where(mask[:, None], base[img], x[img])
        drop = score0[img] - target_score(clf.forward(hidden), tgt[img], output, clf.multilabel)
        total.index_add_(0, img, drop.view(-1, *([1] * nd)) * mask)

    with torch.no_grad(), clf.eval_mode():
        evaluator.run(batch * n_win, work)
    # windows form a grid, so the number covering a pixel is the product of per-axis counts
    cover = None
    for axis in range(nd):
        lo = starts[axis][:, None]
        per = ((positions[axis] >= lo) & (positions[axis] < lo + win[axis])).sum(0).float()
        per = per.view(*[size[axis] if a == axis else 1 for a in range(nd)])
        cover = per if cover is None else cover * per
    return total / cover


# -- RISE -----------------------------------------------------------------------------------------
class RiseMasks:
    """The ``samples`` random masks of RISE, drawn once from ``seed`` and built on demand.

    Coarse binary grids (``cells`` per axis, each cell kept with probability ``p_keep``) and the
    random shifts are drawn up front (small: samples x cells), in a fixed order from one
    ``torch.Generator``; ``get(lo, hi)`` upsamples masks ``lo..hi-1`` to full size, so the masks
    do not depend on how the work is chunked. As in the paper, each grid is upsampled
    (bi/trilinearly) to ``(cells + 1) * ceil(size / cells)`` per axis and cropped to the input
    size at a random shift in ``[0, ceil(size / cells))``.
    """

    def __init__(self, size, samples: int, cells, p_keep: float, seed: int, device):
        if int(samples) < 1:
            raise InputError(f"samples={samples}; pass a positive number of masks (2000 is a good start)")
        if not 0.0 < float(p_keep) <= 1.0:
            raise InputError(f"p_keep={p_keep}; pass a probability in (0, 1] (0.5 in the paper)")
        self.size, self.samples, self.p_keep = tuple(size), int(samples), float(p_keep)
        nd = len(self.size)
        self.cells = _per_axis(cells, nd, "cells")
        self.cell_size = [math.ceil(n / c) for n, c in zip(self.size, self.cells)]
        self.up_size = [(c + 1) * s for c, s in zip(self.cells, self.cell_size)]
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        self.grid = (torch.rand((self.samples, *self.cells), generator=gen) < self.p_keep).to(device)
        self.shift = torch.stack([torch.randint(0, s, (self.samples,), generator=gen)
                                  for s in self.cell_size], dim=1).to(device)

    def get(self, lo: int, hi: int) -> torch.Tensor:
        """Masks ``lo..hi-1`` as float ``[hi - lo, *size]`` in [0, 1]."""
        mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(self.size)]
        up = F.interpolate(self.grid[lo:hi, None].float(), size=self.up_size, mode=mode, align_corners=False)[:, 0]
        for axis, n in enumerate(self.size):      # crop each mask at its own shift, one axis at a time
            idx = self.shift[lo:hi, axis, None] + torch.arange(n, device=up.device)
            shape = [1] * up.dim()
            shape[0], shape[axis + 1] = up.shape[0], n
            idx = idx.view(shape).expand(*[n if d == axis + 1 else s for d, s in enumerate(up.shape)])
            up = up.gather(axis + 1, idx)
        return up


def rise_masks(size, *, samples: int = 2000, cells=8, p_keep: float = 0.5, seed: int = 0,
               device="cpu") -> torch.Tensor:
    """All RISE masks ``[samples, *size]`` as :func:`rise` draws them (for inspection and tests)."""
    masks = RiseMasks(size, samples, cells, p_keep, seed, torch.device(device))
    return masks.get(0, masks.samples)


@register("perturbation", "score-weighted average of random smooth masks (Petsiuk et al. 2018)")
def rise(clf, x, target="predicted", *, samples: int = 2000, cells=8, p_keep: float = 0.5,
         baseline=0.0, output: str = "prob", batch_size: int = 64, seed: int = 0) -> torch.Tensor:
    """RISE: Randomized Input Sampling for Explanation (Petsiuk, Das & Saenko, BMVC 2018).

    ``map = sum_n score(x * M_n + baseline * (1 - M_n)) * M_n / (samples * p_keep)``, ``[B, *spatial]``:
    the expected score given that the pixel is kept. The same masks (see :class:`RiseMasks`) are
    used for every image of the batch, as in the paper.

    Parameters
    ----------
    samples : number of masks. Default 2000 (the paper uses 4000-8000 for ImageNet networks;
        2000 gives stable maps on small medical CNNs; raise it for smoother maps).
    cells : coarse grid cells per axis (int or one per axis). Default 8 (the paper: 7).
    p_keep : probability that a cell is kept. Default 0.5 (the paper's).
    baseline : what hidden pixels become: 0.0 (default, the paper's), a number, ``"mean"``,
        ``"blur"`` or a tensor.
    output : ``"prob"`` (default: softmax probability, as in the paper) or ``"logit"``.
    batch_size : rows (mask, image) per model call.
    seed : seed of the masks; the same seed gives the same map whatever ``batch_size``.
    """
    x, tgt = prepare(clf, x, target, batch_size)
    nd, batch = x.dim() - 2, x.shape[0]
    masks = RiseMasks(x.shape[2:], samples, cells, p_keep, seed, x.device)
    base = perturbation_baseline(x, baseline)
    total = torch.zeros((batch, *x.shape[2:]), device=x.device)

    def work(a: int, b: int):
        rows = torch.arange(a, b, device=x.device)          # mask-major: row = mask * B + image
        lo = a // batch
        m = masks.get(lo, (b - 1) // batch + 1)[rows // batch - lo]
        img = rows % batch
        kept = m[:, None]
        score = target_score(clf.forward(x[img] * kept + base[img] * (1 - kept)), tgt[img], output, clf.multilabel)
        total.index_add_(0, img, score.view(-1, *([1] * nd)) * m)

    with torch.no_grad(), clf.eval_mode():
        Evaluator(clf, batch_size).run(masks.samples * batch, work)
    return total / (masks.samples * masks.p_keep)
