"""Training: the one loop (loop.py) and the helpers it calls for optimizers, precision and checkpoints."""
