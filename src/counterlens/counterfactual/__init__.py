"""Counterfactuals: the smallest data-space edit that changes the model's decision.

``counterlens.counterfactual(clf, x, target="other", ...)`` searches them: this package is itself
callable, so the one entry point serves images (batched, constrained, optionally guided by an
autoencoder prior; :func:`.search.counterfactual`) and tables (``schema=TabularSchema``; see
:mod:`.tabular`). ``fit_prior`` / ``class_prototypes`` build the prior; the analysis functions say
what changed where.
"""
import sys
import types

from .analysis import activation_changes, attribute_difference, difference_map
from .prior import AutoencoderPrior, class_prototypes, fit_prior
from .result import CounterfactualResult
from .search import counterfactual as image_counterfactual
from .tabular import recourse_fairness, tabular_counterfactual
from .tabular_result import TabularCounterfactualResult, recourse_by_group


def counterfactual(clf, x, target="other", *, schema=None, **params):
    """Counterfactuals of ``x`` for ``target``: images, or table rows when ``schema`` is given.

    Images: ``x [B, C, *S]`` in data space; ``params`` and the result as in
    :func:`counterlens.counterfactual.search.counterfactual` (a :class:`CounterfactualResult`).
    Tables: ``x`` a DataFrame (or array) of rows and ``schema`` a ``TabularSchema``; ``params`` as in
    :func:`counterlens.counterfactual.tabular.tabular_counterfactual` (``k`` counterfactuals per row).
    """
    if schema is not None:
        return tabular_counterfactual(clf, x, target, schema=schema, **params)
    return image_counterfactual(clf, x, target, **params)


class _CallableModule(types.ModuleType):
    """``counterlens.counterfactual(...)`` calls :func:`counterfactual`; the package stays a package
    (``import counterlens.counterfactual.prior`` keeps working)."""

    def __call__(self, *args, **kwargs):
        return counterfactual(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["AutoencoderPrior", "CounterfactualResult", "TabularCounterfactualResult", "activation_changes",
           "attribute_difference", "class_prototypes", "counterfactual", "difference_map", "fit_prior",
           "image_counterfactual", "recourse_by_group", "recourse_fairness", "tabular_counterfactual"]
