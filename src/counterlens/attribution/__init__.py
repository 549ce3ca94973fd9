"""Attribution methods: where a classifier looks.

Each method is importable by its snake_case name and has the call shape
``method(clf, x, target="predicted", **params) -> Tensor[B, *spatial]``.
"""
from .base import METHODS, Evaluator, MethodInfo, explain, get_method, resolve_targets
from .cam import find_target_layer, gradcam
from .gradients import integrated_gradients, saliency

__all__ = ["METHODS", "Evaluator", "MethodInfo", "explain", "find_target_layer", "get_method",
           "gradcam", "integrated_gradients", "resolve_targets", "saliency"]
