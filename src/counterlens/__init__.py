"""counterlens: explain what a PyTorch classifier bases its decisions on.

``counterlens.explain`` (attribution maps) and ``counterlens.counterfactual`` (the smallest edit
that changes the decision; the subpackage is callable) are the two entry points.
"""
from . import counterfactual
from .attribution import explain
from .counterfactual import CounterfactualResult, recourse_fairness, tabular_counterfactual
from .data.tabular import TabularSchema
from .errors import CounterlensError
from .metrics.evaluate import evaluate
from .metrics.shortcut import audit
from .runs.store import open_run
from .runs.worker import explain_cases, load_classifier, pack_model
from .model import Classifier, Normalize, RepeatChannels

__version__ = "0.1.0"
__all__ = ["audit", "Classifier", "CounterfactualResult", "CounterlensError", "Normalize", "RepeatChannels", "TabularSchema", "counterfactual",
           "evaluate", "explain", "explain_cases", "load_classifier", "open_run", "pack_model", "plot_attributions",
           "recourse_fairness", "tabular_counterfactual", "__version__"]


def __getattr__(name: str):
    """``counterlens.plot_attributions`` (:func:`counterlens.viz.plots.plot_attributions`), imported
    when first used, so ``import counterlens`` does not import matplotlib."""
    if name == "plot_attributions":
        from .viz.plots import plot_attributions
        return plot_attributions
    raise AttributeError(f"module 'counterlens' has no attribute {name!r}")
