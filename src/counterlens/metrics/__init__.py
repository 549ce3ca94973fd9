"""Metrics that say whether to trust an explanation (and how good a counterfactual is)."""
from .complexity import completeness_error, entropy, sparseness
from .counterfactual import distances, diversity, im1, im2, nearest_training_distance, proximity, sparsity, validity
from .evaluate import METRICS, evaluate, per_class, per_correctness, per_method, summarize, summary_table
from .faithfulness import deletion, insertion, mufidelity
from .localization import mass_lift, pointing_game, relevance_mass, relevance_rank
from .sanity import model_randomisation, sanity_report
from .shortcut import audit, inpaint, random_regions
from . import tabular  # noqa: F401  (the module: its diversity is not the image one)

__all__ = ["METRICS", "audit", "completeness_error", "deletion", "distances", "diversity", "entropy", "evaluate",
           "im1", "im2", "inpaint", "insertion", "mass_lift", "model_randomisation", "mufidelity", "nearest_training_distance",
           "per_class", "per_correctness", "per_method", "pointing_game", "proximity", "random_regions", "relevance_mass",
           "relevance_rank", "sanity_report", "sparseness", "sparsity", "summarize", "summary_table", "validity"]
