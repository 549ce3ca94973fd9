"""Data loading (images, synthetic datasets)."""
