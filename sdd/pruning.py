"""Pruning masks: scoring criteria, mask selection and mask application (the level schedule is
`sdd.config.pruning_levels`, torch-free for the sweep planner).

Functions take the prunable weights as a mapping ``name -> parameter`` (weights of conv and linear
layers only, never biases or normalisation parameters) so they work with any model.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from sdd import names
from sdd.errors import UsageError

log = logging.getLogger(__name__)

Masks = dict[str, torch.Tensor]
"""Layer name -> mask of the weight's shape (bool: True keeps the weight; or float from
`as_float_masks`)."""


def full_masks(weights: dict[str, nn.Parameter]) -> Masks:
    """Masks that keep every weight."""
    return {name: torch.ones_like(w, dtype=torch.bool) for name, w in weights.items()}


def as_float_masks(masks: Masks, like: Mapping[str, torch.Tensor]) -> Masks:
    """Masks converted once to each weight's dtype, device and memory layout.

    `apply_masks` runs after every optimizer step; with masks already in the weight's dtype and
    strides the multiplication needs no temporary conversion.
    """
    out: Masks = {}
    for name, mask in masks.items():
        w = like[name]
        out[name] = torch.empty_like(w, requires_grad=False).copy_(mask)
    return out


def apply_masks(weights: dict[str, nn.Parameter], masks: Masks) -> None:
    """Zero the pruned weights in place (call after every optimizer step).

    Accepts bool masks or, cheaper, the float masks of `as_float_masks`. Multiplying after the step
    (rather than masking gradients) is what keeps pruned weights at zero whatever momentum, Adam
    moments or weight decay do to them.
    """
    with torch.no_grad():
        for name, mask in masks.items():
            weights[name].mul_(mask)


def magnitude_scores(weights: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """|w| for every prunable weight."""
    return {name: w.detach().abs() for name, w in weights.items()}


def random_scores(
    weights: dict[str, nn.Parameter], generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Uniform random scores drawn from `generator` (so a seeded generator gives the same mask)."""
    return {
        name: torch.rand(w.shape, generator=generator, device=generator.device).to(w.device)
        for name, w in weights.items()
    }


def gradient_scores(
    model: nn.Module,
    weights: dict[str, nn.Parameter],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> dict[str, torch.Tensor]:
    """SNIP-like saliency: the sum over batches of |w * dL/dw|.

    The passes run on a copy of `model`, in the mode the model is in (train mode: the loss as it is
    trained), so the model itself is untouched: its weights, gradients and BatchNorm running
    statistics stay as they were. `weights` must be parameters of `model`.
    """
    scratch = copy.deepcopy(model)
    param_names = {id(p): name for name, p in model.named_parameters()}
    scratch_params = dict(scratch.named_parameters())
    copies = {name: scratch_params[param_names[id(w)]] for name, w in weights.items()}
    for p in scratch.parameters():
        p.grad = None  # the copy carries the model's gradients, if any
    scores = {name: torch.zeros_like(w, requires_grad=False) for name, w in weights.items()}
    n_batches = 0
    # Callers may sit inside torch.no_grad() (e.g. an evaluation helper).
    with torch.enable_grad():
        for inputs, targets in batches:
            loss_fn(scratch(inputs), targets).backward()
            with torch.no_grad():
                for name, w in copies.items():
                    if w.grad is not None:
                        scores[name].add_((w * w.grad).abs_())
            scratch.zero_grad(set_to_none=True)
            n_batches += 1
    if n_batches == 0:
        raise UsageError("gradient scores need at least one batch of data")
    return scores


@dataclass(frozen=True)
class ScoringInputs:
    """What a criterion may score from. `batches()` draws training batches (from `generator`) only
    when called, so a criterion that needs no data leaves the random stream untouched."""

    model: nn.Module
    weights: dict[str, nn.Parameter]
    generator: torch.Generator
    batches: Callable[[], list[tuple[torch.Tensor, torch.Tensor]]]


# criterion name -> scores (higher is kept) of every prunable weight
CRITERIA: dict[str, Callable[[ScoringInputs], dict[str, torch.Tensor]]] = {
    "magnitude": lambda inputs: magnitude_scores(inputs.weights),
    "gradient": lambda inputs: gradient_scores(inputs.model, inputs.weights, inputs.batches(),
                                               torch.nn.functional.cross_entropy),
    "random": lambda inputs: random_scores(inputs.weights, inputs.generator),
}
names.check_registry("pruning criterion", names.CRITERIA, CRITERIA)


def _prune_flat(scores: torch.Tensor, mask: torch.Tensor, rate: float) -> torch.Tensor:
    """New flat mask without the round(rate * remaining) lowest-scored remaining entries."""
    remaining = mask.nonzero().squeeze(1)
    count = round(rate * remaining.numel())
    new = mask.clone()
    if count == 0:
        return new
    candidate_scores = scores[remaining]
    if torch.isnan(candidate_scores).any():
        raise ValueError("pruning scores contain NaN; the model or its loss has diverged")
    # A stable sort breaks ties by position (earlier layer, then earlier index), so exactly
    # `count` weights go and the same inputs always give the same mask.
    order = torch.sort(candidate_scores, stable=True).indices
    new[remaining[order[:count]]] = False
    return new


def prune_masks(
    scores: dict[str, torch.Tensor],
    masks: Masks,
    rate: float,
    scope: str,
    exclude: Collection[str] = (),
) -> Masks:
    """New masks without round(rate * remaining) of the remaining weights, lowest scores first.

    `global` ranks all layers against one another (the count is taken over the remaining weights of
    the layers not in `exclude`); `layerwise` removes `rate` of each layer's remaining weights.
    Layers in `exclude` keep their mask; already-pruned weights stay pruned whatever their score.
    """
    if scope not in names.SCOPES:
        raise UsageError(f"unknown pruning scope {scope!r}; choose one of {', '.join(names.SCOPES)}")
    if not 0.0 <= rate <= 1.0:
        raise UsageError(f"pruning rate must be in [0, 1], got {rate}")
    unknown = sorted(set(exclude) - set(masks))
    if unknown:
        raise UsageError(
            f"cannot exclude unknown layer(s) {', '.join(unknown)}; prunable layers: "
            f"{', '.join(masks)}"
        )
    for name, mask in masks.items():
        if name not in scores or scores[name].shape != mask.shape:
            got = tuple(scores[name].shape) if name in scores else "nothing"
            raise ValueError(f"scores for layer {name} are {got}, mask is {tuple(mask.shape)}")

    new_masks = {name: mask.to(torch.bool, copy=True) for name, mask in masks.items()}
    layers = [name for name in masks if name not in exclude]
    if not layers:
        return new_masks
    flat = {
        name: (
            scores[name].detach().reshape(-1).to(masks[name].device),
            masks[name].reshape(-1).bool(),
        )
        for name in layers
    }
    if scope == "layerwise":
        for name, (s, m) in flat.items():
            new_masks[name] = _prune_flat(s, m, rate).reshape(masks[name].shape)
    else:
        all_scores = torch.cat([s for s, _ in flat.values()])
        all_masks = torch.cat([m for _, m in flat.values()])
        pruned = _prune_flat(all_scores, all_masks, rate)
        for name, part in zip(layers, pruned.split([m.numel() for _, m in flat.values()])):
            new_masks[name] = part.reshape(masks[name].shape)
    before = sum(int(masks[n].sum()) for n in layers)
    after = sum(int(new_masks[n].sum()) for n in layers)
    log.debug("%s pruning removed %d of %d remaining weights", scope, before - after, before)
    return new_masks


def sparsity_report(weights: Mapping[str, torch.Tensor]) -> dict:
    """Zeros counted in the weights themselves (so it also catches weights a mask missed).

    Returns ``{"nonzero", "total", "sparsity", "per_layer": {name: sparsity}}``.
    """
    if not weights:
        raise UsageError("the model has no prunable (conv or linear) weights")
    nonzero = 0
    total = 0
    per_layer: dict[str, float] = {}
    for name, w in weights.items():
        nz = int(torch.count_nonzero(w.detach()))
        n = w.numel()
        per_layer[name] = 1.0 - nz / n if n else 0.0
        nonzero += nz
        total += n
    return {
        "nonzero": nonzero,
        "total": total,
        "sparsity": 1.0 - nonzero / total if total else 0.0,
        "per_layer": per_layer,
    }
