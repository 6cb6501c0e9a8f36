"""qtrain.models."""
