"""Flax Linen entrance: ``module.init`` calls traced into records the core plans from."""
