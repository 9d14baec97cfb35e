"""sdd: sparse double descent studies: width sweeps, pruning chains and distillation, tracked in MLflow."""

__version__ = "0.1.0"
