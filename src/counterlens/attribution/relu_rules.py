"""Modified ReLU backward rules (guided backprop, deconvnet) without touching the model.

:func:`relu_rule` is a context manager: while it is active, every ReLU the model calls, as a
module (``nn.ReLU``, in-place or not) or functionally (``F.relu``, ``F.relu(inplace=True)``,
``F.relu_``, ``torch.relu``, ``torch.relu_``, ``Tensor.relu``, ``Tensor.relu_``), is answered by
a custom :class:`torch.autograd.Function` with the same forward values and a modified backward:

- ``"guided"`` (Springenberg et al. 2015, "Striving for simplicity"):
  ``grad_in = grad_out * (input > 0) * (grad_out > 0)``
- ``"deconvnet"`` (Zeiler & Fergus 2014): ``grad_in = relu(grad_out)``

It works at the autograd level through a :class:`torch.overrides.TorchFunctionMode`, so no hook,
module or parameter of the model is touched, and leaving the ``with`` block (also by an exception)
restores everything. In-place forms still modify their input in place (``mark_dirty``), so code
that ignores the return value of ``x.relu_()`` keeps working.

The aten ops ``aten.relu`` / ``aten.relu_`` that torch.export graphs call are answered too, and
TorchScript modules are explained through their graph view (``counterlens.attribution.graphs``).
Not covered (they keep their ordinary backward): other activations (ReLU6, LeakyReLU, GELU,
``clamp(min=0)``, ``F.threshold``), and ``torch.compile``-d graphs.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..errors import InputError

RELU_RULES = ("guided", "deconvnet")

_OUT_OF_PLACE = {F.relu, torch.relu, torch.Tensor.relu, torch.ops.aten.relu.default}   # aten: exported graphs
_IN_PLACE = {torch.relu_, torch.Tensor.relu_, F.relu_, torch.ops.aten.relu_.default}


class _GuidedReLU(torch.autograd.Function):
    """ReLU forward; backward ``grad * (input > 0) * (grad > 0)``."""

    @staticmethod
    def forward(ctx, x, inplace: bool):
        if inplace:
            out = torch.relu_(x)
            ctx.mark_dirty(x)
        else:
            out = torch.relu(x)
        ctx.save_for_backward(out)          # out > 0 exactly where input > 0 (also after in-place)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return grad.clamp_min(0).masked_fill_(out <= 0, 0), None   # one float temporary, not three


class _DeconvReLU(torch.autograd.Function):
    """ReLU forward; backward ``relu(grad)``, whatever the input was."""

    @staticmethod
    def forward(ctx, x, inplace: bool):
        if inplace:
            out = torch.relu_(x)
            ctx.mark_dirty(x)
            return out
        return torch.relu(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.clamp_min(0), None


_FUNCTIONS = {"guided": _GuidedReLU, "deconvnet": _DeconvReLU}


class _ReluRuleMode(TorchFunctionMode):
    """Answers every ReLU call with ``function``; everything else passes through unchanged."""

    def __init__(self, function):
        super().__init__()
        self.function = function
        self.calls = 0      # ReLU calls answered (lets callers warn when a model has none)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _OUT_OF_PLACE or func in _IN_PLACE:
            x = args[0] if args else kwargs.get("input", kwargs.get("self"))
            if isinstance(x, torch.Tensor) and x.is_floating_point():
                inplace = func in _IN_PLACE or bool(kwargs.get("inplace", args[1] if len(args) > 1 else False))
                self.calls += 1
                return self.function.apply(x, inplace)
        return func(*args, **kwargs)


@contextlib.contextmanager
def relu_rule(rule: str):
    """Context manager: every ReLU called inside gets the backward rule ``rule``.

    ``rule``: ``"guided"`` (guided backprop) or ``"deconvnet"``. Yields the mode object, whose
    ``calls`` attribute counts the ReLU calls answered so far. Forward values are identical to an
    ordinary ReLU; only gradients change. Example::

        with relu_rule("guided"):
            grad = torch.autograd.grad(model(x)[:, k].sum(), x)[0]
    """
    if rule not in _FUNCTIONS:
        raise InputError(f"rule={rule!r}; pass one of {', '.join(RELU_RULES)}")
    with _ReluRuleMode(_FUNCTIONS[rule]) as mode:
        yield mode
