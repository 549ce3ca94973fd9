"""Each case's layer activation change between its original and its counterfactual, for a run.

:func:`case_activation_changes` runs :func:`~counterlens.counterfactual.analysis.activation_changes`
once per batch (originals and counterfactuals through the model together, with forward hooks on
the layers of :func:`~counterlens.counterfactual.analysis.summary_layers`) and splits the result
into one record per case: that case's own numbers per layer, in execution order. Where the model's
layers cannot be observed (a TorchScript model takes no Python hooks; an exported or compiled one
runs its layers as one graph) every case records why instead: the counterfactuals are kept.
"""
from __future__ import annotations

import torch

from ..attribution.base import is_out_of_memory
from ..errors import CounterlensError
from .records import text_of

LAYER_LIMIT = 32        # layers recorded per case at most (evenly spaced over a bigger model's)
TOP_CHANNELS = 5        # channels listed per layer and case


def case_activation_changes(clf, x: torch.Tensor, x_cf: torch.Tensor, batch_size: int = 64) -> list[dict]:
    """One record per row of ``x`` / ``x_cf`` (``[B, C, *S]``, data space):
    ``{"layers": [{name, module, shape, relative_change, mean_abs_change, top_channels}, ...],
    "selection": which layers, "skipped": None}``, or ``{"layers": [], "selection": "",
    "skipped": why}`` for every row when the model's layers cannot be observed.

    ``relative_change`` is ``||a_cf - a|| / ||a||`` of the case's own layer output (inf when the
    original's is zero and the counterfactual's is not), ``mean_abs_change`` its mean ``|a_cf - a|``,
    ``top_channels`` ``[[channel, mean |change|], ...]`` (largest first; [] for a flat output)."""
    from ..counterfactual.analysis import activation_changes, summary_layers
    n = len(x)
    try:
        module = clf.module
        if not isinstance(module, torch.nn.Module):
            raise CounterlensError(f"the model is a {type(module).__name__}, not a torch nn.Module")
        names, selection = summary_layers(module, LAYER_LIMIT)
        changes = activation_changes(clf, x, x_cf, layers=names or None, top=TOP_CHANNELS, batch_size=batch_size,
                                     top_per_row=True)
    except (CounterlensError, RuntimeError, NotImplementedError) as exc:
        if isinstance(exc, RuntimeError) and is_out_of_memory(exc):
            raise
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return [_skipped(f"the layer activations cannot be observed on this model ({first}); a TorchScript model "
                         "takes no forward hooks: load the model as a model directory or state_dict to see them")] * n
    if not changes:
        return [_skipped("no layer of this model reported its output to a forward hook (an exported or compiled "
                         "model runs its layers as one graph): load the model as a model directory or state_dict "
                         "to see them")] * n
    return [{"layers": [{"name": c["name"], "module": c["module"], "shape": list(c["shape"]),
                         "relative_change": float(c["relative_change_per_row"][j]),
                         "mean_abs_change": float(c["mean_abs_change_per_row"][j]),
                         "top_channels": [[int(i), float(v)] for i, v in c["top_channels_per_row"][j]]}
                        for c in changes],
             "selection": selection, "skipped": None} for j in range(n)]


def _skipped(reason: str) -> dict:
    return {"layers": [], "selection": "", "skipped": text_of(reason)}
