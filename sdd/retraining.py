"""Retraining modes: how a pruning level is retrained after its weights were removed.

Each mode says which recipe retrains a level and which weights the level starts from (the masks
are applied to them afterwards): `finetune` keeps the pruned weights and trains at a constant
small lr, `lr_rewind` keeps them and replays the dense schedule, `weight_rewind` resets them to
the dense run's weights at a saved step (step 0: the lottery ticket), `reinit` draws fresh ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sdd import names
from sdd.config import OptimConfig, PruneConfig
from sdd.training import Recipe

State = dict[str, torch.Tensor]


def level_seed(chain_seed: int, level: int) -> int:
    """The seed of one level's randomness (scores, batch order, re-initialisation): distinct per
    level and per chain seed."""
    return chain_seed * 100_003 + level


def _finetune_recipe(dense: OptimConfig, cfg: PruneConfig, augment: bool) -> Recipe:
    final_lr = Recipe.from_optim(dense).final_lr()
    return Recipe.from_optim(dense, augment=augment, epochs=cfg.epochs, lr=cfg.lr or final_lr, schedule="constant")


def _dense_schedule(dense: OptimConfig, cfg: PruneConfig, augment: bool) -> Recipe:
    return Recipe.from_optim(dense, augment=augment, epochs=cfg.epochs, lr=cfg.lr)


@dataclass(frozen=True)
class Mode:
    # recipe(dense run's optimiser config, chain config, augment) -> the recipe of every level
    recipe: Callable[[OptimConfig, PruneConfig, bool], Recipe]
    # start(rewind weights, fresh model's weights) -> weights to load before retraining, None: keep
    start: Callable[[State | None, Callable[[], State]], State | None]
    needs_rewind_weights: bool = False


MODES: dict[str, Mode] = {
    "finetune": Mode(_finetune_recipe, lambda rewind, fresh: None),
    "lr_rewind": Mode(_dense_schedule, lambda rewind, fresh: None),
    "weight_rewind": Mode(_dense_schedule, lambda rewind, fresh: rewind, needs_rewind_weights=True),
    "reinit": Mode(_dense_schedule, lambda rewind, fresh: fresh()),
}
names.check_registry("retraining mode", names.RETRAIN_MODES, MODES)
