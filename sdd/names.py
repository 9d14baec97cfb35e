"""The names other parts rely on, importable without torch: registry keys and the chain's metrics.

`sdd.config` draws its choices from these tuples, so the command line answers bad input before
torch is imported; each implementing module checks at import that its registry holds exactly
these names (`check_registry`), so a name and its implementation cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Iterable

DATASETS = ("mnist1d", "cifar10", "cifar100", "tinyimagenet", "mnist5k")  # sdd.data.LOADERS
MODELS = ("mlp", "cnn1d", "cnn5", "resnet18", "vgg_like", "lenet", "preact_resnet18")  # sdd.models.MODELS
# Models whose seeds can train as one seed pack (sdd.packs): their forward passes vmap cleanly.
PACKABLE_MODELS = ("mlp", "cnn1d", "cnn5", "lenet")
INITS = ("default", "open_lth")  # sdd.models.INITS
NOISE_KINDS = ("symmetric", "random", "pairflip")  # sdd.noise.NOISE
CRITERIA = ("magnitude", "gradient", "random")  # sdd.pruning.CRITERIA
RETRAIN_MODES = ("finetune", "lr_rewind", "weight_rewind", "reinit")  # sdd.retraining.MODES
SCOPES = ("global", "layerwise")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "multistep", "cosine")
EARLY_STOPS = ("none", "entropy")
DEVICES = ("auto", "cpu", "cuda")

# Metrics of a pruning level that its chain logs at step = level (its SDD curve in the MLflow UI)
# and the analysis reads back. A new per-level metric is computed in `sdd.chain` and named here.
CHAIN_METRICS = ("train_acc", "train_loss", "train_acc_clean", "train_acc_noisy", "val_acc", "val_loss",
                 "test_acc", "test_loss", "entropy", "sparsity", "nonzero_params", "learning_distance",
                 "learning_distance_level", "pruned_train_acc", "pruned_val_acc", "pruned_test_acc",
                 "converged")  # 1.0 when the level's retraining converged (`sdd.training.converged`)


def check_registry(what: str, names: tuple[str, ...], registry: Iterable[str]) -> None:
    """Fail at import when a registry and its name tuple disagree."""
    if tuple(registry) != names:
        raise RuntimeError(f"the {what} registry {tuple(registry)} does not match sdd.names {names}")
