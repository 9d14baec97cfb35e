"""A learning problem: the noisy dataset resident on the device, and the model built for it."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from sdd import data as datasets
from sdd import models
from sdd.config import DataConfig, ModelConfig
from sdd.errors import UsageError
from sdd.noise import apply_label_noise

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda requested but no CUDA device is available; use auto or cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class Problem:
    """`splits.y_train` holds the labels trained on (noisy); `clean_y_train` the original ones."""

    splits: datasets.Splits
    clean_y_train: torch.Tensor
    noisy_idx: torch.Tensor
    noisy_mask: torch.Tensor
    device: torch.device
    noise_seed: int | None = None  # the effective seed of the label noise; None: no noise was drawn
    # Validation samples whose label `--val-noise` corrupted (empty by default: clean validation labels).
    val_noisy_idx: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))

    @property
    def wrong_label_rate(self) -> float:
        return len(self.noisy_idx) / max(1, len(self.clean_y_train))


def load_problem(cfg: DataConfig, device: torch.device, *, run_seed: int) -> Problem:
    """Load the dataset, corrupt the training labels once from the noise seed, move it to `device`.

    `run_seed` is the run's `seed`: the noise follows it unless `cfg.noise_seed` is given. With
    `cfg.val_noise` the validation labels are corrupted too, by the same definition and rate but from
    their own stream, so the training labels do not depend on it.
    """
    splits = datasets.load_dataset(cfg.dataset, data_dir=cfg.data_dir, train_size=cfg.train_size,
                                   test_size=cfg.test_size, val_size=cfg.val_size, val_seed=cfg.val_seed,
                                   data_seed=cfg.data_seed)
    noise_seed = cfg.effective_noise_seed(run_seed)
    noisy_y, noisy_idx = apply_label_noise(splits.y_train, cfg.noise, cfg.noise_kind, splits.num_classes,
                                           noise_seed)
    val_noisy_idx = torch.empty(0, dtype=torch.int64)
    if cfg.val_noise:
        noisy_val, val_noisy_idx = apply_label_noise(splits.y_val, cfg.noise, cfg.noise_kind, splits.num_classes,
                                                     datasets.stream_seed(noise_seed, "val-noise"))
        splits = replace(splits, y_val=noisy_val)
    clean = splits.y_train
    mask = torch.zeros(len(clean), dtype=torch.bool)
    mask[noisy_idx] = True
    splits = replace(splits, y_train=noisy_y).to(device)
    log.info("%s: %d train (%.1f%% wrong labels, noise seed %d), %d val (%d wrong), %d test on %s", cfg.dataset,
             len(clean), 100 * len(noisy_idx) / max(1, len(clean)), noise_seed, len(splits.y_val),
             len(val_noisy_idx), len(splits.y_test), device)
    return Problem(splits, clean.to(device), noisy_idx, mask.to(device), device, noise_seed, val_noisy_idx)


def build_model(cfg: ModelConfig, problem: Problem, seed: int) -> nn.Module:
    """The model, initialised from `seed` alone (independent of anything drawn before)."""
    torch.manual_seed(seed)
    model = models.build_model(cfg.model, width=cfg.width, depth=cfg.depth,
                               input_shape=problem.splits.input_shape,
                               num_classes=problem.splits.num_classes, maxpool=cfg.maxpool, init=cfg.init)
    model = model.to(problem.device)
    # Image models train channels_last on a GPU, where it pairs with bf16 autocast. Not on the CPU: there
    # `sdd bench` measured cnn5 and resnet18 (width 8) 1.4-1.5x faster with it, but torch 2.14.1's oneDNN
    # backward of a resnet18 of width 2 or 4 in channels_last aborts the process ("double free or
    # corruption") on this project's 2-core machines.
    if len(problem.splits.input_shape) == 3 and problem.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model
