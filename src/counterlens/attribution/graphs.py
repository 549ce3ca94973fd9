"""Hookable views of exported models: TorchScript and torch.export programs.

The CAM methods take a layer's output with a forward hook, guided backprop answers ``relu`` calls
from Python, and the sanity check re-draws the parameters of the layers a forward calls. None of
that reaches inside a TorchScript module (its forward runs in C++: ``register_forward_hook is not
supported on ScriptModules``), nor inside ``program.module()`` of a torch.export program (one flat
graph of aten ops: its submodules hold parameters but are never called).

:func:`hookable` gives such a classifier a *view* with the same weights and the same outputs whose
intermediate results are reachable:

- a torch.export program (:class:`~counterlens.loading.ExportedModule`, or any module with an
  ``exported_program``): ``torch.export.unflatten`` rebuilds the module tree, so the eager model's
  layer names (``program.features.3``; ``features.3`` is found by its suffix) are called and hooked
  as usual; when unflattening fails, the flat graph is tapped as below;
- a TorchScript module (scripted or traced): converted to a torch.export program
  (``torch._export.converter.TS2EPConverter``) with a dynamic batch, whose graph is run node by
  node by :class:`GraphTaps`: every aten op's result passes through an identity module named after
  the node (``conv2d_1``, ``relu``), so hooks see it. Layers are then *graph nodes*: the automatic
  target layer is the last spatial one, as for any model; ``layer="relu_1"`` names another (the
  error for an unknown name lists them). Parameters keep their module names (``features.0.weight``),
  so the sanity check randomises them owner by owner in the order the graph first uses them.
- a flat ``torch.fx.GraphModule`` (``program.module()`` passed directly): tapped the same way.

The view is built once per classifier and module (the first CAM call pays for the conversion: about
a second for a small CNN) and never replaces the model's own fast forward for other methods.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import warnings
import weakref

import torch
from torch import nn

from ..errors import MethodError
from ..model import to_module_dtype


class Tap(nn.Module):
    """Identity: makes one graph node's result visible to forward hooks."""

    def forward(self, value):
        return value


class _TapRun(torch.fx.Interpreter):
    def __init__(self, owner: "GraphTaps"):
        super().__init__(owner.graph_module, garbage_collect_values=True)
        self.owner = owner

    def run_node(self, n):
        out = super().run_node(n)
        tap = self.owner._modules.get(n.name) if n.op == "call_function" else None
        return tap(out) if tap is not None else out


class GraphTaps(nn.Module):
    """An FX graph module run node by node, each op's result passed through a :class:`Tap` child
    named after its node, so that CAM hooks can capture it. Same outputs and weights as the graph."""

    def __init__(self, graph_module: torch.fx.GraphModule):
        super().__init__()
        self.graph_module = graph_module
        for node in graph_module.graph.nodes:
            if node.op == "call_function" and node.name not in self._modules and node.name != "graph_module":
                self.add_module(node.name, Tap())

    def forward(self, *args):
        return _TapRun(self).run(*args)

    def train(self, mode: bool = True):
        """Flags only: an exported graph's mode was fixed when it was exported (its module refuses train())."""
        for m in self.children():
            if m is not self.graph_module:
                m.training = bool(mode)
        self.training = bool(mode)
        return self

    def __deepcopy__(self, memo):
        """A copy with its own parameters and buffers, sharing the (read-only) graph: the graph's node
        metadata holds symbolic fake tensors that ``copy.deepcopy`` cannot copy."""
        graph = torch.fx.GraphModule(self.graph_module, self.graph_module.graph)   # new attribute tree
        for mod in graph.modules():
            for key, p in list(mod._parameters.items()):
                if p is not None:
                    mod._parameters[key] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
            for key, b in list(mod._buffers.items()):
                if b is not None:
                    mod._buffers[key] = b.clone()
        twin = GraphTaps(graph)
        twin.train(self.training)
        return twin

    def parameter_owners(self) -> list[str]:
        """Names (in this module) of the modules owning parameters, in the order the graph first uses them."""
        params = dict(self.graph_module.named_parameters())
        owners: list[str] = []
        for node in self.graph_module.graph.nodes:
            if node.op != "call_function":
                continue
            for arg in node.all_input_nodes:
                if arg.op == "get_attr" and arg.target in params:
                    owner = "graph_module." + arg.target.rpartition(".")[0] if "." in arg.target else "graph_module"
                    if owner not in owners:
                        owners.append(owner)
        return owners


def _flat_graph(module) -> bool:
    """A GraphModule whose submodules hold parameters but are never called (``program.module()``)."""
    if not isinstance(module, torch.fx.GraphModule):
        return False
    called = [n for n in module.graph.nodes if n.op == "call_module" and not str(n.target).startswith("_guards")]
    return not called and any(True for _ in module.parameters())


@contextlib.contextmanager
def _quiet():
    """torch.export and its converter log and warn a lot about shapes; not the user's concern here."""
    loggers = [logging.getLogger(name) for name in ("torch.export", "torch._export", "torch._dynamo",
                                                    "torch.fx.experimental.symbolic_shapes")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _from_torchscript(clf, x: torch.Tensor) -> nn.Module:
    from torch._export.converter import TS2EPConverter
    rows = x[:2] if x.shape[0] >= 2 else x[:1].expand(2, *x.shape[1:])     # 2 rows: the batch stays dynamic
    try:
        with torch.no_grad(), clf.eval_mode(), _quiet():       # converted as explained: in eval mode
            z = clf.preprocess(rows) if clf.preprocess is not None else rows
            program = TS2EPConverter(clf.module, (to_module_dtype(clf.module, z).contiguous(),)).convert()
    except Exception as exc:  # noqa: BLE001 - the converter is experimental: say what failed
        raise MethodError(f"this TorchScript model could not be converted to a graph whose feature maps can be "
                          f"hooked ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                          "use a gradient, perturbation or surrogate method, or give the model as a state_dict "
                          "with --factory or as a torch.export .pt2") from exc
    graph = program.module()
    for name, _ in clf.module.named_parameters():      # the converter keeps the weights as buffers
        owner, _, attr = name.rpartition(".")
        sub = graph.get_submodule(owner) if owner else graph
        if attr in sub._buffers:
            sub.register_parameter(attr, nn.Parameter(sub._buffers.pop(attr), requires_grad=False))
    return GraphTaps(graph)


def _from_export(module: nn.Module) -> nn.Module:
    program = module.exported_program
    try:
        with _quiet():
            view = torch.export.unflatten(program)
    except Exception:  # noqa: BLE001 - fall back to tapping the flat graph
        view = GraphTaps(program.module())
    twin = copy.copy(module)
    twin._modules = dict(module._modules)
    twin._modules["program"] = view
    twin.exported_program = None          # the view is hookable as it is (and a randomised copy stays so)
    return twin


def needs_view(module) -> bool:
    """Whether ``module``'s layers cannot be reached by Python hooks as they are."""
    return (isinstance(module, torch.jit.ScriptModule)
            or isinstance(getattr(module, "exported_program", None), torch.export.ExportedProgram)
            or _flat_graph(module))


_VIEWS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # classifier -> (its module, the view)


def hookable(clf, x: torch.Tensor):
    """``clf`` itself when its layers can be hooked; else a copy of it whose module is a hookable view
    (see the module doc), built once per classifier and module (remembered beside it, not in it, so a
    classifier still pickles and copies as before). ``x``: an input batch (the TorchScript conversion
    needs an example)."""
    module = clf.module
    if not needs_view(module):
        return clf
    cached = _VIEWS.get(clf)
    if cached is not None and cached[0] is module:
        return cached[1]
    if isinstance(module, torch.jit.ScriptModule):
        view = _from_torchscript(clf, x)
    elif isinstance(getattr(module, "exported_program", None), torch.export.ExportedProgram):
        view = _from_export(module)
    else:
        view = GraphTaps(module)
    twin = copy.copy(clf)
    twin.module = view.to(clf.device)
    _VIEWS[clf] = (module, twin)
    return twin
