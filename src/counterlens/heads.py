"""Output heads: what a classifier's output means, and the scores every method differentiates.

A module may end in logits, in a softmax (probabilities), in one sigmoid (a binary classifier) or
in one sigmoid per finding (multi-label). :class:`~counterlens.model.Classifier` turns each into
*scores* ``[B, K]`` that are never squashed twice:

``"logits"``         the module's output (one column ``z`` -> ``[-z/2, z/2]``).
``"probabilities"``  a final softmax: the pre-softmax logits, captured at the final
                     ``nn.Softmax`` / ``nn.LogSoftmax`` module or ``softmax`` call; when they cannot
                     be captured (TorchScript, a reshaped output), ``log p`` (log-probabilities:
                     the same softmax, the same gradients up to a per-row constant).
``"sigmoid"``        one sigmoid output: its logit ``z`` (captured at the final ``nn.Sigmoid`` /
                     ``sigmoid`` call, else ``log p - log(1 - p)``; a one-column module without a
                     detectable sigmoid is taken to return the logit) -> ``[-z/2, z/2]``, a binary
                     classifier with classes ``"not X"`` / ``"X"``.
``"multilabel"``     ``K`` independent sigmoid findings: the per-finding logits ``z_k`` (captured, or
                     turned back from probabilities, or the output itself without a sigmoid).

``"auto"`` reads an ``nn.Sequential`` ending in ``nn.Linear`` (and an activation) at construction;
any other module's head is found on the first forward pass, run under a probe that records the
final ``nn.Softmax`` / ``nn.LogSoftmax`` / ``nn.Sigmoid`` module or ``softmax`` / ``log_softmax`` /
``sigmoid`` call whose result is the model's output (its input is then captured on every pass, by a
forward hook or a ``TorchFunctionMode``). TorchScript and ``torch.export`` models cannot be hooked
inside: their graph's last node says (softmax: log-probabilities; sigmoid: the logit turned back from
the probability, flat where float32 rounds it to 0 or 1, beyond ``|z| ~ 16.6``). Without any of these
one column is ``"sigmoid"`` (taken to be a logit: a one-output model that applies a sigmoid no probe
can see must be given a graph or a module that shows it), ``K`` columns ``"logits"``, unless every row
is non-negative and sums to 1: then ``"probabilities"``, with a warning.

An explicit ``output=`` is checked against what is found (``"sigmoid"`` with several outputs, a
softmax model called ``"multilabel"``, ``"probabilities"`` whose rows do not sum to 1 raise
:class:`~counterlens.errors.InputError`; ``"logits"`` on a model ending in an activation warns).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import InputError

HEADS = ("auto", "logits", "probabilities", "sigmoid", "multilabel")
ACTIVATION_MODULES = {nn.Softmax: "softmax", nn.LogSoftmax: "log_softmax", nn.Sigmoid: "sigmoid"}
ACTIVATION_FUNCTIONS = {
    F.softmax: "softmax", torch.softmax: "softmax", torch.Tensor.softmax: "softmax",
    torch.special.softmax: "softmax",
    F.log_softmax: "log_softmax", torch.log_softmax: "log_softmax", torch.Tensor.log_softmax: "log_softmax",
    torch.special.log_softmax: "log_softmax",
    torch.sigmoid: "sigmoid", torch.Tensor.sigmoid: "sigmoid", F.sigmoid: "sigmoid", torch.special.expit: "sigmoid",
}
_SUMS_TO_ONE = 1e-4          # tolerance of "every row sums to 1" (probabilities without a visible softmax)


def check_output(output) -> str:
    """Validate a head name (``output=``); returns it lower-cased."""
    key = str(output).strip().lower() if isinstance(output, str) else output
    if key not in HEADS:
        raise InputError(f"output={output!r} is not a head; pass one of {', '.join(HEADS)}")
    return key


class Capture:
    """Records ``(output, input)`` of the activation modules and functions called inside ``with``.

    ``modules``: activation modules to hook (forward hooks, removed on exit); ``functions``: also
    watch ``softmax`` / ``log_softmax`` / ``sigmoid`` calls (a ``TorchFunctionMode``). Calls from other
    threads may be recorded too; :meth:`find` matches by identity with the model's output.
    """

    def __init__(self, modules=(), functions: bool = False):
        self.modules, self.functions = list(modules), functions
        self.calls: list[tuple[str, torch.Tensor, torch.Tensor, object]] = []
        self._handles, self._mode = [], None

    def __enter__(self):
        for m in self.modules:
            kind = _module_kind(m)
            self._handles.append(m.register_forward_hook(
                lambda mod, inp, out, kind=kind: self.calls.append((kind, out, inp[0] if inp else None, mod))))
        if self.functions:
            self._mode = _FunctionRecorder(self.calls)
            self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        try:
            if self._mode is not None:
                self._mode.__exit__(*exc)
        finally:
            for h in self._handles:
                h.remove()
            self._handles.clear()
        return False

    def find(self, out: torch.Tensor):
        """``(kind, pre_activation, module or None)`` of the last recorded call that produced
        ``out`` itself, or None."""
        for kind, o, i, where in reversed(self.calls):
            if o is out and isinstance(i, torch.Tensor) and i.shape == out.shape:
                return kind, i, where
        return None


class _FunctionRecorder(TorchFunctionMode):
    def __init__(self, calls: list):
        super().__init__()
        self.calls = calls

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        kind = ACTIVATION_FUNCTIONS.get(func)
        if kind is not None and args and isinstance(args[0], torch.Tensor):
            self.calls.append((kind, out, args[0], None))
        return out


def _module_kind(m) -> str | None:
    for cls, kind in ACTIVATION_MODULES.items():
        if isinstance(m, cls):
            return kind
    return None


def activation_modules(module) -> list[nn.Module]:
    """The softmax / log-softmax / sigmoid modules of ``module`` that can take a forward hook."""
    if not isinstance(module, nn.Module) or isinstance(module, torch.jit.ScriptModule):
        return []
    return [m for m in module.modules() if _module_kind(m) is not None and not isinstance(m, torch.jit.ScriptModule)]


def static_head(module):
    """``(found, k)`` read from an ``nn.Sequential``'s last layers without running it, or None.

    ``found`` as :meth:`Capture.find` gives it (``(kind, None, module)`` or None); ``k``: the
    output size, from the last ``nn.Linear`` (the last layer, or the one before a final activation).
    """
    if not isinstance(module, nn.Sequential) or not len(module):
        return None
    seq = module
    while isinstance(seq[-1], nn.Sequential) and len(seq[-1]):
        seq = seq[-1]
    m, kind = seq[-1], _module_kind(seq[-1])
    last = m
    if kind is not None:
        if len(seq) < 2:
            return None
        last = seq[-2]
        while isinstance(last, nn.Sequential) and len(last):
            last = last[-1]
    if not isinstance(last, nn.Linear):
        return None
    return ((kind, None, m) if kind else None), last.out_features


_GRAPH_KINDS = {"softmax": "softmax", "_softmax": "softmax", "log_softmax": "log_softmax",
                "_log_softmax": "log_softmax", "sigmoid": "sigmoid"}


def graph_activation(module) -> str | None:
    """The final activation read from a compiled graph that hooks cannot see into: a TorchScript
    module's, or a ``torch.fx.GraphModule``'s (a ``torch.export`` program's ``module()``, also
    as ``module.program``). ``"softmax"``, ``"log_softmax"``, ``"sigmoid"`` or None."""
    try:
        if isinstance(module, torch.jit.ScriptModule):
            graph = module.inlined_graph
            node = next(iter(graph.return_node().inputs())).node()
            name = node.kind().split("::")[-1]
            return _GRAPH_KINDS.get(name) if node.kind().startswith("aten::") else None
        gm = getattr(module, "program", module)
        if isinstance(gm, torch.fx.GraphModule):
            out = next(n for n in reversed(gm.graph.nodes) if n.op == "output").args[0]
            out = out[0] if isinstance(out, (tuple, list)) and len(out) == 1 else out
            if isinstance(out, torch.fx.Node) and out.op == "call_function":
                name = getattr(out.target, "__name__", str(out.target)).split(".")[0]
                return _GRAPH_KINDS.get(name)
    except Exception:      # noqa: BLE001 - an unreadable graph is simply not detected
        return None
    return None


def resolve_head(requested: str, found, raw: torch.Tensor | None, k: int | None = None, graph: str | None = None):
    """Decide the head: ``(output, activation, note)``, or None when it needs the output itself.

    ``requested``: the ``output=`` asked for; ``found``: :meth:`Capture.find`'s answer on the probe
    pass; ``raw``: the module's output ``[B, K]`` (None: decide from ``k``, the output size, alone);
    ``graph``: :func:`graph_activation`'s answer (an activation seen but not strippable).
    ``activation`` is the final activation to undo (``"softmax"``, ``"log_softmax"``, ``"sigmoid"``)
    or None.
    """
    k = raw.shape[1] if raw is not None else k
    act = found[0] if found else graph
    if raw is None and act is None and k >= 2 and requested == "probabilities":
        return None
    where = (f"a final {type(found[2]).__name__} module" if found and found[2] is not None
             else f"a final {act} call" if found else f"a final {act} in its compiled graph" if act else None)
    if requested == "auto":
        if act in ("softmax", "log_softmax"):
            requested = "probabilities"
        elif act == "sigmoid":
            requested = "sigmoid" if k == 1 else "multilabel"
        elif k == 1:
            requested = "sigmoid"
        elif raw is not None and _sums_to_one(raw):
            warnings.warn("the model's outputs are non-negative and every row sums to 1, so they are read as "
                          "softmax probabilities (explained on log-probabilities); pass output='logits' "
                          "(--output-head logits) if they are logits", stacklevel=4)
            requested, act = "probabilities", "softmax"
        else:
            requested = "logits"
    if requested == "logits":
        if act is not None:
            warnings.warn(f"output='logits' but the model ends in {where}: its {act} output is explained as if "
                          "it were logits; pass output='auto' to explain the scores before it", stacklevel=4)
        return "logits", None, "the module's output, as logits"
    if requested == "probabilities":
        if act == "sigmoid":
            raise InputError(f"output='probabilities' but the model ends in {where}; pass output='sigmoid' "
                             "(one output) or 'multilabel' (one sigmoid per finding)")
        if k < 2:
            raise InputError("output='probabilities' but the model has one output; pass output='sigmoid'")
        if act is None:
            if raw is not None and not _sums_to_one(raw):
                raise InputError("output='probabilities' but the model's outputs are not probabilities (rows do "
                                 "not sum to 1); pass output='logits' or 'auto'")
            act = "softmax"
        note = (f"pre-softmax logits ({where} stripped)" if found else "log-probabilities (the softmax is inside "
                f"the model and cannot be stripped{': ' + where if where else ''})")
        return "probabilities", act, note
    if act in ("softmax", "log_softmax"):
        raise InputError(f"output={requested!r} but the model ends in {where}; pass output='probabilities'")
    if requested == "sigmoid" and k != 1:
        raise InputError(f"output='sigmoid' is one sigmoid output but the model has {k}; pass "
                         "output='multilabel' (one sigmoid per finding) or 'logits'")
    if act == "sigmoid":
        return requested, act, (f"pre-sigmoid logits ({where} stripped)" if found else
                                f"logits turned back from its probabilities ({where}; flat beyond |logit| ~ 16.6)")
    return requested, None, "the module's output, as pre-sigmoid logits"


def head_scores(output: str, act: str | None, raw: torch.Tensor, pre: torch.Tensor | None) -> torch.Tensor:
    """The scores ``[B, K]`` of a resolved head from the module's output ``raw`` and, when captured,
    the input ``pre`` of its final activation."""
    if act is None:
        z = raw
    elif pre is not None:
        z = pre
    elif act == "log_softmax":
        z = raw
    elif act == "softmax":
        z = torch.log(raw.clamp_min(torch.finfo(raw.dtype).tiny))
    else:           # a probability from a sigmoid we could not capture: its logit (saturates at ~16.6)
        eps = torch.finfo(raw.dtype).eps / 2
        p = raw.clamp(eps, 1 - eps)
        z = torch.log(p) - torch.log1p(-p)
    if output in ("logits", "sigmoid") and z.shape[1] == 1:
        z = torch.cat([-0.5 * z, 0.5 * z], dim=1)
    return z


def probabilities(scores: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """Probabilities from scores: per-finding sigmoid (multi-label) or softmax over classes."""
    return torch.sigmoid(scores) if multilabel else torch.softmax(scores, dim=1)


def _sums_to_one(raw: torch.Tensor) -> bool:
    r = raw.detach().float()
    return raw.shape[1] >= 2 and bool((r >= 0).all()) and bool(((r.sum(dim=1) - 1).abs() <= _SUMS_TO_ONE).all())
