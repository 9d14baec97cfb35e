"""Item 7 of `sdd bench`: seed packs (`sdd.packs.fit_pack`, K seeds as one vmapped model) against the same
K seeds trained one after another by `sdd.training.fit`: same initial weights, data, labels, recipe and
per-seed generators on both sides. Each case also says whether the auto rule (`sdd.packs.pack_pays`, what
`pack_seeds: auto` uses) packs it, and one figure counts the cases where that choice is right: packed exactly
where the pack is at least `sdd.packs.WORTHWHILE_GAIN` faster.
On CUDA: packs of 16 small models against 16 separate trainings."""

from __future__ import annotations

import copy
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from sdd.bench.context import Context, random_images
from sdd.bench.measure import interleaved, median_ratio, sync
from sdd.bench.report import Figure

log = logging.getLogger(__name__)

ITEM = 7
SEEDS = 5  # issue 15's probe; a study's dense stage trains >= 3 seeds per config (issues 10, 11)
CUDA_SEEDS = 16
BATCH = 128
AGREEMENT = "auto rule agrees with the measurement"
# Nakkiran et al.'s Adam recipe for the image CNNs, as items 1 and 2 use it (sdd.bench.loops).
IMAGE_OPTIM = {"optimizer": "adam", "lr": 1e-4}


@dataclass(frozen=True)
class PackSize:
    """Work per timed side and repeat, per bench size. Training subsets (the first n samples) keep the
    expensive cases to a few steps per seed; both sides always train on the same samples."""

    repeats: int
    full_batch_epochs: int  # MLP, full batch, on the preset's whole training split
    minibatch_epochs: int  # MLP, minibatch, on the preset's whole training split
    cnn1d_samples: tuple[int | None, int | None]  # (width 16, width 64), one epoch each; None: all
    images: int  # random CIFAR-shaped images for cnn5, one epoch
    cuda_epochs: int  # CUDA only: epochs of the 16-seed packs and their separate trainings


# Chosen by probes on the shared 2-core machine (1 torch thread): quick's section takes 19-38 s there
# (load average 2.5-7), tiny's ~2 s plus ~5 s for the CUDA cases run on the CPU by the tests.
PACK_SIZES: dict[str, PackSize] = {
    "full": PackSize(repeats=5, full_batch_epochs=40, minibatch_epochs=8,
                     cnn1d_samples=(None, 1024), images=384, cuda_epochs=5),
    "quick": PackSize(repeats=5, full_batch_epochs=12, minibatch_epochs=4,
                      cnn1d_samples=(None, 1024), images=256, cuda_epochs=2),
    "tiny": PackSize(repeats=1, full_batch_epochs=1, minibatch_epochs=1,
                     cnn1d_samples=(None, None), images=32, cuda_epochs=1),
}


@dataclass
class Case:
    """One config trained for `seeds` seeds, packed and separately."""

    label: str
    problem: Any  # sdd.problem.Problem; its training split is what both sides train on
    model: Any  # sdd.config.ModelConfig
    optim: Any  # sdd.config.OptimConfig, epochs = the epochs timed per side and repeat
    augment: bool
    seeds: int


def _head(problem: Any, n: int | None) -> Any:
    if n is None or n >= len(problem.splits.x_train):
        return problem
    splits = replace(problem.splits, x_train=problem.splits.x_train[:n], y_train=problem.splits.y_train[:n])
    return replace(problem, splits=splits)


def _cases(ctx: Context, sizes: PackSize) -> list[Case]:
    from sdd import config

    preset = ctx.preset
    mlp = f"MLP w{preset.model.width} depth {preset.model.depth} MNIST-1D"
    mini = replace(preset.optim, batch_size=BATCH)
    cases = [
        Case(f"{mlp} full batch", ctx.problem, preset.model,
             replace(preset.optim, batch_size=0, epochs=sizes.full_batch_epochs), False, SEEDS),
        Case(f"{mlp} minibatch {BATCH}", ctx.problem, preset.model,
             replace(mini, epochs=sizes.minibatch_epochs), False, SEEDS),
    ]
    for width, samples in zip((16, 64), sizes.cnn1d_samples):
        cases.append(Case(f"cnn1d w{width} MNIST-1D minibatch {BATCH}", _head(ctx.problem, samples),
                          config.ModelConfig(model="cnn1d", width=width), replace(mini, epochs=1), False, SEEDS))
    images = random_images(sizes.images, ctx.device)
    cases.append(Case(f"cnn5 w8 random CIFAR-shaped images, crop+flip, minibatch {BATCH}", images,
                      config.ModelConfig(model="cnn5", width=8),
                      config.OptimConfig(**IMAGE_OPTIM, batch_size=BATCH, epochs=1), True, SEEDS))
    return cases


def _cuda_cases(ctx: Context, sizes: PackSize) -> list[Case]:
    from sdd import config

    optim = replace(ctx.preset.optim, batch_size=BATCH, epochs=sizes.cuda_epochs)
    return [Case(f"CUDA: MLP w{ctx.preset.model.width} MNIST-1D minibatch {BATCH}", ctx.problem, ctx.preset.model,
                 optim, False, CUDA_SEEDS),
            Case(f"CUDA: cnn1d w16 MNIST-1D minibatch {BATCH}", ctx.problem,
                 config.ModelConfig(model="cnn1d", width=16), optim, False, CUDA_SEEDS)]


def _inits(case: Case) -> list[Any]:
    from sdd.problem import build_model

    return [build_model(case.model, case.problem, seed=s) for s in range(case.seeds)]


def _generators(case: Case) -> list[Any]:
    import torch

    return [torch.Generator(device=case.problem.device).manual_seed(s) for s in range(case.seeds)]


def _runner(case: Case, inits: list[Any], train: Callable[[list[Any], list[Any]], object]) -> Callable[[], float]:
    """One timed repeat: fresh copies of the initial models and generators, then `train(models, generators)`
    (stacking a pack's members is part of what it costs)."""
    def run() -> float:
        models = [copy.deepcopy(m) for m in inits]
        generators = _generators(case)
        sync(case.problem.device)
        started = time.perf_counter()
        train(models, generators)
        sync(case.problem.device)
        return time.perf_counter() - started

    return run


def _separate_runner(case: Case, inits: list[Any]) -> Callable[[], float]:
    from sdd.training import Recipe, fit

    recipe = Recipe.from_optim(case.optim, augment=case.augment)
    splits = case.problem.splits

    def train(models: list[Any], generators: list[Any]) -> None:
        for model, generator in zip(models, generators):
            fit(model, splits.x_train, splits.y_train, recipe, generator=generator, pad_fill=splits.black)

    return _runner(case, inits, train)


def _pack_runner(case: Case, inits: list[Any]) -> Callable[[], float]:
    from sdd.packs import fit_pack
    from sdd.training import Recipe

    recipe = Recipe.from_optim(case.optim, augment=case.augment)
    splits = case.problem.splits

    def train(models: list[Any], generators: list[Any]) -> None:
        fit_pack(models, splits.x_train, [splits.y_train] * case.seeds, recipe, generators=generators,
                 pad_fill=splits.black)

    return _runner(case, inits, train)


def _warm_up(case: Case, inits: list[Any]) -> None:
    """One epoch of one small batch on each side, two seeds: first calls pay one-off costs (vmap's and the
    optimizer's first use, kernel selection) that would otherwise land on whichever side runs first."""
    small = replace(case, problem=_head(case.problem, 8), optim=replace(case.optim, epochs=1), seeds=2)
    _separate_runner(small, inits[:2])()
    _pack_runner(small, inits[:2])()


def _auto(case: Case, init: Any) -> bool:
    from sdd import models
    from sdd.packs import pack_pays

    return pack_pays(case.model, case.optim, models.count_params(init), len(case.problem.splits.x_train),
                     case.problem.device)


def _measure(case: Case, inits: list[Any], repeats: int) -> tuple[list[float], list[float]]:
    """Wall times per repeat: (the seeds one after another, the seeds as one pack)."""
    _warm_up(case, inits)
    separate, packed = interleaved(repeats, [_separate_runner(case, inits), _pack_runner(case, inits)])
    return separate, packed


def _spread(separate: list[float], packed: list[float]) -> str:
    """The range of the per-repeat ratios: a case whose range straddles 1 is a tie within the noise."""
    ratios = [a / b for a, b in zip(separate, packed)]
    return f"per-repeat ratios {min(ratios):.2f}-{max(ratios):.2f}"


def _steps(case: Case) -> str:
    n = len(case.problem.splits.x_train)
    per_epoch = -(-n // (case.optim.batch_size or n))
    return f"{case.optim.epochs} epoch(s) of {n} samples, {case.optim.epochs * per_epoch} steps per seed"


def verdict(auto: bool, ratio: float) -> tuple[bool, str]:
    """Whether the auto rule chose right for a case measured at `ratio` (separate / pack wall time): pack
    exactly where the pack is at least `sdd.packs.WORTHWHILE_GAIN` faster; and the note that says so."""
    from sdd.packs import WORTHWHILE_GAIN

    worth = ratio >= WORTHWHILE_GAIN
    if auto:
        return worth, "auto packs it" + (
            "" if worth else f"; the pack is NOT {WORTHWHILE_GAIN:g}x faster ({ratio:.2f}x): auto picks no real gain")
    if worth:
        return False, f"auto trains the seeds separately; the pack would have been {ratio:.2f}x faster"
    return True, (f"auto trains the seeds separately; the pack is not {WORTHWHILE_GAIN:g}x faster ({ratio:.2f}x)")


def seed_packs(ctx: Context) -> list[Figure]:
    """Item 7: per case, K separate trainings / one pack of K (wall time), auto's choice, and how often that
    choice is the faster one."""
    sizes = PACK_SIZES[ctx.size.name]
    figures = []
    disagree = []
    cases = _cases(ctx, sizes)
    for case in cases:
        log.info("item 7: %s, %d seeds packed and separately", case.label, case.seeds)
        inits = _inits(case)
        auto = _auto(case, inits[0])
        separate, packed = _measure(case, inits, sizes.repeats)
        ratio = median_ratio(separate, packed)
        agrees, note = verdict(auto, ratio)
        if not agrees:
            disagree.append(f"{case.label} ({ratio:.2f}x, auto {'on' if auto else 'off'})")
        figures.append(Figure(
            ITEM, f"{case.label}, {case.seeds} seeds (auto: {'on' if auto else 'off'})",
            "wall s: seeds one after another by sdd.fit / one seed pack", ratio, statistics.median(separate),
            statistics.median(packed), "s", target=">= 1.5" if auto else None, repeats=sizes.repeats,
            note=f"{note}; {_spread(separate, packed)}; {_steps(case)}"))
    agree = len(cases) - len(disagree)
    figures.append(Figure(
        ITEM, AGREEMENT, "cases where pack_pays chose right (pack if ratio >= 1.2) / cases",
        agree / len(cases), agree, len(cases), "cases", target=">= 1", repeats=sizes.repeats,
        note="the other side was faster for: " + "; ".join(disagree) if disagree else ""))
    return figures


def cuda_seed_packs(ctx: Context) -> list[Figure]:
    """Item 7 on CUDA: 16 small models as one pack against the same 16 trained one after another."""
    sizes = PACK_SIZES[ctx.size.name]
    figures = []
    for case in _cuda_cases(ctx, sizes):
        log.info("item 7: %s, %d seeds packed and separately", case.label, case.seeds)
        separate, packed = _measure(case, _inits(case), sizes.repeats)
        figures.append(Figure(
            ITEM, f"{case.label}, {case.seeds} seeds", "wall s: seeds one after another by sdd.fit / one seed pack",
            median_ratio(separate, packed), statistics.median(separate), statistics.median(packed), "s",
            target=">= 10", repeats=sizes.repeats, note=f"{_spread(separate, packed)}; {_steps(case)}"))
    return figures
