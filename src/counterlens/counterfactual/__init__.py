"""Counterfactuals: the smallest data-space edit that changes the model's decision.

``counterfactual(clf, x, target="other", ...)`` searches them (batched, constrained, optionally
guided by an autoencoder prior); ``fit_prior`` / ``class_prototypes`` build that prior; the
analysis functions say what changed where.
"""
from .analysis import activation_changes, attribute_difference, difference_map
from .prior import AutoencoderPrior, class_prototypes, fit_prior
from .result import CounterfactualResult
from .search import counterfactual

__all__ = ["AutoencoderPrior", "CounterfactualResult", "activation_changes", "attribute_difference",
           "class_prototypes", "counterfactual", "difference_map", "fit_prior"]
