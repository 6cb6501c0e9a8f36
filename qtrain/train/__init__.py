"""The trainer: setup, loop, metrics."""
