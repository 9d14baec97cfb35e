"""Label noise for the training split: the `symmetric`, `random` and `pairflip` definitions."""

from __future__ import annotations

import logging
import numbers
from collections.abc import Callable

import torch

from sdd import names
from sdd.errors import UsageError

logger = logging.getLogger(__name__)

NOISE_KINDS = names.NOISE_KINDS


def _validate(labels: torch.Tensor, rate: float, kind: str, num_classes: int) -> None:
    # bool is an Integral/Real subclass; reject it so `rate=True` is not read as 1.0.
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0.0 <= rate < 1.0:
        raise UsageError(f"label noise rate must be a number in [0, 1); got {rate!r}")
    if kind not in NOISE_KINDS:
        raise UsageError(f"unknown label noise kind {kind!r}; accepted: {', '.join(NOISE_KINDS)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 2:
        raise UsageError(f"num_classes must be an integer >= 2; got {num_classes!r}")
    if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise UsageError(
            f"labels must be a 1-D integer tensor; got dtype {labels.dtype} with shape {tuple(labels.shape)}"
        )
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise UsageError(
            f"labels must lie in [0, {num_classes}) for num_classes={num_classes}; "
            f"got values in [{int(labels.min())}, {int(labels.max())}]"
        )


def apply_label_noise(
    labels: torch.Tensor, rate: float, kind: str, num_classes: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (noisy_labels, noisy_idx): a new int64 label tensor and the sorted int64 indices whose label now differs from the clean label."""
    _validate(labels, rate, kind, num_classes)
    device = labels.device
    clean = labels.detach().to("cpu", torch.int64)
    noisy = clean.clone()
    n = clean.numel()
    count = round(rate * n)
    if count == 0:
        return noisy.to(device), torch.empty(0, dtype=torch.int64, device=device)

    # A private generator keeps the noise independent of whatever else consumed the global RNG.
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    chosen = torch.randperm(n, generator=gen)[:count]
    noisy[chosen] = NOISE[kind](clean[chosen], num_classes, gen)

    noisy_idx = torch.nonzero(noisy != clean).flatten()
    logger.debug(
        "label noise %s rate=%.4g: %d of %d labels wrong (realised rate %.4f)",
        kind, rate, noisy_idx.numel(), n, noisy_idx.numel() / n,
    )
    return noisy.to(device), noisy_idx.to(device)


def _symmetric(labels: torch.Tensor, num_classes: int, gen: torch.Generator) -> torch.Tensor:
    # An offset in 1..C-1 is uniform over the other classes and never maps a label to itself.
    return (labels + torch.randint(1, num_classes, labels.shape, generator=gen)) % num_classes


def _random(labels: torch.Tensor, num_classes: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, num_classes, labels.shape, generator=gen)


def _pairflip(labels: torch.Tensor, num_classes: int, gen: torch.Generator) -> torch.Tensor:
    return (labels + 1) % num_classes


# kind -> new labels for the chosen samples, drawn from the noise generator.
NOISE: dict[str, Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]] = {
    "symmetric": _symmetric, "random": _random, "pairflip": _pairflip}
names.check_registry("label-noise", NOISE_KINDS, NOISE)
