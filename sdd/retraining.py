"""Retraining modes: how a pruning level is retrained after its weights were removed.

Each mode says which recipe retrains a level and which weights the level starts from (the masks
are applied to them afterwards): `finetune` keeps the pruned weights and trains at a constant
small lr (a tenth of the dense schedule's final lr), `lr_rewind` keeps them and replays the dense
schedule, `weight_rewind` resets them to the dense run's weights at a saved step (step 0: the
lottery ticket), `reinit` draws fresh ones from a seed no dense run uses.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sdd import names
from sdd.config import DENSE_SEED_LIMIT, OptimConfig, PruneConfig
from sdd.training import Recipe

State = dict[str, torch.Tensor]


def level_seed(chain_seed: int, level: int) -> int:
    """The seed of one level's scores and batch order: distinct per level and per chain seed."""
    return chain_seed * 100_003 + level


# Re-initialisation seeds live in [2^63, 2^64), dense seeds in [0, 2^32) (`sdd.config.DENSE_SEED_LIMIT`,
# checked when a dense config is validated): a reinit level can never redraw any dense run's init.
REINIT_SEED_BASE = 2 ** 63
if REINIT_SEED_BASE < DENSE_SEED_LIMIT:
    raise RuntimeError("reinit seeds must lie above every dense seed")


def reinit_seed(parent_seed: int, chain_seed: int, level: int) -> int:
    """The seed a `reinit` level draws its fresh weights from.

    A hash of (parent seed, chain seed, level) in its own domain, so chains of different seeds on one
    parent, or of one seed on different parents, draw different weights, and the same inputs always
    the same ones. (Deriving it from the chain seed and level alone let chain seed 0's level 1 redraw
    exactly the initialisation of a seed-1 parent.)
    """
    text = f"sdd.reinit/parent={parent_seed}/chain={chain_seed}/level={level}"
    digest = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
    return REINIT_SEED_BASE + digest % REINIT_SEED_BASE


# He et al. finetune at a tenth of the learning rate the dense schedule ends at: a small constant lr
# that refines the pruned weights. (At the final lr itself, a constant-schedule parent's finetune would
# be lr_rewind under another name.)
FINETUNE_LR_FACTOR = 0.1


def _finetune_recipe(dense: OptimConfig, cfg: PruneConfig, augment: bool) -> Recipe:
    final_lr = Recipe.from_optim(dense).final_lr()
    return Recipe.from_optim(dense, augment=augment, epochs=cfg.epochs, lr=cfg.lr or final_lr * FINETUNE_LR_FACTOR,
                             schedule="constant")


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


def same_retraining(dense: OptimConfig, cfg: PruneConfig, augment: bool) -> str | None:
    """The other mode that would retrain this chain exactly as its own mode does, if any.

    `finetune` and `lr_rewind` both keep the pruned weights, so they coincide when their recipes do:
    an explicit `--lr` on a parent with a constant schedule makes them one and the same.
    """
    other = {"finetune": "lr_rewind", "lr_rewind": "finetune"}.get(cfg.retrain)
    if other is None:
        return None
    same = MODES[other].recipe(dense, cfg, augment) == MODES[cfg.retrain].recipe(dense, cfg, augment)
    return other if same else None
