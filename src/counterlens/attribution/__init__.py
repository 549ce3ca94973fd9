"""Attribution methods: where a classifier looks.

Each method is importable by its snake_case name and has the call shape
``method(clf, x, target="predicted", **params) -> Tensor[B, *spatial]``; ``METHODS`` lists them
with a one-line summary and their defaults (``counterlens methods`` prints it).
"""
from .base import METHODS, Evaluator, MethodInfo, explain, get_method, resolve_targets
from .cam import find_target_layer, gradcam, gradcam_plus_plus, guided_gradcam, layercam, scorecam
from .gradients import deconvnet, guided_backprop, input_x_gradient, integrated_gradients, saliency
from .noise import smoothgrad, squaregrad, vargrad
from .perturbation import occlusion, rise, rise_masks
from .relu_rules import relu_rule
from .surrogate import SurrogateFit, fit_surrogate, kernel_shap, lime, segment

__all__ = [
    "METHODS", "Evaluator", "MethodInfo", "explain", "get_method", "resolve_targets", "find_target_layer",
    "relu_rule",
    # gradients
    "saliency", "input_x_gradient", "guided_backprop", "deconvnet", "integrated_gradients",
    # noise tunnels
    "smoothgrad", "vargrad", "squaregrad",
    # class activation maps
    "gradcam", "gradcam_plus_plus", "layercam", "scorecam", "guided_gradcam",
    # perturbation and surrogates
    "occlusion", "rise", "lime", "kernel_shap", "rise_masks", "fit_surrogate", "SurrogateFit", "segment",
]
