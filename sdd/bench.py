"""`sdd bench`: the project's fast paths timed against the plain PyTorch way, in one process and one run.

Every figure is a ratio of two quantities measured in the same run, with project and baseline repeats
interleaved (their order rotating) so that load from other processes hits both alike; medians
over the repeats are reported. Absolute numbers are printed for context only: on a shared machine
they move, the ratios much less.

1. training throughput: `sdd.training.fit` (data resident on the device, batched `sdd.augment`)
   against `sdd.baseline` (DataLoader, per-sample torchvision transforms), same model, optimizer,
   batch size and initial weights;
2. the cost of masking: a model at 90% sparsity against the same model dense, in the project's loop
   (masks multiplied in after each step) and in the baseline's (torch.nn.utils.prune);
3. MLflow logging and evaluation as a share of the wall time of the quick preset's recipe, and
   `log_batch` (MetricLogger) against one `log_metric` call per metric;
4. orchestration: small trainings as a Ray Tune sweep (`sdd.sweep.run_sweep` on a tiny study file)
   against the same trainings one after another (`sdd.dense.run_train` in a loop, one core);
5. bytes of a level artifact (`save_sparse`) against the dense model's (`save_state`);
6. CUDA only: throughput with bf16 autocast + channels_last on and off, and trials sharing one GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from sdd.errors import UsageError

log = logging.getLogger(__name__)

HELP = "time the project's fast paths against a plain PyTorch loop doing the same work (ratios)"
SPARSITY = 0.9
ARTIFACT_SPARSITIES = (0.9, 0.99)
IMAGE_SHAPE = (3, 32, 32)
IMAGE_CLASSES = 10
IMAGE_BATCH = 128
MNIST_MINIBATCH = 128
# Nakkiran et al.'s recipe for ResNet-18 of width k (sweeps/cifar10_dd_resnet18.yaml).
IMAGE_OPTIM = {"optimizer": "adam", "lr": 1e-4}


@dataclass(frozen=True)
class Size:
    """How much work each figure does: `quick` fits in a few minutes on 2 cores, `tiny` is for tests."""

    name: str
    repeats: int  # interleaved repeats of every timed pair
    mlp_repeats: int  # the MLP workloads are cheap: more repeats steady their medians
    mnist_train: int | None  # MNIST-1D training samples (None: the preset's)
    mnist_val: int | None
    mnist_test: int | None
    # (project, baseline) epochs timed per repeat, chosen so that both sides run about as long and are
    # equally exposed to bursts of load from other processes
    full_batch_epochs: tuple[int, int]  # MLP, full batch
    minibatch_epochs: tuple[int, int]  # MLP, minibatch
    images: int  # CIFAR-shaped random images
    image_epochs: tuple[int, int]
    image_models: tuple[tuple[str, int], ...]  # (model, width), timed with crop+flip
    log_epochs: int  # epochs of the preset's recipe timed for the logging + evaluation share
    log_evaluations: int  # evaluations logged for log_batch vs log_metric
    artifact_models: tuple[tuple[str, int], ...]  # (model, width); "mlp" takes the preset's width
    sweep_widths: tuple[int, ...]  # the sweep's grid: widths x seeds trials
    sweep_seeds: tuple[int, ...]
    sweep_epochs: int


SIZES: dict[str, Size] = {
    "full": Size("full", repeats=5, mlp_repeats=9, mnist_train=None, mnist_val=None, mnist_test=None,
                 full_batch_epochs=(300, 30), minibatch_epochs=(40, 10), images=2048, image_epochs=(1, 1),
                 image_models=(("cnn5", 8), ("resnet18", 8)),
                 log_epochs=2000, log_evaluations=100,
                 artifact_models=(("mlp", 0), ("cnn5", 8), ("resnet18", 8), ("resnet18", 64)),
                 sweep_widths=(32, 64, 96, 128), sweep_seeds=(0, 1), sweep_epochs=2000),
    "quick": Size("quick", repeats=5, mlp_repeats=7, mnist_train=None, mnist_val=None, mnist_test=None,
                  full_batch_epochs=(60, 6), minibatch_epochs=(12, 4), images=384, image_epochs=(1, 1),
                  image_models=(("cnn5", 8), ("resnet18", 8)),
                  log_epochs=200, log_evaluations=10,
                  artifact_models=(("mlp", 0), ("cnn5", 8), ("resnet18", 8), ("resnet18", 64)),
                  sweep_widths=(32, 64, 96, 128), sweep_seeds=(0, 1), sweep_epochs=100),
    "tiny": Size("tiny", repeats=1, mlp_repeats=1, mnist_train=200, mnist_val=50, mnist_test=100,
                 full_batch_epochs=(2, 1), minibatch_epochs=(1, 1), images=64, image_epochs=(1, 1), image_models=(("cnn5", 4), ("resnet18", 2)),
                 log_epochs=20, log_evaluations=3, artifact_models=(("mlp", 0), ("resnet18", 4)),
                 sweep_widths=(8,), sweep_seeds=(0,), sweep_epochs=2),
}


@dataclass
class Figure:
    """One row of the table: ratio = a / b (medians over repeats of the per-repeat ratios)."""

    item: int
    name: str
    measure: str  # what a and b are, e.g. "samples/s: sdd.fit / DataLoader loop"
    ratio: float
    a: float
    b: float
    unit: str
    target: str | None = None  # e.g. ">= 1.5" or "<= 0.10"
    repeats: int = 1
    note: str = ""

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        op, bound = self.target.split()
        return self.ratio >= float(bound) if op == ">=" else self.ratio <= float(bound)


@dataclass
class Report:
    size: str
    device: str
    environment: dict[str, Any]
    figures: list[Figure] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return {"size": self.size, "device": self.device, "environment": self.environment,
                "seconds": round(self.seconds, 1),
                "figures": [{**asdict(f), "met": f.met} for f in self.figures], "skipped": self.skipped}


# --- measuring ----------------------------------------------------------------------------------

def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _interleaved(repeats: int, runners: Sequence[Callable[[], float]]) -> list[list[float]]:
    """Per runner, its measurement in each repeat; the order rotates every repeat so that drifting load
    from other processes falls on every runner alike."""
    out: list[list[float]] = [[] for _ in runners]
    for r in range(repeats):
        for i in [(r + k) % len(runners) for k in range(len(runners))]:
            out[i].append(runners[i]())
    return out


def _median_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


@contextlib.contextmanager
def _environ(**values: str | None) -> Iterator[None]:
    """Set (or, for None, remove) environment variables for the duration of the block."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Stores:
    """Fresh sqlite tracking stores in a temporary folder, copied from one migrated empty database
    (MLflow's schema migration costs seconds per new database)."""

    def __init__(self, root: Path) -> None:
        from mlflow import MlflowClient

        self.root = root
        self.template = root / "empty.db"
        MlflowClient(tracking_uri=f"sqlite:///{self.template}").search_experiments(max_results=1)
        self.count = 0

    def new(self, name: str, experiment: str) -> str:
        """A new store holding `experiment`, whose artifacts also stay in the temporary folder (a sqlite
        store's default artifact root is ./mlruns in the working directory)."""
        from mlflow import MlflowClient

        self.count += 1
        path = self.root / f"{name}-{self.count}.db"
        shutil.copy(self.template, path)
        uri = f"sqlite:///{path}"
        artifacts = self.root / f"{name}-{self.count}-artifacts"
        MlflowClient(tracking_uri=uri).create_experiment(experiment, artifact_location=artifacts.as_uri())
        return uri


# --- the workloads --------------------------------------------------------------------------------

@dataclass
class Context:
    """What every section shares: device, sizes, the quick preset's recipe and its data."""

    size: Size
    device: Any
    workers: int
    preset: Any  # sdd.config.TrainConfig: the quick preset's dense recipe at the median width of its grid
    recipe: dict[str, Any]  # that recipe as study-file options (without width and seed)
    problem: Any  # sdd.problem.Problem of the preset's data
    stores: Stores
    workdir: Path


def _preset(size: Size, device_name: str) -> tuple[Any, dict[str, Any]]:
    """The quick preset's dense recipe (sweeps/mnist1d_quick.yaml) at the median width of its grid, as a
    config and as study-file options."""
    from sdd import config as C
    from sdd.study import DEFAULT_FILE
    from sdd.study_file import load_study

    path = Path(__file__).resolve().parents[1] / DEFAULT_FILE
    if not path.is_file():
        raise UsageError(f"the quick preset {path} is missing; run `sdd bench` from a source checkout")
    dense = load_study(path).stages["dense"]
    widths = tuple(sorted(int(w) for w in dense.values("width", C.ModelConfig().width)))
    recipe = {k: v for k, v in dense.recipe.items() if k not in ("width", "seed")}
    recipe["device"] = device_name
    for key, value in (("train_size", size.mnist_train), ("val_size", size.mnist_val),
                       ("test_size", size.mnist_test)):
        if value is not None:
            recipe[key] = value
    cfg = C.from_flat_dict(C.TrainConfig, {**recipe, "width": widths[len(widths) // 2]})
    cfg.validate()
    return cfg, recipe


def _random_images(n: int, device: Any) -> Any:
    """A Problem of CIFAR-shaped random images (seeded), resident on `device`, for the image workloads."""
    import torch

    from sdd.data import Splits
    from sdd.problem import Problem

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, *IMAGE_SHAPE, generator=g)
    y = torch.randint(0, IMAGE_CLASSES, (n,), generator=g)
    none = torch.empty(0, *IMAGE_SHAPE)
    splits = Splits(x_train=x, y_train=y, x_val=none, y_val=torch.empty(0, dtype=torch.long), x_test=none,
                    y_test=torch.empty(0, dtype=torch.long), num_classes=IMAGE_CLASSES,
                    input_shape=IMAGE_SHAPE).to(device)
    return Problem(splits, splits.y_train, torch.empty(0, dtype=torch.long),
                   torch.zeros(n, dtype=torch.bool, device=device), device)


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
    from sdd import config as C

    size, preset = ctx.size, ctx.preset
    full = replace(preset.optim, epochs=size.full_batch_epochs[0], batch_size=0)
    mini = replace(preset.optim, epochs=size.minibatch_epochs[0], batch_size=MNIST_MINIBATCH)
    mlp = f"MLP w{preset.model.width} MNIST-1D"
    out = [Workload(f"{mlp} full batch", ctx.problem, preset.model, full, size.full_batch_epochs[1], False, True,
                    size.mlp_repeats),
           Workload(f"{mlp} minibatch {MNIST_MINIBATCH}", ctx.problem, preset.model, mini, size.minibatch_epochs[1],
                    False, True, size.mlp_repeats)]
    images = _random_images(size.images, ctx.device)
    optim = C.OptimConfig(**IMAGE_OPTIM, epochs=size.image_epochs[0], batch_size=IMAGE_BATCH)
    for i, (name, width) in enumerate(size.image_models):
        # The masking cost is shown on the first image model; a second one would double the section's time.
        out.append(Workload(f"{name} w{width} {size.images} random CIFAR-shaped images, crop+flip", images,
                            C.ModelConfig(model=name, width=width), optim, size.image_epochs[1], True, i == 0,
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
        _sync(w.problem.device)
        started = time.perf_counter()
        fit(model, x, y, recipe, masks=float_masks, weights=weights if masks is not None else None,
            autocast=autocast)
        _sync(w.problem.device)
        return time.perf_counter() - started

    return run


def _baseline_runner(w: Workload, init: Any, masks: dict[str, Any] | None, loader: Any, *,
                     autocast: bool = False, channels_last: bool = False) -> Callable[[], float]:
    import torch

    from sdd import baseline
    from sdd.training import make_optimizer

    # The plain way keeps PyTorch's default layout whatever layout sdd builds its models in.
    layout = torch.channels_last if channels_last else torch.contiguous_format

    def run() -> float:
        model = copy.deepcopy(init).to(memory_format=layout)
        if masks is not None:
            baseline.prune_with_masks(model, masks)
        _sync(w.problem.device)
        started = time.perf_counter()
        optimizer = make_optimizer(model.parameters(), w.optim, w.optim.lr)
        baseline.train(model, loader, optimizer, w.baseline_epochs, w.problem.device, autocast=autocast)
        _sync(w.problem.device)
        return time.perf_counter() - started

    return run


def _warm_up(w: Workload, init: Any) -> None:
    """One step of each side on one batch: first calls pay one-off costs (torch._dynamo's import on the
    first optimizer, oneDNN kernel selection) that would otherwise land on whichever side runs first."""
    from sdd import baseline

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
    from sdd import baseline

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
        times = _interleaved(w.repeats, runners)
        project, base = w.throughput(times[0]), w.throughput(times[1], baseline=True)
        figures.append(Figure(
            1, w.label, "samples/s: sdd.fit / DataLoader loop", _median_ratio(project, base),
            statistics.median(project), statistics.median(base), "samples/s",
            target=">= 1.5" if w.augment else ">= 1.0", repeats=w.repeats))
        if w.masked:
            # Same epochs on both sides of each ratio, so run times compare as step times.
            masking.append(Figure(
                2, w.label, f"step time at {SPARSITY:.0%} sparsity: masked / dense, sdd.fit",
                _median_ratio(times[2], times[0]), w.step_ms(times[2]), w.step_ms(times[0]), "ms",
                target="<= 1.10", repeats=w.repeats))
            masking.append(Figure(
                2, w.label, f"step time at {SPARSITY:.0%} sparsity: torch prune / dense, DataLoader loop",
                _median_ratio(times[3], times[1]), w.step_ms(times[3], baseline=True),
                w.step_ms(times[1], baseline=True), "ms", repeats=w.repeats))
    return figures + masking


# --- item 3: logging and evaluation -------------------------------------------------------------

def logging_share(ctx: Context) -> list[Figure]:
    """Item 3: evaluation + MLflow logging as a share of the preset recipe's wall time, as dense.run_train
    does them (evaluate_all every effective_eval_every epochs into a MetricLogger, flushed at the end),
    and one log_batch per evaluation against one log_metric call per metric. The run's resumable
    snapshots (every `resume_every` seconds, 600 by default) never fall inside the timed epochs."""
    import torch

    from sdd import models, tracking
    from sdd.dense import evaluate_all
    from sdd.problem import build_model
    from sdd.training import Recipe, fit

    cfg, problem = ctx.preset, ctx.problem
    every = cfg.effective_eval_every()
    recipe = Recipe.from_optim(cfg.optim, epochs=ctx.size.log_epochs)
    client = tracking.get_client(ctx.stores.new("logging", "bench"))
    exp_id = tracking.experiment_id(client, "bench")
    log.info("item 3: %d epochs of the quick preset's recipe (width %d), evaluating every %d", recipe.epochs,
             cfg.model.width, every)

    def share() -> tuple[float, float, float]:
        """Seconds spent evaluating, logging, and in all, for `recipe.epochs` epochs."""
        model = build_model(cfg.model, problem, cfg.optim.seed)
        init = {k: v.detach().clone() for k, v in models.prunable_weights(model).items()}
        logger = tracking.MetricLogger(client, tracking.start_run(client, exp_id, name="share", tags={}))
        spent = {"eval": 0.0, "log": 0.0}

        def on_epoch(epoch: int, _loss: float) -> None:
            if epoch % every == 0:
                started = time.perf_counter()
                metrics = evaluate_all(model, problem, init)
                evaluated = time.perf_counter()
                logger.log(metrics, epoch)
                spent["eval"] += evaluated - started
                spent["log"] += time.perf_counter() - evaluated

        _sync(problem.device)
        started = time.perf_counter()
        fit(model, problem.splits.x_train, problem.splits.y_train, recipe,
            generator=torch.Generator(device=problem.device).manual_seed(cfg.optim.seed), on_epoch=on_epoch)
        flushed = time.perf_counter()
        logger.flush()
        spent["log"] += time.perf_counter() - flushed
        return spent["eval"], spent["log"], time.perf_counter() - started

    evaluating, logging_, wall = zip(*(share() for _ in range(ctx.size.repeats)))
    spent = [e + g for e, g in zip(evaluating, logging_)]

    model = build_model(cfg.model, problem, cfg.optim.seed)
    metrics = evaluate_all(model, problem, {k: v.detach().clone() for k, v in models.prunable_weights(model).items()})
    steps = range(1, ctx.size.log_evaluations + 1)

    def batched() -> float:
        # interval 0: one log_batch per evaluation, the batching alone without MetricLogger's buffering
        logger = tracking.MetricLogger(client, tracking.start_run(client, exp_id, name="batch", tags={}), interval=0)
        started = time.perf_counter()
        for step in steps:
            logger.log(metrics, step)
        logger.flush()
        return time.perf_counter() - started

    def per_metric() -> float:
        run_id = tracking.start_run(client, exp_id, name="per-metric", tags={})
        started = time.perf_counter()
        for step in steps:
            for key, value in metrics.items():
                client.log_metric(run_id, key, value, step=step)
        return time.perf_counter() - started

    batch_times, single_times = _interleaved(ctx.size.repeats, [batched, per_metric])
    evaluations = len(range(every, recipe.epochs + 1, every))
    return [
        Figure(3, f"quick preset recipe, MLP w{cfg.model.width}, {recipe.epochs} epochs, {evaluations} evaluations",
               "wall time: evaluation + MLflow logging / whole run", _median_ratio(spent, wall),
               statistics.median(spent), statistics.median(wall), "s", target="<= 0.10", repeats=ctx.size.repeats,
               note=f"evaluation {_median_ratio(evaluating, wall):.1%} and MLflow logging (sqlite store) "
                    f"{_median_ratio(logging_, wall):.1%} of the wall time"),
        Figure(3, f"{len(steps)} evaluations x {len(metrics)} metrics",
               "time: log_metric per metric / log_batch per evaluation", _median_ratio(single_times, batch_times),
               statistics.median(single_times), statistics.median(batch_times), "s", repeats=ctx.size.repeats),
    ]


# --- item 4: orchestration ----------------------------------------------------------------------

def _study_text(ctx: Context, name: str, *, gpu: float, storage: Path) -> str:
    """A dense-only study file: the quick preset's recipe, the size's widths x seeds, short trainings."""
    import yaml

    # Ray hides the GPUs from trials that reserve none: CPU trials must say so.
    recipe = {**ctx.recipe, "epochs": ctx.size.sweep_epochs, "device": "cuda" if gpu else "cpu"}
    study = {"name": name, "experiment": name, "storage_path": str(storage), "retries": 0,
             "stages": {"dense": {"recipe": recipe,
                                  "grid": {"width": list(ctx.size.sweep_widths), "seed": list(ctx.size.sweep_seeds)},
                                  "resources": {"cpu": 1, "gpu": gpu}}}}
    return yaml.safe_dump(study, sort_keys=False)


def parallel_capacity(processes: int = 2, loops: int = 5_000_000) -> float:
    """How many CPU-bound processes run side by side right now: processes x (time of one alone) / (time of
    `processes` together). About `processes` on idle cores; about 1 when other tenants take the rest,
    which bounds any parallel speed-up measured at that moment."""
    command = [sys.executable, "-c", f"s = 0\nfor i in range({loops}):\n    s += i * i"]

    def together(k: int) -> float:
        started = time.perf_counter()
        for p in [subprocess.Popen(command) for _ in range(k)]:
            p.wait()
        return time.perf_counter() - started

    return processes * together(1) / together(processes)


def _train_times(uri: str, experiment: str) -> tuple[list[float], float]:
    """Training seconds of every dense run in the store, and the earliest run's start (epoch seconds)."""
    from sdd import tracking

    client = tracking.get_client(uri)
    runs = tracking.search(client, tracking.experiment_id(client, experiment), tags={"sdd.step": "train"})
    return [r.data.metrics["train_time_s"] for r in runs], min(r.info.start_time for r in runs) / 1000


def sweep_speedup(ctx: Context, *, gpu: float = 0.0, item: int = 4) -> list[Figure]:
    """Item 4 (and item 6's GPU sharing): the study's trials through `sdd.sweep.run_sweep` on a new local
    Ray runtime, against the same trainings by `sdd.dense.run_train` in a plain loop on one core."""
    from sdd import config as C
    from sdd import sweep
    from sdd.dense import run_train
    from sdd.study_file import load_study

    name = f"bench-sweep-{item}"
    path = ctx.workdir / f"{name}.yaml"
    path.write_text(_study_text(ctx, name, gpu=gpu, storage=ctx.workdir / "ray"))
    points = [point for _, point in load_study(path).stages["dense"].points()]
    trials = len(points)
    log.info("item %d: %d trainings one after another on one core", item, trials)
    sequential_uri = ctx.stores.new("sequential", name)
    with _threads(1):
        started = time.perf_counter()
        for point in points:
            run_train(C.from_flat_dict(C.TrainConfig, point), tracking_uri=sequential_uri, experiment=name)
        sequential = time.perf_counter() - started
    capacity = parallel_capacity()
    log.info("item %d: parallel capacity %.2f; the same %d trainings as a Ray Tune sweep", item, capacity, trials)
    sweep_uri = ctx.stores.new("sweep", name)
    # The sweep reads its store from the environment; a run id or experiment the caller may have set
    # must not leak into it.
    with _environ(MLFLOW_TRACKING_URI=sweep_uri, MLFLOW_RUN_ID=None, MLFLOW_EXPERIMENT_ID=None,
                  MLFLOW_EXPERIMENT_NAME=None, RAY_ADDRESS=None):
        started = time.perf_counter()
        with sweep.ray_runtime(None):
            ray_up = time.perf_counter()
            sweep_began = time.time()
            outcome = sweep.run_sweep(path)
            swept = time.perf_counter() - ray_up
        start_up = ray_up - started
    if not outcome.complete:
        errors = "; ".join(r["error"] or r["status"] for s in outcome.stages for r in s.records
                           if r["status"] != "FINISHED")
        raise RuntimeError(f"the benchmark sweep did not finish every trial: {errors[:1000]}")
    sequential_train, _ = _train_times(sequential_uri, name)
    swept_train, first_start = _train_times(sweep_uri, name)
    label = f"{trials} MNIST-1D MLP training{'s' if trials > 1 else ''} ({ctx.size.sweep_epochs} epochs)" + (
        f", {gpu:g} GPU each" if gpu else "")
    why = (f"{os.cpu_count()} CPUs, 1 CPU per trial, one run of each; parallel capacity just before the sweep "
           f"{capacity:.2f} (2 CPU-bound processes side by side ran {capacity:.2f}x as fast as one); the first "
           f"trial started {first_start - sweep_began:.1f}s into the sweep (worker start-up); median training "
           f"time per trial {statistics.median(sequential_train):.2f}s in the loop, "
           f"{statistics.median(swept_train):.2f}s in the sweep")
    return [
        Figure(item, label, "wall time: sequential loop on 1 core / sweep, Ray already up",
               sequential / swept, sequential, swept, "s", target=">= 1.7" if item == 4 else None, note=why),
        Figure(item, label, "wall time: sequential loop on 1 core / sweep including Ray start",
               sequential / (swept + start_up), sequential, swept + start_up, "s",
               note=f"starting the local Ray runtime took {start_up:.1f}s"),
    ]


# --- item 5: artifact bytes ---------------------------------------------------------------------

def artifact_bytes(ctx: Context) -> list[Figure]:
    """Item 5: save_sparse of a globally magnitude-pruned model against save_state of the dense one."""
    from sdd import checkpoints, config as C, models, pruning
    from sdd.problem import build_model

    images = _random_images(1, ctx.device)  # only its shapes matter: the image models are built for it
    figures = []
    for name, width in ctx.size.artifact_models:
        model_cfg = ctx.preset.model if name == "mlp" else C.ModelConfig(model=name, width=width)
        model = build_model(model_cfg, ctx.problem if name == "mlp" else images, seed=0)
        state = model.state_dict()
        dense_path = ctx.workdir / f"{name}-{model_cfg.width}-dense.pt"
        checkpoints.save_state(state, dense_path)
        dense = dense_path.stat().st_size
        weights = models.prunable_weights(model)
        for sparsity in ARTIFACT_SPARSITIES:
            masks = pruning.prune_masks(pruning.magnitude_scores(weights), pruning.full_masks(weights), sparsity,
                                        "global")
            pruned = copy.deepcopy(model)
            pruning.apply_masks(models.prunable_weights(pruned), masks)
            path = ctx.workdir / f"{name}-{model_cfg.width}-{sparsity}.pt"
            checkpoints.save_sparse(pruned.state_dict(), masks, path)
            size = path.stat().st_size
            figures.append(Figure(
                5, f"{name} w{model_cfg.width} ({models.count_params(model):,} params) at {sparsity:.0%} sparsity",
                "bytes: save_sparse / save_state dense", size / dense, size, dense, "bytes",
                target="<= 0.05" if sparsity == 0.99 else None))
    return figures


# --- item 6: CUDA -------------------------------------------------------------------------------

def precision_and_layout(ctx: Context) -> list[Figure]:
    """Item 6: the image workloads with bf16 autocast + channels_last on (the project's default on CUDA)
    and off, on both sides, and the project's own gain from them."""
    import torch

    from sdd import baseline

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
        on, off, base_on, base_off = _interleaved(w.repeats, [
            _project_runner(w, fast, None, autocast=True), _project_runner(w, plain, None, autocast=False),
            _baseline_runner(w, plain, None, loader, autocast=True, channels_last=True),
            _baseline_runner(w, plain, None, loader)])
        n = w.repeats
        on, off = w.throughput(on), w.throughput(off)
        base_on, base_off = w.throughput(base_on, baseline=True), w.throughput(base_off, baseline=True)
        figures += [
            Figure(6, w.label, "samples/s, bf16 + channels_last on: sdd.fit / DataLoader loop",
                   _median_ratio(on, base_on), statistics.median(on), statistics.median(base_on), "samples/s",
                   repeats=n),
            Figure(6, w.label, "samples/s, bf16 + channels_last off: sdd.fit / DataLoader loop",
                   _median_ratio(off, base_off), statistics.median(off), statistics.median(base_off), "samples/s",
                   repeats=n),
            Figure(6, w.label, "samples/s, sdd.fit: bf16 + channels_last on / off", _median_ratio(on, off),
                   statistics.median(on), statistics.median(off), "samples/s", repeats=n),
        ]
    return figures


# --- running and printing -------------------------------------------------------------------------

def make_context(size: Size | str, device: Any, workers: int, workdir: Path) -> Context:
    """Everything the sections share; `size` is a Size or the name of one in SIZES."""
    from sdd.problem import load_problem

    size = SIZES[size] if isinstance(size, str) else size
    preset, recipe = _preset(size, device.type)
    return Context(size, device, workers, preset, recipe, load_problem(preset.data, device), Stores(workdir), workdir)


def run(size: Size | str = "full", *, workers: int = 0, threads: int = 1) -> Report:
    """Measure every figure on the default device (CUDA if there is one) with `threads` torch threads."""
    import torch

    from sdd.problem import resolve_device

    started = time.perf_counter()
    device = resolve_device("auto")
    environment = {"torch": torch.__version__, "cpus": os.cpu_count(), "threads": threads,
                   "load_average_start": round(os.getloadavg()[0], 1), "loader_workers": workers,
                   "python": sys.version.split()[0]}
    with tempfile.TemporaryDirectory(prefix="sdd-bench-") as tmp, _threads(threads):
        ctx = make_context(size, device, workers, Path(tmp))
        report = Report(ctx.size.name, str(device), environment)
        report.figures += throughput_and_masking(ctx)
        report.figures += logging_share(ctx)
        report.figures += artifact_bytes(ctx)
        report.figures += sweep_speedup(ctx)
        if device.type == "cuda":
            report.figures += precision_and_layout(ctx)
            report.figures += sweep_speedup(ctx, gpu=0.25, item=6)
        else:
            report.skipped.append({"item": 6, "reason": "no CUDA device: bf16 autocast, channels_last and GPU "
                                                        "sharing are measured on CUDA only"})
    report.environment["load_average_end"] = round(os.getloadavg()[0], 1)
    report.seconds = time.perf_counter() - started
    report.figures.sort(key=lambda f: f.item)
    return report


def _show(value: float, unit: str) -> str:
    if unit == "bytes":
        return f"{value:,.0f} B"
    if unit == "samples/s":
        return f"{value:,.0f}/s"
    if unit == "s":
        return f"{value:.3g} s"
    if unit == "ms":
        return f"{value:.3g} ms"
    return f"{value:.3f}"


def format_table(report: Report) -> str:
    env = report.environment
    lines = [
        f"sdd bench ({report.size}) on {report.device}: torch {env['torch']}, {env['cpus']} CPUs, "
        f"{env['threads']} torch thread(s), load average {env['load_average_start']} at start and "
        f"{env['load_average_end']} at the end; {report.seconds:.0f}s",
        "ratio = A / B as each row's measure names them: the median of the per-repeat ratios (A, B: their own "
        "medians). Speed-ups of the project over its baseline (items 1, 3 log_batch, 4, 6) are oriented so that "
        "> 1 means the project is better; costs (items 2, 3 share, 5) meet their target at or below it. "
        "Absolute numbers move with the machine's load, ratios much less.",
        "",
    ]
    rows = [("#", "figure", "measure (A / B)", "ratio", "target", "met", "A", "B", "n")]
    for f in report.figures:
        met = {True: "yes", False: "NO", None: ""}[f.met]
        rows.append((str(f.item), f.name, f.measure, f"{f.ratio:.3f}", f.target or "", met, _show(f.a, f.unit),
                     _show(f.b, f.unit), str(f.repeats)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    for f in report.figures:
        if f.note:
            lines.append(f"note ({f.item}, {f.name}): {f.note}")
    for s in report.skipped:
        lines.append(f"item {s['item']} skipped: {s['reason']}")
    return "\n".join(lines)


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="smaller workloads and fewer repeats (a few minutes on "
                                                        "2 cores)")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the test suite's size
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                   help="also write the figures as JSON to PATH; without PATH, print JSON instead of the table")
    p.add_argument("--loader-workers", type=int, default=0, metavar="N",
                   help="DataLoader workers of the baseline (default 0: on a 2-core machine workers compete "
                        "with the training threads)")
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="torch threads of both sides (default 1: figures per core; on a shared machine more "
                        "threads measure OpenMP waiting for descheduled threads more than the work)")


def command(args: argparse.Namespace) -> int:
    if args.loader_workers < 0:
        raise UsageError(f"--loader-workers must be >= 0, got {args.loader_workers}")
    if args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    report = run("tiny" if args.tiny else "quick" if args.quick else "full", workers=args.loader_workers,
                 threads=args.threads)
    text = json.dumps(report.as_json(), indent=1)
    if args.json == "-":
        print(text)
        return 0
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(format_table(report))
    return 0
