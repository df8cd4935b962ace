"""Training loop, checkpoints, distributed helpers, logging and evaluation monitors."""
