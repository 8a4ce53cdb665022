"""Training loop and its I/O: data, tokenizers, checkpoints, metrics."""
