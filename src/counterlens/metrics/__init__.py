"""Metrics that say whether to trust an explanation."""
from .counterfactual import distances, diversity, im1, im2, nearest_training_distance, proximity, sparsity, validity

__all__ = ["distances", "diversity", "im1", "im2", "nearest_training_distance", "proximity", "sparsity", "validity"]
