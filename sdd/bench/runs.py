"""Items 3, 4 and 5 of `sdd bench`: what a tracked run adds around the training loop, namely evaluation
and MLflow logging, orchestration by a Ray Tune sweep, and the bytes of its artifacts."""

from __future__ import annotations

import copy
import logging
import os
import statistics
import subprocess
import sys
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from sdd.bench.context import Context, random_images
from sdd.bench.measure import interleaved, median_ratio, patched_environ, sync, torch_threads
from sdd.bench.report import Figure

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

ARTIFACT_SPARSITIES = (0.9, 0.99)


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

        sync(problem.device)
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

    batch_times, single_times = interleaved(ctx.size.repeats, [batched, per_metric])
    evaluations = len(range(every, recipe.epochs + 1, every))
    return [
        Figure(3, f"quick preset recipe, MLP w{cfg.model.width}, {recipe.epochs} epochs, {evaluations} evaluations",
               "wall time: evaluation + MLflow logging / whole run", median_ratio(spent, wall),
               statistics.median(spent), statistics.median(wall), "s", target="<= 0.10", repeats=ctx.size.repeats,
               note=f"evaluation {median_ratio(evaluating, wall):.1%} and MLflow logging (sqlite store) "
                    f"{median_ratio(logging_, wall):.1%} of the wall time"),
        Figure(3, f"{len(steps)} evaluations x {len(metrics)} metrics",
               "time: log_metric per metric / log_batch per evaluation", median_ratio(single_times, batch_times),
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
    """Item 4 (and item 6's GPU sharing): the study's trials through `sdd.sweep.run.run_sweep` on a new local
    Ray runtime, against the same trainings by `sdd.dense.run_train` in a plain loop on one core."""
    from sdd import config
    from sdd.dense import run_train
    from sdd.sweep.ray_runner import ray_runtime
    from sdd.sweep.run import run_sweep
    from sdd.sweep.study_file import load_study

    name = f"bench-sweep-{item}"
    path = ctx.workdir / f"{name}.yaml"
    path.write_text(_study_text(ctx, name, gpu=gpu, storage=ctx.workdir / "ray"))
    points = [point for _, point in load_study(path).stages["dense"].points()]
    trials = len(points)
    log.info("item %d: %d trainings one after another on one core", item, trials)
    sequential_uri = ctx.stores.new("sequential", name)
    with torch_threads(1):
        started = time.perf_counter()
        for point in points:
            run_train(config.from_flat_dict(config.TrainConfig, point), tracking_uri=sequential_uri, experiment=name)
        sequential = time.perf_counter() - started
    capacity = parallel_capacity()
    log.info("item %d: parallel capacity %.2f; the same %d trainings as a Ray Tune sweep", item, capacity, trials)
    sweep_uri = ctx.stores.new("sweep", name)
    # The sweep reads its store from the environment; a run id or experiment the caller may have set
    # must not leak into it.
    with patched_environ(MLFLOW_TRACKING_URI=sweep_uri, MLFLOW_RUN_ID=None, MLFLOW_EXPERIMENT_ID=None,
                         MLFLOW_EXPERIMENT_NAME=None, RAY_ADDRESS=None):
        started = time.perf_counter()
        with ray_runtime(None):
            ray_up = time.perf_counter()
            sweep_began = time.time()
            outcome = run_sweep(path)
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
    from sdd import checkpoints, config, models, pruning
    from sdd.problem import build_model

    images = random_images(1, ctx.device)  # only its shapes matter: the image models are built for it
    figures = []
    for name, width in ctx.size.artifact_models:
        model_cfg = ctx.preset.model if name == "mlp" else config.ModelConfig(model=name, width=width)
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
            parts = ", ".join(f"{part} {count / dense:.2%}"
                              for part, count in level_file_parts(path, pruned.state_dict(), masks).items())
            figures.append(Figure(
                5, f"{name} w{model_cfg.width} ({models.count_params(model):,} params) at {sparsity:.0%} sparsity",
                "bytes: save_sparse / save_state dense", size / dense, size, dense, "bytes",
                target="<= 0.05" if sparsity == 0.99 else None, note=f"of the dense file's bytes: {parts}"))
    return figures


def level_file_parts(path: Path, state: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]
                     ) -> dict[str, int]:
    """Where the bytes of the level file at `path` (of `state` pruned by `masks`) go, so that a missed target
    says what limits it: the tensors kept whole (biases, normalisation), the kept weights with their index,
    the pickled names, dtypes and shapes, and the zip container torch.save wraps them in."""
    with zipfile.ZipFile(path) as archive:
        records = {info.filename: info.file_size for info in archive.infolist()}
    pickled = sum(n for record, n in records.items() if record.endswith("/data.pkl"))
    tensors = sum(n for record, n in records.items() if "/data/" in record)
    whole = sum(t.numel() * t.element_size() for name, t in state.items() if name not in masks)
    return {"whole tensors (biases, normalisation)": whole, "kept weights + index": tensors - whole,
            "names, dtypes, shapes": pickled, "zip container": path.stat().st_size - tensors - pickled}

