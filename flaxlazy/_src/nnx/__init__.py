"""Flax NNX entrance: constructor calls traced into records the core plans from."""
