"""Seed packs: several seeds of one config trained at once as one batched model.

The members' parameters are stacked along a new leading dimension (`torch.func.stack_module_state`)
and every member's `nn.Parameter` becomes a view into its slice, so the stacked tensors are the
only copy: the optimizer steps them, masks multiply into them, and each member module (its state_dict,
its evaluation, its pruning) always sees its own current weights. The forward pass is one
`torch.func.vmap` of `functional_call` over the members.

A pack reproduces its members' separate trainings (`sdd.training.fit`), seed for seed: each member
keeps its own batch order and augmentation draws (its own generator, consumed in the same order), its
own labels (its own noise draw), its own loss function, and an optimizer state that is the per-member
slice of the pack's. Adam, AdamW and SGD are elementwise, so stepping the stacked tensors is stepping
each member; the gradients differ from the separate runs only by floating-point summation order.
A member's resume state has the layout of `fit`'s, so a packed run can be continued alone and the
other way round.

Whether a pack pays is measured, not assumed: `pack_pays` is the rule `sdd bench` checks.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from sdd.augment import random_crop_flip
from sdd.config import ModelConfig, OptimConfig
from sdd.names import PACKABLE_MODELS
from sdd.training import (FitResult, LossFn, Recipe, TrainingDiverged, cross_entropy, lr_factor, make_optimizer,
                          restore_generator)


Masks = Mapping[str, torch.Tensor]

# PACKABLE_MODELS (sdd.names): forward passes that vmap cleanly (no data-dependent control flow). BatchNorm's
# running statistics are stacked buffers, updated in place per member inside the vmap.

# The measured rule (`sdd bench` item 7, seed packs vs separate trainings; README "Performance"). On a CPU a
# pack only pays where the separate trainings are dominated by per-step overhead: minibatches of a tiny
# fully connected or 1-D convolutional model, where the pack does the work of K Python steps in one (on
# this project's 2-core machines, K = 5 at batch 100-128: mlp widths 8-32 2.0-2.4x, cnn1d width 8-16
# 1.7-2.2x). Once the model's own arithmetic dominates the step, the pack's batched matmuls are no
# faster than K plain ones (K = 3: mlp width 256, 13k parameters, 0.9x; LeNet-300-100 0.94x; cnn1d
# width 64, 28k parameters, 1.08x); a full-batch step is one large GEMM per layer already, and a vmapped
# Conv2d becomes a grouped convolution the CPU runs slower than K plain ones (cnn5 width 8: 0.8x). On a
# GPU a small model leaves the device idle (each step is a few kernel launches), so a pack is taken for any
# packable model up to GPU_PACK_MAX_PARAMS. That branch is not measured yet: no GPU was at hand when the
# rule was set; `sdd bench` on CUDA measures it (item 7, packs of 16 against 16 separate).
#
# A pack is worth choosing only for a clear gain: it turns K trials into one, so on a machine with more
# cores than packs it gives up parallelism, and gains within ~20% flip sign with the machine's load
# (full-batch MLPs measured 0.75-1.18x from run to run). The benchmark counts auto's choice right when it
# packs exactly the cases measured at least this much faster.
WORTHWHILE_GAIN = 1.2
CPU_PACKABLE_MODELS = ("mlp", "cnn1d")
CPU_PACK_MAX_PARAMS = 10_000
GPU_PACK_MAX_PARAMS = 2_000_000


def pack_pays(model: ModelConfig, optim: OptimConfig, num_params: int, train_size: int, device: torch.device) -> bool:
    """Whether training several seeds of this config as one pack is faster than one after another."""
    if not pack_may_pay(model, optim, device):
        return False
    if device.type == "cuda":
        return num_params <= GPU_PACK_MAX_PARAMS
    return optim.batch_size < train_size and num_params <= CPU_PACK_MAX_PARAMS


def pack_may_pay(model: ModelConfig, optim: OptimConfig, device: torch.device) -> bool:
    """The part of `pack_pays` that needs neither the data nor the model's size (a planner asks it first)."""
    if device.type == "cuda":
        return model.model in PACKABLE_MODELS
    return model.model in CPU_PACKABLE_MODELS and bool(optim.batch_size)


class Pack:
    """K modules of one architecture whose parameters and buffers live in stacked tensors."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        if len(members) < 2:
            raise ValueError("a pack needs at least two members")
        self.members = list(members)
        params, buffers = stack_module_state(self.members)
        trainable = dict(self.members[0].named_parameters())
        # A frozen parameter stays frozen, as `fit` leaves it (no gradient, so no optimizer step).
        self.params = {name: tensor.detach().requires_grad_(trainable[name].requires_grad)
                       for name, tensor in params.items()}
        self.buffers = {name: tensor.detach() for name, tensor in buffers.items()}
        for k, member in enumerate(self.members):
            for name, tensor in member.named_parameters():
                tensor.data = self.params[name].data[k]
            for name, tensor in member.named_buffers():
                tensor.data = self.buffers[name][k]
        # The structure only: functional_call swaps in the stacked tensors' slices.
        self.template = copy.deepcopy(self.members[0]).to("meta")

        def forward(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            return functional_call(self.template, (params, buffers), (x,))

        self._forward = forward

    def __len__(self) -> int:
        return len(self.members)

    def forward(self, x: torch.Tensor, *, shared: bool) -> torch.Tensor:
        """Logits (K, B, classes): of the same batch x (B, ...) for every member if `shared`, else of
        each member's own batch x[k] (x of shape (K, B, ...))."""
        return vmap(self._forward, in_dims=(0, 0, None if shared else 0), randomness="error")(
            self.params, self.buffers, x)

    def train(self, mode: bool = True) -> None:
        self.template.train(mode)
        for member in self.members:
            member.train(mode)

    def release(self) -> None:
        """Give every member storage of its own again (the pack is not used after this)."""
        with torch.no_grad():
            for member in self.members:
                for tensor in [*member.parameters(), *member.buffers()]:
                    tensor.data = tensor.data.clone()

    def member_optimizer_state(self, optimizer: torch.optim.Optimizer, k: int) -> dict[str, Any]:
        """Member k's slice of the pack's optimizer state, laid out as `fit`'s optimizer would save it
        (its parameters numbered in `member.parameters()` order, as `stack_module_state` stacks them)."""
        saved = optimizer.state_dict()
        state = {}
        for index, entry in saved["state"].items():
            state[index] = {key: value[k].clone() if torch.is_tensor(value) and value.dim() > 0 else
                            (value.clone() if torch.is_tensor(value) else value) for key, value in entry.items()}
        groups = [{**group, "params": list(group["params"])} for group in saved["param_groups"]]
        return {"state": state, "param_groups": groups}

    def load_member_optimizer_states(self, optimizer: torch.optim.Optimizer, states: Sequence[Mapping[str, Any]]) -> None:
        """Stack the members' optimizer states (`fit`'s layout) into the pack's optimizer."""
        first = states[0]
        merged: dict[int, dict[str, Any]] = {}
        for index, entry in first["state"].items():
            merged[index] = {}
            for key, value in entry.items():
                if torch.is_tensor(value) and value.dim() > 0:
                    merged[index][key] = torch.stack([s["state"][index][key] for s in states])
                else:
                    steps = {float(s["state"][index][key]) for s in states}
                    if len(steps) != 1:
                        raise ValueError(f"pack members were saved at different optimizer steps: {sorted(steps)}")
                    merged[index][key] = value
        optimizer.load_state_dict({"state": merged, "param_groups": first["param_groups"]})


def fit_pack(
    models: Sequence[nn.Module],
    x: torch.Tensor,
    ys: Sequence[torch.Tensor],
    recipe: Recipe,
    *,
    masks: Sequence[Masks | None] | None = None,
    loss_fns: Sequence[LossFn] | None = None,
    generators: Sequence[torch.Generator | None],
    on_steps: Sequence[Callable[[int], None] | None] | None = None,
    on_epochs: Sequence[Callable[[int, float], None] | None] | None = None,
    snapshots: Sequence[Callable[[dict[str, Any]], None] | None] | None = None,
    autocast: bool | None = None,
    resumes: Sequence[Mapping[str, Any] | None] | None = None,
    snapshot_every: float = 0.0,
    snapshot_epochs: int = 0,
    pad_fill: torch.Tensor | None = None,
) -> list[FitResult | TrainingDiverged]:
    """`sdd.training.fit` for K models of one architecture at once: model k trains on (x, ys[k]) with
    masks[k], loss_fns[k], generators[k] and its own callbacks (on_steps[k], on_epochs[k], snapshots[k],
    as `fit` takes them) exactly as `fit` would train it alone. `resumes` are `fit`-layout states of the
    members, all saved at the same epoch.

    Returns each member's FitResult, or the TrainingDiverged that `fit` would have raised for it: a
    member whose loss is no longer finite stops being reported (its slice trains on, apart from the
    others, and is discarded), and the others go on as they would alone.
    """
    k = len(models)
    if len(ys) != k or len(generators) != k:
        raise ValueError("one label tensor and one generator per member")
    masks = list(masks) if masks is not None else [None] * k
    loss_fns = list(loss_fns) if loss_fns is not None else [cross_entropy] * k
    on_steps = list(on_steps) if on_steps is not None else [None] * k
    on_epochs = list(on_epochs) if on_epochs is not None else [None] * k
    snapshots = list(snapshots) if snapshots is not None else [None] * k
    device = x.device
    if resumes is not None and any(r is not None for r in resumes):
        if any(r is None for r in resumes) or len({int(r["epoch"]) for r in resumes}) != 1:
            raise ValueError("pack members resume from different epochs: resume them separately")
        for model, state in zip(models, resumes):
            model.load_state_dict(state["model"])
    pack = Pack(models)
    try:
        return _train_pack(pack, x, torch.stack(list(ys)), recipe, _stack_masks(pack, models, masks), loss_fns,
                           generators, on_steps, on_epochs, snapshots, autocast, resumes, snapshot_every,
                           snapshot_epochs, pad_fill)
    finally:
        pack.release()


def _train_pack(pack: Pack, x: torch.Tensor, y: torch.Tensor, recipe: Recipe, stacked_masks: dict[str, torch.Tensor],
                loss_fns: list[LossFn], generators: Sequence[torch.Generator | None],
                on_steps: list[Callable[[int], None] | None], on_epochs: list[Callable[[int, float], None] | None],
                snapshots: list[Callable[[dict[str, Any]], None] | None], autocast: bool | None,
                resumes: Sequence[Mapping[str, Any] | None] | None, snapshot_every: float, snapshot_epochs: int,
                pad_fill: torch.Tensor | None) -> list[FitResult | TrainingDiverged]:
    models, k, device = pack.members, len(pack), x.device
    # Every parameter, frozen ones included, as `fit` passes them: the optimizer state is numbered alike.
    optimizer = make_optimizer(list(pack.params.values()), recipe.optim, recipe.lr)
    milestones = recipe.milestones()
    batch = recipe.optim.batch_size or len(x)
    use_autocast = device.type == "cuda" if autocast is None else autocast
    n = len(x)
    step = first_epoch = 0
    epoch_losses: list[list[float]] = [[] for _ in range(k)]
    if resumes is not None and resumes[0] is not None:
        pack.load_member_optimizer_states(optimizer, [r["optimizer"] for r in resumes])
        first_epoch, step = int(resumes[0]["epoch"]), int(resumes[0]["step"])
        for member, state in enumerate(resumes):
            epoch_losses[member] = [float(v) for v in state.get("epoch_losses", [])]
            restore_generator(generators[member], state)
    diverged: dict[int, TrainingDiverged] = {}
    plain_loss = all(fn is cross_entropy for fn in loss_fns)
    last_snapshot = time.monotonic()
    pack.train()
    for epoch in range(first_epoch, recipe.epochs):
        factor = lr_factor(recipe.schedule, epoch, recipe.epochs, milestones, recipe.optim.gamma)
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr * factor
        orders = None if batch >= n else torch.stack(
            [torch.randperm(n, device=device, generator=g) for g in generators])
        totals = torch.zeros(k, device=device)
        for i in range(0, n, batch):
            idx = None if orders is None else orders[:, i:i + batch]
            if idx is None:
                yb = y
                xb = x if not recipe.augment else torch.stack(
                    [random_crop_flip(x, fill=pad_fill, generator=g) for g in generators])
            else:
                yb = torch.gather(y, 1, idx)
                xb = torch.stack([random_crop_flip(x[idx[m]], fill=pad_fill, generator=generators[m])
                                  if recipe.augment else x[idx[m]] for m in range(k)])
            shared = idx is None and not recipe.augment
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
                logits = pack.forward(xb, shared=shared)
            logits = logits.float()
            if plain_loss:
                # Each member's mean over its batch, as F.cross_entropy computes it alone.
                per_member = nn.functional.cross_entropy(
                    logits.flatten(0, 1), yb.flatten(), reduction="none").view(k, -1).mean(1)
            else:
                per_member = torch.stack([loss_fns[m](logits[m], yb[m], xb if shared else xb[m],
                                                      None if idx is None else idx[m]) for m in range(k)])
            optimizer.zero_grad(set_to_none=True)
            # The members' slices are independent: a member whose loss is not finite spoils only its own.
            per_member.sum().backward()
            optimizer.step()
            totals += per_member.detach() * yb.shape[1]
            if stacked_masks:
                with torch.no_grad():
                    for name, mask in stacked_masks.items():
                        pack.params[name].mul_(mask)
            step += 1
            for m, callback in enumerate(on_steps):
                if callback is not None and m not in diverged:
                    callback(step)
        last = per_member.detach().tolist()
        for m, value in enumerate(last):
            if m not in diverged and not math.isfinite(value):
                diverged[m] = TrainingDiverged(f"loss became {value} at epoch {epoch + 1}")
        if len(diverged) == k:
            break
        for member, total in enumerate((totals / n).tolist()):
            epoch_losses[member].append(total)
        for m, callback in enumerate(on_epochs):
            if callback is not None and m not in diverged:
                callback(epoch + 1, last[m])
        due = (snapshot_every > 0 and time.monotonic() - last_snapshot >= snapshot_every) or \
            (snapshot_epochs > 0 and (epoch + 1) % snapshot_epochs == 0)
        if due and epoch + 1 < recipe.epochs:
            for m, callback in enumerate(snapshots):
                if callback is not None and m not in diverged:
                    # Copies: the member's tensors are views into the pack's, which torch.save would write whole.
                    callback({"epoch": epoch + 1, "step": step,
                              "model": {name: t.clone() for name, t in models[m].state_dict().items()},
                              "optimizer": pack.member_optimizer_state(optimizer, m),
                              "epoch_losses": list(epoch_losses[m]),
                              "generator": generators[m].get_state() if generators[m] is not None else None})
            last_snapshot = time.monotonic()
    return [diverged[m] if m in diverged else FitResult(step, epoch_losses[m]) for m in range(k)]


def _stack_masks(pack: Pack, models: Sequence[nn.Module], masks: Sequence[Masks | None]) -> dict[str, torch.Tensor]:
    """The members' masks (keyed by parameter name, as `models.prunable_weights` names them) stacked by
    name; a member without a mask for a weight keeps that weight whole."""
    keys = sorted({key for member_masks in masks for key in (member_masks or {})})
    unknown = [key for key in keys if key not in pack.params]
    if unknown:
        raise ValueError(f"mask {unknown[0]!r} names no parameter of the model")
    stacked = {}
    for key in keys:
        like = pack.params[key]
        stacked[key] = torch.stack([member_masks[key].to(like.device, like.dtype)
                                    if member_masks and key in member_masks
                                    else torch.ones(like.shape[1:], dtype=like.dtype, device=like.device)
                                    for member_masks in masks])
    return stacked
