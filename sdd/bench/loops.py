"""Items 1, 2 and 6 of `sdd bench`: the training loop, `sdd.training.fit` against the plain DataLoader loop
of `sdd.bench.baseline` doing the same work, dense, masked, and (item 6) with bf16 autocast and
channels_last on and off."""

from __future__ import annotations

import copy
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from sdd.bench.context import Context, random_images
from sdd.bench.measure import interleaved, median_ratio, sync
from sdd.bench.report import Figure

log = logging.getLogger(__name__)

SPARSITY = 0.9
IMAGE_BATCH = 128
MNIST_MINIBATCH = 128
# Nakkiran et al.'s recipe for ResNet-18 of width k (sweeps/cifar10_dd_resnet18.yaml).
IMAGE_OPTIM = {"optimizer": "adam", "lr": 1e-4}


# --- items 1 and 2: throughput and the cost of masking ------------------------------------------

@dataclass
class Workload:
    """One training job timed on both sides."""

    label: str
    problem: Any
    model: Any  # sdd.config.ModelConfig
    optim: Any  # sdd.config.OptimConfig; epochs = the project's epochs timed per repeat
    baseline_epochs: int
    augment: bool
    masked: bool  # also time it at 90% sparsity (item 2)
    repeats: int

    def samples(self, baseline: bool = False) -> int:
        return (self.baseline_epochs if baseline else self.optim.epochs) * len(self.problem.splits.x_train)

    def steps(self, baseline: bool = False) -> int:
        n = len(self.problem.splits.x_train)
        per_epoch = -(-n // (self.optim.batch_size or n))
        return (self.baseline_epochs if baseline else self.optim.epochs) * per_epoch

    def throughput(self, seconds: Sequence[float], baseline: bool = False) -> list[float]:
        return [self.samples(baseline) / t for t in seconds]

    def step_ms(self, seconds: Sequence[float], baseline: bool = False) -> float:
        return 1000 * statistics.median(seconds) / self.steps(baseline)


def _workloads(ctx: Context) -> list[Workload]:
    from sdd import config

    size, preset = ctx.size, ctx.preset
    full = replace(preset.optim, epochs=size.full_batch_epochs[0], batch_size=0)
    mini = replace(preset.optim, epochs=size.minibatch_epochs[0], batch_size=MNIST_MINIBATCH)
    mlp = f"MLP w{preset.model.width} MNIST-1D"
    out = [Workload(f"{mlp} full batch", ctx.problem, preset.model, full, size.full_batch_epochs[1], False, True,
                    size.mlp_repeats),
           Workload(f"{mlp} minibatch {MNIST_MINIBATCH}", ctx.problem, preset.model, mini, size.minibatch_epochs[1],
                    False, True, size.mlp_repeats)]
    images = random_images(size.images, ctx.device)
    optim = config.OptimConfig(**IMAGE_OPTIM, epochs=size.image_epochs[0], batch_size=IMAGE_BATCH)
    for i, (name, width) in enumerate(size.image_models):
        # The masking cost is shown on the first image model; a second one would double the section's time.
        out.append(Workload(f"{name} w{width} {size.images} random CIFAR-shaped images, crop+flip", images,
                            config.ModelConfig(model=name, width=width), optim, size.image_epochs[1], True, i == 0,
                            size.repeats))
    return out


def _init_model(w: Workload) -> Any:
    from sdd.problem import build_model

    return build_model(w.model, w.problem, seed=0)


def _masks(model: Any) -> dict[str, Any]:
    """Global magnitude masks removing SPARSITY of the model's prunable weights."""
    from sdd import models, pruning

    weights = models.prunable_weights(model)
    return pruning.prune_masks(pruning.magnitude_scores(weights), pruning.full_masks(weights), SPARSITY, "global")


def _project_runner(w: Workload, init: Any, masks: dict[str, Any] | None,
                    autocast: bool | None = None) -> Callable[[], float]:
    from sdd import models, pruning
    from sdd.training import Recipe, fit

    recipe = Recipe.from_optim(w.optim, augment=w.augment)
    x, y = w.problem.splits.x_train, w.problem.splits.y_train

    def run() -> float:
        model = copy.deepcopy(init)
        weights = models.prunable_weights(model)
        float_masks = None
        if masks is not None:
            float_masks = pruning.as_float_masks(masks, weights)
            pruning.apply_masks(weights, float_masks)
        sync(w.problem.device)
        started = time.perf_counter()
        fit(model, x, y, recipe, masks=float_masks, weights=weights if masks is not None else None,
            autocast=autocast)
        sync(w.problem.device)
        return time.perf_counter() - started

    return run


def _baseline_runner(w: Workload, init: Any, masks: dict[str, Any] | None, loader: Any, *,
                     autocast: bool = False, channels_last: bool = False) -> Callable[[], float]:
    import torch

    from sdd.bench import baseline
    from sdd.training import make_optimizer

    # The plain way keeps PyTorch's default layout whatever layout sdd builds its models in.
    layout = torch.channels_last if channels_last else torch.contiguous_format

    def run() -> float:
        model = copy.deepcopy(init).to(memory_format=layout)
        if masks is not None:
            baseline.prune_with_masks(model, masks)
        sync(w.problem.device)
        started = time.perf_counter()
        optimizer = make_optimizer(model.parameters(), w.optim, w.optim.lr)
        baseline.train(model, loader, optimizer, w.baseline_epochs, w.problem.device, autocast=autocast)
        sync(w.problem.device)
        return time.perf_counter() - started

    return run


def _warm_up(w: Workload, init: Any) -> None:
    """One step of each side on one batch: first calls pay one-off costs (torch._dynamo's import on the
    first optimizer, oneDNN kernel selection) that would otherwise land on whichever side runs first."""
    from sdd.bench import baseline

    batch = w.optim.batch_size or len(w.problem.splits.x_train)
    small = replace(w, problem=_head(w.problem, batch), optim=replace(w.optim, epochs=1), baseline_epochs=1)
    _project_runner(small, init, None)()
    x, y = small.problem.splits.x_train, small.problem.splits.y_train
    loader = baseline.make_loader(x, y, w.optim.batch_size, augment=w.augment, workers=0, device=w.problem.device)
    _baseline_runner(small, init, None, loader)()


def _head(problem: Any, n: int) -> Any:
    splits = replace(problem.splits, x_train=problem.splits.x_train[:n], y_train=problem.splits.y_train[:n])
    return replace(problem, splits=splits)


def throughput_and_masking(ctx: Context) -> list[Figure]:
    """Items 1 and 2: per workload, project and baseline dense, and (masked workloads) both at 90%."""
    from sdd.bench import baseline

    figures: list[Figure] = []
    masking: list[Figure] = []
    for w in _workloads(ctx):
        log.info("item 1%s: %s", " and 2" if w.masked else "", w.label)
        init = _init_model(w)
        x, y = w.problem.splits.x_train, w.problem.splits.y_train
        loader = baseline.make_loader(x, y, w.optim.batch_size, augment=w.augment, workers=ctx.workers,
                                      device=ctx.device)
        _warm_up(w, init)
        runners = [_project_runner(w, init, None), _baseline_runner(w, init, None, loader)]
        if w.masked:
            masks = _masks(init)
            runners += [_project_runner(w, init, masks), _baseline_runner(w, init, masks, loader)]
        times = interleaved(w.repeats, runners)
        project, base = w.throughput(times[0]), w.throughput(times[1], baseline=True)
        figures.append(Figure(
            1, w.label, "samples/s: sdd.fit / DataLoader loop", median_ratio(project, base),
            statistics.median(project), statistics.median(base), "samples/s",
            target=">= 1.5" if w.augment else ">= 1.0", repeats=w.repeats))
        if w.masked:
            # Same epochs on both sides of each ratio, so run times compare as step times.
            masking.append(Figure(
                2, w.label, f"step time at {SPARSITY:.0%} sparsity: masked / dense, sdd.fit",
                median_ratio(times[2], times[0]), w.step_ms(times[2]), w.step_ms(times[0]), "ms",
                target="<= 1.10", repeats=w.repeats))
            masking.append(Figure(
                2, w.label, f"step time at {SPARSITY:.0%} sparsity: torch prune / dense, DataLoader loop",
                median_ratio(times[3], times[1]), w.step_ms(times[3], baseline=True),
                w.step_ms(times[1], baseline=True), "ms", repeats=w.repeats))
    return figures + masking



# --- item 6: CUDA -------------------------------------------------------------------------------

def precision_and_layout(ctx: Context) -> list[Figure]:
    """Item 6: the image workloads with bf16 autocast + channels_last on (the project's default on CUDA)
    and off, on both sides, and the project's own gain from them."""
    import torch

    from sdd.bench import baseline

    figures = []
    for w in _workloads(ctx):
        if not w.augment:
            continue
        init = _init_model(w)
        plain = copy.deepcopy(init).to(memory_format=torch.contiguous_format)
        fast = copy.deepcopy(init).to(memory_format=torch.channels_last)
        x, y = w.problem.splits.x_train, w.problem.splits.y_train
        loader = baseline.make_loader(x, y, w.optim.batch_size, augment=True, workers=ctx.workers,
                                      device=ctx.device)
        _warm_up(w, init)
        log.info("item 6: %s with bf16 autocast + channels_last on and off", w.label)
        on, off, base_on, base_off = interleaved(w.repeats, [
            _project_runner(w, fast, None, autocast=True), _project_runner(w, plain, None, autocast=False),
            _baseline_runner(w, plain, None, loader, autocast=True, channels_last=True),
            _baseline_runner(w, plain, None, loader)])
        n = w.repeats
        on, off = w.throughput(on), w.throughput(off)
        base_on, base_off = w.throughput(base_on, baseline=True), w.throughput(base_off, baseline=True)
        figures += [
            Figure(6, w.label, "samples/s, bf16 + channels_last on: sdd.fit / DataLoader loop",
                   median_ratio(on, base_on), statistics.median(on), statistics.median(base_on), "samples/s",
                   repeats=n),
            Figure(6, w.label, "samples/s, bf16 + channels_last off: sdd.fit / DataLoader loop",
                   median_ratio(off, base_off), statistics.median(off), statistics.median(base_off), "samples/s",
                   repeats=n),
            Figure(6, w.label, "samples/s, sdd.fit: bf16 + channels_last on / off", median_ratio(on, off),
                   statistics.median(on), statistics.median(off), "samples/s", repeats=n),
        ]
    return figures
