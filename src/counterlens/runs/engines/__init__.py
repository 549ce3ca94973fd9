"""Engines that drive the pipeline stages over a dataset: local (threads + processes); more to come."""
