"""Token maps of vision transformers as feature maps for the CAM methods.

A ViT layer returns tokens ``[B, N, D]``: maybe a class token, register or distillation tokens,
then one token per patch of an ``h x w`` grid (``d x h x w`` for volumes). The CAM methods need a
feature map ``[B, D, h, w]``: :func:`tokens_to_map` drops the extra tokens and reshapes the patch
tokens to the grid (activations and gradients alike).

The grid is found from the model: ``reshape=(h, w)`` when given; else the spatial shape of the
last feature map computed before the first token output (the patch embedding's ``[B, D, h, w]``:
non-square grids too); else, when no module returns a spatial map (patches cut by ``unfold`` and
embedded by a ``Linear``), ``N - k`` a square (a cube for 3D inputs) for the fewest extra tokens
``k`` (at most :data:`MAX_EXTRA_TOKENS`). Extra tokens are taken to come first (class token,
registers); ``tokens=k`` says how many there are, ``tokens=-k`` that they are the last ``k``.
When none of this gives a grid, a :class:`MethodError` says to pass ``reshape=``.

:func:`find_token_layer` picks the layer for a transformer: of the token outputs with the
embedding width ``D`` and one token per patch (plus extras), called once per forward, the last
one whose gradient of the predicted score reaches the *patch* tokens (a head reading only the class
token gives zero gradient to every patch token after the last attention), preferring a
normalisation layer: the last block's ``norm1`` in the usual ViT layout, as pytorch-grad-cam
advises.
"""
from __future__ import annotations

import contextlib
import math

import torch

from ..errors import InputError, MethodError

MAX_EXTRA_TOKENS = 16


def is_token_output(out, x: torch.Tensor) -> bool:
    """``[B, N, D]`` from an image or volume input ``[B, C, *spatial]`` with 2 or 3 spatial axes."""
    return isinstance(out, torch.Tensor) and out.is_floating_point() and out.dim() == 3 and x.dim() >= 4


@contextlib.contextmanager
def _hooks(modules, hook):
    handles = []
    try:
        for m in modules:
            handles.append(m.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


def probe(clf, x: torch.Tensor, *, grad: bool = False) -> dict:
    """One forward of ``x[:1]`` recording, in the order modules finish, every spatial map and every
    token output: ``{"names", "calls", "spatial": [(module, out, out._version)], "tokens": [(module, out)],
    "order": ["spatial" | "tokens", ...], "logits"}``. ``grad=True`` keeps the autograd graph (for
    :func:`find_token_layer`)."""
    names = {m: n for n, m in clf.module.named_modules()        # a scripted part is opaque: not hooked
             if n and not isinstance(m, torch.jit.ScriptModule)}
    rec = {"names": names, "calls": {}, "spatial": [], "tokens": [], "order": []}

    def hook(module, _inp, out):
        rec["calls"][module] = rec["calls"].get(module, 0) + 1
        if isinstance(out, torch.Tensor) and out.dim() == x.dim() and out.shape[2:].numel() > 1:
            rec["spatial"].append((module, out, out._version))
            rec["order"].append("spatial")
        elif is_token_output(out, x):
            rec["tokens"].append((module, out))
            rec["order"].append("tokens")

    xb = x[:1].detach().requires_grad_(grad)
    with _hooks(list(names), hook), torch.set_grad_enabled(grad), clf.eval_mode():
        rec["logits"] = clf.forward(xb)
    return rec


def patch_grid(rec: dict) -> tuple[int, ...] | None:
    """The spatial shape of the last feature map finished before the first token output, or None."""
    if not rec["tokens"]:
        return None
    n_before = rec["order"][:rec["order"].index("tokens")].count("spatial")
    return tuple(rec["spatial"][n_before - 1][1].shape[2:]) if n_before else None


def transformer_after_maps(rec: dict) -> bool:
    """Whether the model computes tokens after its last spatial map (a ViT, or a CNN stem + transformer)."""
    order = rec["order"]
    last = {kind: i for i, kind in enumerate(order)}
    return "tokens" in last and last["tokens"] > last.get("spatial", -1)


def square_grid(n_tokens: int, n_axes: int, tokens: int | None = None) -> tuple[int, ...] | None:
    """A grid of ``n_tokens - k`` patches, a square (cube for 3 axes), for the given or fewest ``k``."""
    extras = [abs(tokens)] if tokens is not None else range(min(MAX_EXTRA_TOKENS, n_tokens - 1) + 1)
    for k in extras:
        side = round((n_tokens - k) ** (1 / n_axes))
        if side > 1 and side ** n_axes == n_tokens - k:
            return (side,) * n_axes
    return None


def check_reshape(reshape, n_axes: int) -> tuple[int, ...] | None:
    if reshape is None:
        return None
    try:
        grid = tuple(int(v) for v in reshape)
    except (TypeError, ValueError):
        grid = ()
    if len(grid) != n_axes or any(v < 1 for v in grid) or any(int(v) != v for v in reshape):
        raise InputError(f"reshape={reshape!r}; pass the patch grid, one positive int per spatial axis "
                         f"({n_axes}), e.g. reshape=(14, 14)")
    return grid


def tokens_to_map(t: torch.Tensor, grid: tuple[int, ...], tokens: int | None = None, layer: str = "the layer"):
    """Tokens ``[b, N, D]`` -> feature map ``[b, D, *grid]``: the extra tokens dropped (``tokens``:
    how many lead, or ``-k``: the last ``k``; default ``N - prod(grid)`` leading ones)."""
    n_patches = math.prod(grid)
    n = t.shape[1]
    if tokens is None:
        extra = n - n_patches
        if extra < 0:
            raise MethodError(f"{layer} returns {n} tokens, fewer than the {n_patches} patches of the grid {grid}; "
                              "pass reshape=(h, w) with the patch grid, or name another layer with layer=...")
        patches = t[:, extra:]
    elif not isinstance(tokens, int) or isinstance(tokens, bool):
        raise InputError(f"tokens={tokens!r}; pass the number of extra (non-patch) tokens before the patches, "
                         "e.g. tokens=1 for a class token, or -k for k tokens after them")
    else:
        patches = t[:, tokens:] if tokens >= 0 else t[:, :tokens]
    if patches.shape[1] != n_patches:
        raise MethodError(f"{layer} returns {n} tokens; without the {n - patches.shape[1]} extra ones that leaves "
                          f"{patches.shape[1]}, not the {n_patches} patches of the grid {grid}; pass reshape=(h, w) "
                          "and tokens=<number of extra tokens>")
    return patches.transpose(1, 2).reshape(t.shape[0], t.shape[2], *grid)


def token_grid(clf, x: torch.Tensor, n_tokens: int, reshape=None, tokens: int | None = None,
               layer: str = "the layer") -> tuple[int, ...]:
    """The patch grid of a token layer: ``reshape``, else the model's patch embedding (probed once
    per input shape, remembered on the classifier), else a square / cube; else a MethodError."""
    n_axes = x.dim() - 2
    grid = check_reshape(reshape, n_axes)
    if grid is None:
        found = clf.__dict__.setdefault("_patch_grids", {})
        key = (tuple(x.shape[1:]), id(clf.module))
        if key not in found:
            found[key] = patch_grid(probe(clf, x))
        grid = found[key]
        if grid is not None and tokens is None and not 0 <= n_tokens - math.prod(grid) <= MAX_EXTRA_TOKENS:
            grid = None          # the last map before the tokens is not the patch embedding
    if grid is None:
        grid = square_grid(n_tokens, n_axes, tokens)
    if grid is None:
        raise MethodError(f"{layer} returns tokens [B, {n_tokens}, D] and no patch grid fits them (no patch "
                          "embedding map, and no square number of patches); pass reshape=(h, w) and, when there "
                          "are extra tokens, tokens=<how many lead>")
    return grid


def find_token_layer(clf, x: torch.Tensor) -> str:
    """The transformer layer to explain (see the module doc); a MethodError when none fits."""
    rec = probe(clf, x, grad=True)
    names, calls = rec["names"], rec["calls"]
    grid = patch_grid(rec)
    n_axes = x.dim() - 2
    width = None
    if grid is not None:                             # the patch embedding's map: its channels are the width
        n_before = rec["order"][:rec["order"].index("tokens")].count("spatial")
        width = rec["spatial"][n_before - 1][1].shape[1]

    def fits(out) -> bool:
        n = out.shape[1]
        if grid is not None:
            ok = 0 <= n - math.prod(grid) <= MAX_EXTRA_TOKENS
        else:
            ok = square_grid(n, n_axes) is not None
        return ok and (width is None or out.shape[2] == width)

    cands = [(m, out) for m, out in rec["tokens"] if calls[m] == 1 and out.requires_grad and fits(out)]
    if not cands:
        raise MethodError("this transformer has no token layer with one token per patch to take a CAM from; "
                          "name one with layer='blocks.11.norm1' (and reshape=(h, w) if needed)")
    score = rec["logits"][0, rec["logits"][0].argmax()]
    grads = torch.autograd.grad(score, [out for _, out in cands], allow_unused=True)
    reaching = []
    for (m, out), g in zip(cands, grads):
        n_patches = math.prod(grid) if grid is not None else math.prod(square_grid(out.shape[1], n_axes))
        if g is not None and bool(g[:, out.shape[1] - n_patches:].abs().amax() > 0):
            reaching.append(m)
    if not reaching:
        raise MethodError("no token layer of this transformer gets a gradient on its patch tokens; "
                          "name one with layer=... (e.g. the last block's first norm)")
    norms = [m for m in reaching if "norm" in type(m).__name__.lower()      # a norm module, or a graph's norm op
             or "norm" in names[m].rpartition(".")[2].lower()]
    return names[(norms or reaching)[-1]]
