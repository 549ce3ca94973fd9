"""Surrogate methods: LIME and KernelSHAP over superpixels, grid cells or given feature groups.

Both explain an image through F interpretable features (segments): a binary vector ``z`` says
which segments keep their pixels (the others take the baseline's), the model scores each such
perturbed image, and a weighted linear model ``score ~ intercept + z . coef`` is fitted. Every
pixel then gets its segment's coefficient.

For many images at once: the masks ``Z [B, S, F]`` of all images are drawn first (images with
fewer segments than the largest padded, with those features held at 0), all ``B x S`` perturbed
inputs go through the evaluator in chunks of ``batch_size`` rows (built inside each chunk), and
the B weighted least-squares problems are solved by one batched ``torch.linalg.solve`` on the
model's device. Masks are drawn per image from a generator seeded with ``seed`` alone, so an
image gets the same masks, and the same map, in any batch.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from ..errors import InputError
from .base import Evaluator, prepare, register, target_score
from .perturbation import _per_axis, perturbation_baseline


# -- segmentation ---------------------------------------------------------------------------------
def relabel(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer labels ``[B, *spatial]`` -> contiguous ``0..F_b-1`` per image, and ``F_b`` ``[B]``."""
    flat = labels.flatten(1).long()
    flat = flat - flat.amin(dim=1, keepdim=True)
    flat = flat + torch.arange(flat.shape[0], device=flat.device)[:, None] * (int(flat.max()) + 1)
    ids, inverse = torch.unique(flat, return_inverse=True)      # sorted: image b's ids are contiguous
    first = torch.full((flat.shape[0],), ids.numel(), dtype=torch.long, device=flat.device)
    first = first.scatter_reduce(0, torch.arange(flat.shape[0], device=flat.device).repeat_interleave(flat.shape[1]),
                                 inverse.flatten(), reduce="amin")
    dense = inverse - first[:, None]
    return dense.view(labels.shape), dense.amax(dim=1) + 1


def segment(x: torch.Tensor, segmentation="slic", *, n_segments: int = 50, compactness: float = 0.3,
            cell=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature labels ``[B, *spatial]`` (``0..F_b-1`` per image, on ``x.device``) and ``F_b`` ``[B]``.

    ``"slic"``: SLIC superpixels (Achanta et al. 2012, scikit-image) of each image, its values
    scaled to [0, 1] first (all channels jointly, no Lab conversion), so ``compactness`` means the
    same for grey, RGB, Hounsfield units; 2D and 3D inputs (1D signals as a 1-pixel-high image).
    ``compactness=0.3`` follows edges and still keeps about ``n_segments`` segments on noisy images
    (0.1 collapses noisy ones into a handful; 1 and above give an almost regular grid).
    ``"grid"``: cells of ``cell`` pixels per axis (int or one per axis); default ``None``: about
    ``n_segments`` equal cells (``round(n_segments ** (1 / dims))`` per axis).
    A tensor or array: integer labels ``[*spatial]`` (shared) or ``[B, *spatial]``.
    """
    size, nd, batch = tuple(x.shape[2:]), x.dim() - 2, x.shape[0]
    if isinstance(segmentation, (torch.Tensor, np.ndarray)):
        lab = torch.as_tensor(segmentation, device=x.device)
        if lab.dim() == nd + 2 and lab.shape[1] == 1:
            lab = lab[:, 0]
        if lab.is_floating_point() or lab.dtype == torch.bool or tuple(lab.shape[-nd:]) != size \
                or lab.dim() not in (nd, nd + 1) or (lab.dim() == nd + 1 and lab.shape[0] not in (1, batch)):
            raise InputError(f"segmentation has shape {tuple(lab.shape)} ({lab.dtype}); pass integer labels "
                             f"of shape {size} or {(batch, *size)}, one value per feature")
        return relabel(lab.expand(batch, *size))
    if int(n_segments) < 1:
        raise InputError(f"n_segments={n_segments}; pass a positive number of features (50 is a good start)")
    if segmentation == "grid":
        if cell is None:
            per = max(1, round(int(n_segments) ** (1 / nd)))
            cell = tuple(math.ceil(n / min(per, n)) for n in size)
        cell = _per_axis(cell, nd, "cell")
        lab = torch.zeros(size, dtype=torch.long, device=x.device)
        for axis, (n, c) in enumerate(zip(size, cell)):
            idx = torch.arange(n, device=x.device) // c
            lab = lab * math.ceil(n / c) + idx.view(*[n if a == axis else 1 for a in range(nd)])
        return relabel(lab.expand(batch, *size))
    if segmentation != "slic":
        raise InputError(f"segmentation={segmentation!r}; pass 'slic', 'grid' or an integer label tensor")
    from skimage.segmentation import slic

    if nd > 3:
        raise InputError(f"segmentation='slic' handles 1D, 2D and 3D inputs, not {nd}D; pass 'grid' or labels")
    imgs = x.detach().float().cpu().numpy()
    out = []
    for img in imgs:                     # segmentation is not a model evaluation: per image is fine
        img = (img - img.min()) / max(float(img.max() - img.min()), 1e-12)
        img = img[:, None] if nd == 1 else img                    # 1D signal -> 1 x L image
        multichannel = img.shape[0] > 1
        img = np.moveaxis(img, 0, -1) if multichannel else img[0]
        lab = slic(img.astype(np.float64), n_segments=int(n_segments), compactness=float(compactness),
                   channel_axis=-1 if multichannel else None, convert2lab=False, start_label=0)
        out.append(torch.from_numpy(lab.reshape(size).astype(np.int64)))
    return relabel(torch.stack(out).to(x.device))


# -- sampling -------------------------------------------------------------------------------------
def _shapley_kernel(n_features: int, size: torch.Tensor) -> torch.Tensor:
    """Shapley kernel weight ``(F-1) / (C(F,k) k (F-k))`` of a coalition of ``size`` k (0 < k < F)."""
    k = size.double()
    log_binom = math.lgamma(n_features + 1) - torch.lgamma(k + 1) - torch.lgamma(n_features - k + 1)
    return (n_features - 1) / (torch.exp(log_binom) * k * (n_features - k))


def draw_coalitions(kind: str, n_features: int, samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary masks ``[S, F]`` and their regression weights ``[S]`` for one feature count.

    LIME: each feature on with probability 1/2, weights 1 (the kernel comes later). KernelSHAP as
    Captum draws it: a size ``k`` in 1..F-1 with probability proportional to ``(F-1)/(k (F-k))``,
    then ``k`` features uniformly, weights 1 (that sampling *is* the Shapley kernel); when
    ``samples >= 2**F - 2`` every coalition is enumerated once with its Shapley kernel weight,
    which makes the fit the exact Shapley values.
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    if kind == "lime":
        return torch.rand((samples, n_features), generator=gen) < 0.5, torch.ones(samples, dtype=torch.float64)
    if n_features < 2:
        return torch.zeros((0, n_features), dtype=torch.bool), torch.zeros(0, dtype=torch.float64)
    if n_features <= 62 and samples >= 2 ** n_features - 2:
        codes = torch.arange(1, 2 ** n_features - 1)
        z = (codes[:, None] >> torch.arange(n_features)) & 1 == 1
        return z, _shapley_kernel(n_features, z.sum(1))
    k = torch.arange(1, n_features, dtype=torch.float64)
    sizes = torch.multinomial(1.0 / (k * (n_features - k)), samples, replacement=True, generator=gen) + 1
    ranks = torch.rand((samples, n_features), generator=gen).argsort(dim=1).argsort(dim=1)
    return ranks < sizes[:, None], torch.ones(samples, dtype=torch.float64)


# -- the fit --------------------------------------------------------------------------------------
@dataclasses.dataclass
class SurrogateFit:
    """A fitted surrogate per image: ``score ~ intercept + z . coef``.

    ``coef [B, F_max]`` (0 beyond an image's own ``n_features``), ``intercept [B]``,
    ``labels [B, *spatial]`` (the feature of each pixel), ``n_features [B]``.
    """
    coef: torch.Tensor
    intercept: torch.Tensor
    labels: torch.Tensor
    n_features: torch.Tensor

    def to_map(self) -> torch.Tensor:
        """Each pixel gets its feature's coefficient: ``[B, *spatial]``."""
        return self.coef.gather(1, self.labels.flatten(1)).view(self.labels.shape)


def _solve(a: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Batched ``a @ sol = rhs``; singular systems (too few samples) get the least-norm solution."""
    sol, info = torch.linalg.solve_ex(a, rhs)
    bad = (info != 0) | ~torch.isfinite(sol).all(dim=-1)
    if bad.any():
        sol[bad] = (torch.linalg.pinv(a[bad]) @ rhs[bad, :, None])[..., 0]
    return sol


def _weighted_ridge(z, y, w, keep, alpha: float, intercept: bool):
    """Solve ``min sum_s w_s (y_s - b - z_s . c)^2 + alpha |c|^2`` for every image (sklearn's Ridge
    with ``sample_weight``: the intercept is not penalised). ``z [B, S, F]``, ``y, w [B, S]``,
    ``keep [B, F]`` features that exist (others get 0). Returns ``coef [B, F]``, ``b [B]``."""
    if intercept:
        total = w.sum(dim=1, keepdim=True).clamp_min(1e-300)
        z_mean = (w[..., None] * z).sum(dim=1) / total
        y_mean = (w * y).sum(dim=1, keepdim=True) / total
        z, y = z - z_mean[:, None], y - y_mean
    z = z * keep[:, None]
    wz = w[..., None] * z
    a = wz.transpose(1, 2) @ z + torch.diag_embed(alpha * keep + (~keep).to(z.dtype))
    coef = _solve(a, (wz * y[..., None]).sum(dim=1)) * keep
    b = (y_mean[:, 0] - (z_mean * coef).sum(dim=1)) if intercept else torch.zeros_like(coef[:, 0])
    return coef, b


def fit_surrogate(clf, x, target="predicted", *, kind: str = "lime", segmentation="slic", n_segments: int = 50,
                  compactness: float = 0.3, cell=None, baseline=0.0, samples: int | None = None,
                  kernel_width: float = 1.0, alpha: float | None = None, output: str = "logit",
                  batch_size: int = 64, seed: int = 0) -> SurrogateFit:
    """Fit LIME (``kind="lime"``) or KernelSHAP (``kind="kernel_shap"``) surrogates for all images.

    Parameters as in :func:`lime` and :func:`kernel_shap` (``samples`` and ``alpha`` default to
    theirs); returns the per-feature coefficients.
    """
    if kind not in ("lime", "kernel_shap"):
        raise InputError(f"kind={kind!r}; pass 'lime' or 'kernel_shap'")
    samples = (1000 if kind == "lime" else 2048) if samples is None else samples
    alpha = (1.0 if kind == "lime" else 0.0) if alpha is None else alpha
    if int(samples) < 1:
        raise InputError(f"samples={samples}; pass a positive number of perturbed images per image")
    if float(alpha) < 0 or float(kernel_width) <= 0:
        raise InputError(f"alpha={alpha}, kernel_width={kernel_width}; pass alpha >= 0 and kernel_width > 0")
    x, tgt = prepare(clf, x, target, batch_size)
    batch, dev = x.shape[0], x.device
    dtype = torch.float32 if dev.type == "mps" else torch.float64
    labels, n_feat = segment(x, segmentation, n_segments=n_segments, compactness=compactness, cell=cell)
    base = perturbation_baseline(x, baseline)
    f_max = int(n_feat.max())

    # masks: one draw per distinct feature count, so an image's masks do not depend on its batch
    draws = {f: draw_coalitions(kind, f, int(samples), seed) for f in sorted(set(n_feat.tolist()))}
    n_rows = torch.tensor([draws[f][0].shape[0] for f in n_feat.tolist()])
    s_max = max(1, int(n_rows.max()))
    z = torch.zeros((batch, s_max, f_max), dtype=torch.bool)
    w = torch.zeros((batch, s_max), dtype=torch.float64)
    for f, (zf, wf) in draws.items():           # a loop over feature counts, not over samples
        rows = (n_feat.cpu() == f).nonzero()[:, 0]
        z[rows, :zf.shape[0], :f] = zf
        w[rows, :wf.shape[0]] = wf
    z, w = z.to(dev), w.to(device=dev, dtype=dtype)
    valid = torch.arange(s_max)[None] < n_rows[:, None]
    row_img, row_s = (t.to(dev) for t in valid.nonzero(as_tuple=True))
    lab_flat = labels.flatten(1)
    y = torch.zeros((batch, s_max), device=dev, dtype=dtype)

    def work(a: int, b: int):
        img, s = row_img[a:b], row_s[a:b]
        on = z[img, s].gather(1, lab_flat[img]).view(b - a, 1, *x.shape[2:])
        score = target_score(clf.forward(torch.where(on, x[img], base[img])), tgt[img], output, clf.multilabel)
        y[img, s] = score.to(dtype)

    evaluator = Evaluator(clf, batch_size)
    with torch.no_grad(), clf.eval_mode():
        evaluator.run(int(row_img.numel()), work)
    zf = z.to(dtype)
    keep = torch.arange(f_max, device=dev)[None] < n_feat[:, None]

    if kind == "lime":
        # Captum's default kernel: exp(-d^2 / (2 width^2)), d = cosine distance between x and the
        # perturbed input, from per-feature sums of x*x, x*baseline, baseline*baseline
        def per_feature(v):
            return torch.zeros((batch, f_max), device=dev, dtype=dtype).scatter_add_(
                1, lab_flat, v.to(dtype).sum(dim=1).flatten(1))
        sxx, sxb, sbb = per_feature(x * x), per_feature(x * base), per_feature(base * base)
        dot = (zf * sxx[:, None]).sum(-1) + ((1 - zf) * sxb[:, None]).sum(-1)
        pp = (zf * sxx[:, None]).sum(-1) + ((1 - zf) * sbb[:, None]).sum(-1)
        cos = dot / torch.sqrt((sxx.sum(1, keepdim=True) * pp).clamp_min(1e-16))
        w = w * torch.exp(-((1 - cos) ** 2) / (2 * float(kernel_width) ** 2)) * valid.to(dev)
        coef, b0 = _weighted_ridge(zf, y, w, keep, float(alpha), intercept=True)
    else:
        # efficiency exactly: sum(coef) = f(x) - f(baseline), intercept f(baseline); the last
        # feature is eliminated (coef_last = total - sum of the others) and the rest fitted
        ends = evaluator.scores(torch.cat([x, base]), torch.cat([tgt, tgt]), output=output).to(dtype)
        v1, v0 = ends[:batch], ends[batch:]
        last = (n_feat - 1).clamp_min(0)
        z_last = zf.gather(2, last.view(-1, 1, 1).expand(-1, s_max, 1))[..., 0]
        y_t = (y - v0[:, None] - z_last * (v1 - v0)[:, None]) * valid.to(dev)
        free = torch.arange(f_max, device=dev)[None] < last[:, None]
        coef, _ = _weighted_ridge(zf - z_last[..., None], y_t, w, free, float(alpha), intercept=False)
        coef = coef.scatter(1, last[:, None], ((v1 - v0) - coef.sum(dim=1))[:, None]) * keep
        b0 = v0
    return SurrogateFit(coef.float(), b0.float(), labels, n_feat)


_PARAMS_DOC = """
    Parameters
    ----------
    segmentation : ``"slic"`` (default: SLIC superpixels, see :func:`segment`), ``"grid"``, or
        integer labels ``[*spatial]`` / ``[B, *spatial]``.
    n_segments : SLIC's target number of segments (and the grid's, when ``cell`` is None). Default 50.
    compactness : SLIC compactness on [0, 1]-scaled values. Default 0.3.
    cell : grid cell size per axis (``segmentation="grid"``). Default None: from ``n_segments``.
    baseline : what switched-off segments become: 0.0 (default, Captum's), a number, ``"mean"``,
        ``"blur"`` or a tensor.
    output : ``"logit"`` (default) or ``"prob"``.
    batch_size : rows (image, sample) per model call.
    seed : seed of the masks; an image gets the same masks in any batch and at any ``batch_size``.
"""


@register("surrogate", "weighted linear model over superpixels fitted to perturbed scores (Ribeiro et al. 2016)")
def lime(clf, x, target="predicted", *, segmentation="slic", n_segments: int = 50, compactness: float = 0.3,
         cell=None, baseline=0.0, samples: int = 1000, kernel_width: float = 1.0, alpha: float = 1.0,
         output: str = "logit", batch_size: int = 64, seed: int = 0) -> torch.Tensor:
    """LIME (Ribeiro, Singh & Guestrin, KDD 2016) over superpixels: ``[B, *spatial]`` coefficients.

    Each of ``samples`` masks (default 1000, the ``lime`` package's) keeps every segment with
    probability 1/2. Sample weight: Captum's default kernel ``exp(-d^2 / (2 kernel_width^2))`` with
    ``d`` the cosine distance between the image and the perturbed image (``kernel_width=1.0``,
    Captum's). Fit: ridge with an unpenalised intercept, ``alpha=1.0`` (sklearn's and the ``lime``
    package's default; Captum's default surrogate is a Lasso, which has no closed form to batch).
    """
    return fit_surrogate(clf, x, target, kind="lime", segmentation=segmentation, n_segments=n_segments,
                         compactness=compactness, cell=cell, baseline=baseline, samples=samples,
                         kernel_width=kernel_width, alpha=alpha, output=output, batch_size=batch_size,
                         seed=seed).to_map()


@register("surrogate", "Shapley values of superpixels by the Shapley-kernel regression (Lundberg & Lee 2017)")
def kernel_shap(clf, x, target="predicted", *, segmentation="slic", n_segments: int = 50,
                compactness: float = 0.3, cell=None, baseline=0.0, samples: int = 2048, alpha: float = 0.0,
                output: str = "logit", batch_size: int = 64, seed: int = 0) -> torch.Tensor:
    """KernelSHAP (Lundberg & Lee, NeurIPS 2017) over superpixels: ``[B, *spatial]`` Shapley values.

    Coalitions are sampled as Captum does (size ~ Shapley kernel mass, then uniform), ``samples``
    of them (default 2048, about the ``shap`` package's ``2 F + 2048``); with ``samples >= 2**F - 2``
    every coalition is enumerated and the result is the exact Shapley values. Efficiency holds
    exactly (``sum = f(x) - f(baseline)``, the last feature eliminated rather than Captum's large
    weights on the full and empty coalitions), so a model additive in the segments gets its exact
    Shapley values from any sample. ``alpha``: ridge penalty, default 0 (plain least squares).
    """
    return fit_surrogate(clf, x, target, kind="kernel_shap", segmentation=segmentation, n_segments=n_segments,
                         compactness=compactness, cell=cell, baseline=baseline, samples=samples, alpha=alpha,
                         output=output, batch_size=batch_size, seed=seed).to_map()


lime.__doc__ += _PARAMS_DOC
kernel_shap.__doc__ += _PARAMS_DOC
