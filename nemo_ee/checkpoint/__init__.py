"""Checkpoint I/O: safe loading of Lightning checkpoints (and, later, format adapters)."""
