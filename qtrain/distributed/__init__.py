"""qtrain.distributed."""
