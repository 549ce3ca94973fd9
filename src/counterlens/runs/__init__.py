"""Run directories and dataset-scale runs."""
