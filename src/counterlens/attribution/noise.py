"""SmoothGrad, VarGrad and SquareGrad around any gradient method.

Each wraps a registered method of kind ``"gradient"`` (``method="saliency"`` by default, with
``method_params`` passed on) and evaluates it on ``samples`` noisy copies of every image:

- ``smoothgrad``: the mean map (Smilkov et al. 2017, "SmoothGrad: removing noise by adding noise");
- ``squaregrad``: the mean of the squared maps (Hooker et al. 2019, "A benchmark for
  interpretability methods in deep neural networks", SmoothGrad-Squared);
- ``vargrad``: their variance, ``mean(m^2) - mean(m)^2`` clamped at 0 (Adebayo et al. 2018,
  "Local explanation methods for deep neural networks lack sensitivity to parameter values").

The noise is Gaussian with standard deviation ``noise * (max(x_i) - min(x_i))`` per image ``i``
(the paper's "noise level" as a fraction of the value range), added in data space, not clamped.

Batching: rows are (image, sample). The evaluator hands out chunks of ``batch_size`` rows; each
chunk's noisy inputs are built inside the chunk and passed to the inner method with
``batch_size`` set to the chunk size (one model call per chunk for single-pass methods; an IG
inside makes ``steps`` calls of that size), and the per-image sum and sum of squares are
accumulated with ``index_add_`` in float64. Peak memory is set by ``batch_size``.

Randomness: the noise of row (image, sample) is a pure function of ``(seed, image, sample,
element)`` (a counter-based generator, :func:`counter_normal`), so the result does not depend on
``batch_size``, on the chunk split after an out-of-memory retry, or on the device; the same seed
gives bitwise the same noise. "image" is the image's row in the call, or, inside
``with case_keys(ids):`` (as dataset runs do), a hash of the case's identity: then an image gets
the same noise whatever batch it is explained in (a resumed run, another ``--images-per-batch``,
another worker or machine).
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import math
import operator

import torch

from ..errors import InputError, MethodError
from .base import METHODS, Evaluator, check_params, prepare, register

NOISE_METHODS = ("smoothgrad", "squaregrad", "vargrad")

_MASK32 = 0xFFFFFFFF


# -- which case a row is --------------------------------------------------------------------------
_CASE_KEYS: contextvars.ContextVar = contextvars.ContextVar("counterlens_case_keys", default=None)


def key_of(case_id: str) -> int:
    """A case's identity (e.g. its path relative to the data root) as a 32-bit random key."""
    return int.from_bytes(hashlib.blake2b(str(case_id).encode("utf-8", "backslashreplace"),
                                          digest_size=4).digest(), "little")


@contextlib.contextmanager
def case_keys(ids):
    """Within the block, random methods key each image's randomness by ``ids`` (one per row of
    the batch: case identities as strings, or ints) instead of the image's row, so an image's maps
    do not depend on which batch it is in. ``None`` restores keying by row."""
    keys = None
    if ids is not None:
        keys = torch.tensor([key_of(i) if isinstance(i, str) else int(i) & _MASK32 for i in ids], dtype=torch.int64)
    token = _CASE_KEYS.set(keys)
    try:
        yield keys
    finally:
        _CASE_KEYS.reset(token)


def row_keys(rows: torch.Tensor) -> torch.Tensor:
    """The random key of each row index of the current batch: its case key inside
    :func:`case_keys`, else the row index itself."""
    keys = _CASE_KEYS.get()
    if keys is None:
        return rows
    if int(rows.max()) >= len(keys) if rows.numel() else False:
        raise InputError(f"case_keys has {len(keys)} keys but the batch has row {int(rows.max())}; pass one key per image")
    return keys.to(rows.device)[rows]


# -- counter-based Gaussian noise -----------------------------------------------------------------
def _mul32_(x: torch.Tensor, c: int) -> torch.Tensor:
    """In place ``x = (x * c) mod 2**32`` for int64 ``0 <= x < 2**32``, without overflow (16-bit halves)."""
    high = x * (c >> 16)
    high.bitwise_and_(0xFFFF).bitwise_left_shift_(16)
    return x.mul_(c & 0xFFFF).add_(high).bitwise_and_(_MASK32)


def _hash32_(x: torch.Tensor) -> torch.Tensor:
    """In place bijective 32-bit integer hash ("lowbias32", C. Wellons) of int64 values in [0, 2**32)."""
    x.bitwise_xor_(x >> 16)
    _mul32_(x, 0x7FEB352D)
    x.bitwise_xor_(x >> 15)
    _mul32_(x, 0x846CA68B)
    return x.bitwise_xor_(x >> 16)


def counter_normal(seed: int, keys: tuple[torch.Tensor, ...], numel: int) -> torch.Tensor:
    """Standard normal noise ``[n, numel]`` (float32), a pure function of the seed, keys and position.

    ``keys``: int tensors ``[n]`` naming each row, e.g. ``(image, sample)``, each in
    ``[0, 2**32)``. Row ``r`` gets the same values whatever other rows are drawn with it, which
    makes chunked methods independent of their chunk size (a sequential ``torch.Generator``
    cannot skip ahead to a row without drawing everything before it). Two hash rounds per
    element turn (row keys, position) into 23 random bits; the inverse normal CDF makes them
    Gaussian (values within about +-5.3). Integer arithmetic only, so CPU and GPU draw the same bits.
    """
    device = keys[0].device
    k1 = _hash32_(torch.full(keys[0].shape, int(seed) & _MASK32, dtype=torch.int64, device=device))
    for key in keys:
        k1 = _hash32_(k1.bitwise_xor_(key.to(torch.int64) & _MASK32))
    k2 = _hash32_(k1 ^ 0x9E3779B9)
    bits = torch.arange(numel, device=device, dtype=torch.int64)[None, :] + k1[:, None]
    _hash32_(bits.bitwise_and_(_MASK32))
    _hash32_(bits.bitwise_xor_(k2[:, None]))
    # 23 bits v -> (v + 0.5) / 2**22 - 1, exact in float32 and strictly inside (-1, 1)
    centred = bits.bitwise_right_shift_(9).to(torch.float32).add_(0.5).mul_(2.0 ** -22).sub_(1.0)
    del bits
    return centred.erfinv_().mul_(math.sqrt(2.0))


# -- the wrappers ---------------------------------------------------------------------------------
def _inner(method: str, method_params: dict | None, seed: int):
    """The wrapped method's info and its keyword arguments, validated."""
    gradient_methods = sorted(n for n, i in METHODS.items() if i.kind == "gradient")
    key = str(method).strip().lower().replace("-", "_")
    info = METHODS.get(key)
    if info is None or info.kind != "gradient":
        raise MethodError(f"method={method!r} cannot be wrapped; pass one of the gradient methods: "
                          f"{', '.join(gradient_methods)}")
    if method_params is not None and not isinstance(method_params, dict):
        raise InputError(f"method_params={method_params!r}; pass a dict of {info.name}'s parameters, "
                         f"e.g. {info.defaults()}")
    params = dict(method_params or {})
    if "batch_size" in params:
        raise InputError("method_params may not set batch_size: the inner method gets the chunk size; "
                         "pass batch_size to the noise method itself")
    check_params(info, params)
    if "seed" in info.defaults():
        params.setdefault("seed", seed)
    return info, params


def _positive_int(samples) -> int:
    try:
        value = operator.index(samples)
    except TypeError:
        value = 0
    if value < 1:
        raise InputError(f"samples={samples!r}; pass a positive number of noisy copies per image (25 is usual)")
    return value


def _nonnegative_float(noise) -> float:
    try:
        value = float(noise)
    except (TypeError, ValueError):
        value = -1.0
    if not math.isfinite(value) or value < 0:
        raise InputError(f"noise={noise!r}; pass the noise std as a fraction of each image's value range, "
                         ">= 0 (0.1 to 0.2 is usual; 0 gives the inner method)")
    return value


def noise_tunnel(clf, x, target, statistic: str, *, method: str = "saliency", method_params: dict | None = None,
                 samples: int = 25, noise: float = 0.15, batch_size: int = 64, seed: int = 0) -> torch.Tensor:
    """Shared engine of the three wrappers; ``statistic``: ``"mean"``, ``"mean_square"`` or ``"variance"``.

    Returns ``[B, *spatial]`` in ``x``'s dtype.
    """
    if statistic not in ("mean", "mean_square", "variance"):
        raise InputError(f"statistic={statistic!r}; pass 'mean', 'mean_square' or 'variance'")
    x, tgt = prepare(clf, x, target, batch_size)
    info, params = _inner(method, method_params, seed)
    samples, noise = _positive_int(samples), _nonnegative_float(noise)
    batch, n_rows = x.shape[0], x.shape[0] * samples
    flat = x.flatten(1)
    scale = float(noise) * (flat.amax(dim=1) - flat.amin(dim=1))
    shape = (-1,) + (1,) * (x.dim() - 1)
    acc_dtype = torch.float64 if x.device.type in ("cpu", "cuda") else torch.float32
    sums: dict[str, torch.Tensor] = {}

    def work(a: int, b: int):
        rows = torch.arange(a, b, device=x.device)
        img, smp = rows // samples, rows % samples
        eps = counter_normal(seed, (row_keys(img), smp), flat.shape[1]).view(b - a, *x.shape[1:])
        xb = x[img] + scale[img].view(shape) * eps
        del eps
        with case_keys(None):      # the inner method's rows are noisy copies, not cases
            m = info.function(clf, xb, tgt[img], **params, batch_size=b - a).detach().to(acc_dtype)
        if not sums:
            sums["sum"] = torch.zeros((batch,) + m.shape[1:], dtype=acc_dtype, device=x.device)
            if statistic != "mean":
                sums["square"] = torch.zeros_like(sums["sum"])
        sums["sum"].index_add_(0, img, m)
        if statistic != "mean":
            sums["square"].index_add_(0, img, m * m)

    with clf.eval_mode():
        Evaluator(clf, batch_size).run(n_rows, work)
    mean = sums["sum"] / samples
    if statistic == "mean":
        out = mean
    elif statistic == "mean_square":
        out = sums["square"] / samples
    else:
        out = (sums["square"] / samples - mean * mean).clamp_min(0)
    return out.to(x.dtype)


_DOC_PARAMS = """
    Parameters (keyword-only)
    -------------------------
    method : "saliency"
        Name of a registered gradient method (``saliency``, ``input_x_gradient``,
        ``guided_backprop``, ``deconvnet``, ``integrated_gradients``, ...).
    method_params : dict or None
        Its parameters, e.g. ``{"absolute": False}`` or ``{"steps": 16}`` (not ``batch_size``;
        an inner ``seed`` defaults to ``seed``; a random inner method, e.g. IG with a
        ``"uniform"`` baseline, draws per chunk, so only then does ``batch_size`` change the result).
    samples : 25
        Noisy copies per image.
    noise : 0.15
        Noise std as a fraction of each image's value range ``max - min`` (Smilkov et al.: 0.1-0.2).
    batch_size : 64
        (image, sample) rows per chunk; the inner method runs on one chunk at a time.
    seed : 0
        Seed of the noise; the output does not depend on ``batch_size``.

    Returns ``Tensor[B, *spatial]``: the inner method's maps (already channel-reduced by it)
    """


@register("noise", "mean of a gradient method over noisy copies of x (Smilkov et al. 2017)")
def smoothgrad(clf, x, target="predicted", *, method: str = "saliency", method_params: dict | None = None,
               samples: int = 25, noise: float = 0.15, batch_size: int = 64, seed: int = 0) -> torch.Tensor:
    return noise_tunnel(clf, x, target, "mean", method=method, method_params=method_params, samples=samples,
                        noise=noise, batch_size=batch_size, seed=seed)


@register("noise", "mean of the squared maps of a gradient method over noisy copies (Hooker et al. 2019)")
def squaregrad(clf, x, target="predicted", *, method: str = "saliency", method_params: dict | None = None,
               samples: int = 25, noise: float = 0.15, batch_size: int = 64, seed: int = 0) -> torch.Tensor:
    return noise_tunnel(clf, x, target, "mean_square", method=method, method_params=method_params,
                        samples=samples, noise=noise, batch_size=batch_size, seed=seed)


@register("noise", "variance of a gradient method's maps over noisy copies of x (Adebayo et al. 2018)")
def vargrad(clf, x, target="predicted", *, method: str = "saliency", method_params: dict | None = None,
            samples: int = 25, noise: float = 0.15, batch_size: int = 64, seed: int = 0) -> torch.Tensor:
    return noise_tunnel(clf, x, target, "variance", method=method, method_params=method_params,
                        samples=samples, noise=noise, batch_size=batch_size, seed=seed)


smoothgrad.__doc__ = ("SmoothGrad: the mean of the inner method's maps over noisy copies of x "
                      "(Smilkov et al. 2017).\n" + _DOC_PARAMS + "averaged over samples.\n")
squaregrad.__doc__ = ("SquareGrad (SmoothGrad-Squared): the mean of the squared maps over noisy copies "
                      "(Hooker et al. 2019).\n" + _DOC_PARAMS + "squared, then averaged over samples.\n")
vargrad.__doc__ = ("VarGrad: the variance of the inner method's maps over noisy copies of x, "
                   "mean(m^2) - mean(m)^2 clamped at 0 (Adebayo et al. 2018).\n" + _DOC_PARAMS
                   + "their population variance over samples (divided by samples, not samples - 1).\n")
