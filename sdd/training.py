"""The training loop: data resident on the device, masks re-applied after every optimizer step.

The loop knows nothing about MLflow, pruning criteria or evaluation: everything else hooks in
through the `on_step` / `on_epoch` callbacks, so dense training, every retraining mode and the
benchmark run the same code.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sdd.augment import random_crop_flip
from sdd.config import OptimConfig
from sdd.pruning import apply_masks

log = logging.getLogger(__name__)

# loss_fn(logits, targets, inputs, batch_index); batch_index is None for a full batch.
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def cross_entropy(logits: torch.Tensor, y: torch.Tensor, _x: torch.Tensor, _idx: torch.Tensor | None) -> torch.Tensor:
    return F.cross_entropy(logits, y)


def make_optimizer(params, optim: OptimConfig, lr: float) -> torch.optim.Optimizer:
    if optim.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
    if optim.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=optim.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=optim.weight_decay)


def lr_factor(schedule: str, epoch: int, epochs: int, milestones: tuple[int, ...], gamma: float) -> float:
    """Multiplier of the base lr during `epoch` (0-based)."""
    if schedule == "multistep":
        return gamma ** sum(epoch >= m for m in milestones)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    return 1.0


@dataclass(frozen=True)
class Recipe:
    """How one training phase runs; built from an OptimConfig plus per-phase overrides."""

    optim: OptimConfig
    epochs: int
    lr: float
    schedule: str
    augment: bool = False

    @classmethod
    def from_optim(cls, optim: OptimConfig, *, augment: bool = False, epochs: int | None = None,
                   lr: float | None = None, schedule: str | None = None) -> Recipe:
        return cls(optim=optim, epochs=epochs or optim.epochs, lr=lr or optim.lr,
                   schedule=schedule or optim.schedule, augment=augment)

    def milestones(self) -> tuple[int, ...]:
        # A schedule written for the dense run's length is stretched to a retraining phase's length.
        if self.epochs == self.optim.epochs:
            return self.optim.milestones
        return tuple(round(m * self.epochs / self.optim.epochs) for m in self.optim.milestones)

    def final_lr(self) -> float:
        return self.lr * lr_factor(self.schedule, self.epochs - 1, self.epochs, self.milestones(), self.optim.gamma)


@dataclass(frozen=True)
class FitResult:
    steps: int  # optimizer steps taken in all (a continued run counts those before its resume)
    epoch_losses: list[float]  # mean training loss of each epoch 1..epochs, weighted by batch size


# The convergence rule of a training phase (a dense run, a pruning level). SDD curves are only
# meaningful at convergence: an under-trained level loses its noisy-label fit from lack of epochs,
# not from pruning, and fakes a sweet phase (measured here: 300 epochs per level after 2,000 dense
# ones). A loss that still changes by 1% or more across the last tenth of training would keep
# changing with more epochs; within 1% it has plateaued on the scale of the phase. A model that
# fits the labels it is trained on (train_acc >= 0.999, noise included) has converged whatever its
# loss does: cross-entropy keeps falling slowly once the data is interpolated, only sharpening
# confidence. Epoch losses are means over the epoch's batches, and the window's two ends are means
# over a quarter of the window, so minibatch noise is not read as change.
CONVERGENCE_WINDOW = 0.1
CONVERGENCE_TOLERANCE = 0.01
INTERPOLATED_ACC = 0.999


def converged(epoch_losses: Sequence[float], train_acc: float | None) -> bool:
    """Whether a training phase converged: its (smoothed) loss changed by less than 1% relative over
    the last 10% of its epochs, or it fits its training labels (`train_acc` >= 0.999)."""
    if train_acc is not None and train_acc >= INTERPOLATED_ACC:
        return True
    n = len(epoch_losses)
    if n < 2:
        return False
    window = min(n, max(2, math.ceil(CONVERGENCE_WINDOW * n)))
    ends = max(1, window // 4)
    start = sum(epoch_losses[n - window:n - window + ends]) / ends
    end = sum(epoch_losses[n - ends:]) / ends
    if start <= 0:
        return end <= 0
    return abs(start - end) / start < CONVERGENCE_TOLERANCE


def restore_generator(generator: torch.Generator | None, resume: Mapping[str, Any]) -> None:
    """Continue the batch order and augmentation draws of a resume state in `generator`."""
    if generator is None or resume.get("generator") is None:
        return
    try:
        generator.set_state(resume["generator"])
    except RuntimeError:  # saved on another device type: the batch order cannot be continued exactly
        log.warning("resume checkpoint from another device: batch order and augmentation continue "
                    "from a fresh random state")


def fit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    recipe: Recipe,
    *,
    masks: Mapping[str, torch.Tensor] | None = None,
    weights: Mapping[str, nn.Parameter] | None = None,
    loss_fn: LossFn = cross_entropy,
    generator: torch.Generator | None = None,
    on_step: Callable[[int], None] | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
    autocast: bool | None = None,
    resume: Mapping[str, Any] | None = None,
    snapshot: Callable[[dict[str, Any]], None] | None = None,
    snapshot_every: float = 0.0,
    snapshot_epochs: int = 0,
    pad_fill: torch.Tensor | None = None,
) -> FitResult:
    """Train `model` on (x, y) for `recipe.epochs` epochs with a fresh optimizer; returns the steps taken
    and every epoch's mean loss (the input of `converged`).

    `masks` (float, same device as the weights) are multiplied into `weights` after every step, so
    pruned weights stay exactly zero whatever the optimizer's momentum or weight decay does.
    `on_step(step)` runs after each step, `on_epoch(epoch, last_loss)` after each epoch (1-based).
    `autocast` (bf16 forward passes) defaults to on for CUDA; `sdd bench` turns it off to measure its gain.
    With `recipe.augment`, pad-crop pads with `pad_fill` (per channel: where black lands in `x`, i.e.
    `Splits.black`; None pads with 0, right only for data whose black is 0).
    Every `snapshot_every` seconds (at an epoch's end), and after every `snapshot_epochs` epochs,
    `snapshot(state)` receives the model, optimizer and RNG state; `fit(..., resume=state)` continues from such a state exactly where it left off.
    """
    device = x.device
    optimizer = make_optimizer(model.parameters(), recipe.optim, recipe.lr)
    milestones = recipe.milestones()
    batch = recipe.optim.batch_size or len(x)
    use_autocast = device.type == "cuda" if autocast is None else autocast
    n = len(x)
    step = first_epoch = 0
    epoch_losses: list[float] = []
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        first_epoch, step = int(resume["epoch"]), int(resume["step"])
        # A state saved before epoch losses were recorded continues with the epochs from here only.
        epoch_losses = [float(v) for v in resume.get("epoch_losses", [])]
        restore_generator(generator, resume)
    last_snapshot = time.monotonic()
    model.train()
    for epoch in range(first_epoch, recipe.epochs):
        factor = lr_factor(recipe.schedule, epoch, recipe.epochs, milestones, recipe.optim.gamma)
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr * factor
        order = None if batch >= n else torch.randperm(n, device=device, generator=generator)
        total = torch.zeros((), device=device)  # summed on the device: no host sync per step
        for i in range(0, n, batch):
            idx = None if order is None else order[i:i + batch]
            xb = x if idx is None else x[idx]
            yb = y if idx is None else y[idx]
            if recipe.augment:
                xb = random_crop_flip(xb, fill=pad_fill, generator=generator)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
                logits = model(xb)
            loss = loss_fn(logits.float(), yb, xb, idx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach() * len(yb)
            if masks is not None:
                apply_masks(weights, masks)
            step += 1
            if on_step is not None:
                on_step(step)
        last = loss.item()
        if not math.isfinite(last):
            raise TrainingDiverged(f"loss became {last} at epoch {epoch + 1}")
        epoch_losses.append(total.item() / n)
        if on_epoch is not None:
            on_epoch(epoch + 1, last)
        due = (snapshot_every > 0 and time.monotonic() - last_snapshot >= snapshot_every) or \
            (snapshot_epochs > 0 and (epoch + 1) % snapshot_epochs == 0)
        if snapshot is not None and due and epoch + 1 < recipe.epochs:
            snapshot({"epoch": epoch + 1, "step": step, "model": model.state_dict(),
                      "optimizer": optimizer.state_dict(), "epoch_losses": list(epoch_losses),
                      "generator": generator.get_state() if generator is not None else None})
            last_snapshot = time.monotonic()
    return FitResult(step, epoch_losses)
