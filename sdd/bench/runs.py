"""Items 3, 4 and 5 of `sdd bench`: what a tracked run adds around the training loop, namely evaluation
and MLflow logging, orchestration by a Ray Tune sweep, and the bytes of its artifacts."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import logging
import os
import pickletools
import statistics
import subprocess
import sys
import time
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
    does them (evaluate_all after each of the config's eval_epochs into a MetricLogger, flushed at the end),
    and one log_batch per evaluation against one log_metric call per metric. The run's resumable
    snapshots (every `resume_every` seconds, 600 by default) never fall inside the timed epochs."""
    import torch

    from sdd import models, tracking
    from sdd.dense import evaluate_all
    from sdd.problem import build_model
    from sdd.training import Recipe, fit

    # The preset's whole run (its epochs and default evaluation schedule); a smaller size times fewer epochs.
    cfg, problem = ctx.preset, ctx.problem
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, epochs=min(cfg.optim.epochs,
                                                                                   ctx.size.log_epochs)))
    eval_epochs = cfg.eval_epochs()
    recipe = Recipe.from_optim(cfg.optim)
    client = tracking.get_client(ctx.stores.new("logging", "bench"))
    exp_id = tracking.experiment_id(client, "bench")
    log.info("item 3: %d epochs of the quick preset's recipe (width %d), %d evaluations", recipe.epochs,
             cfg.model.width, len(eval_epochs))

    def share() -> tuple[float, float, float]:
        """Seconds spent evaluating, logging, and in all, for `recipe.epochs` epochs."""
        model = build_model(cfg.model, problem, cfg.optim.seed)
        init = {k: v.detach().clone() for k, v in models.prunable_weights(model).items()}
        logger = tracking.MetricLogger(client, tracking.start_run(client, exp_id, name="share", tags={}))
        spent = {"eval": 0.0, "log": 0.0}

        def on_epoch(epoch: int, _loss: float) -> None:
            if epoch in eval_epochs:
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
    evaluations = len(eval_epochs)
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

def _study_text(ctx: Context, name: str, *, gpu: float, storage: Path, widths: tuple[int, ...],
                seeds: tuple[int, ...], epochs: int) -> str:
    """A dense-only study file: the quick preset's recipe over widths x seeds, `epochs` epochs each."""
    import yaml

    # Ray hides the GPUs from trials that reserve none: CPU trials must say so.
    recipe = {**ctx.recipe, "epochs": epochs, "device": "cuda" if gpu else "cpu"}
    study = {"name": name, "experiment": name, "storage_path": str(storage), "retries": 0,
             "stages": {"dense": {"recipe": recipe, "grid": {"width": list(widths), "seed": list(seeds)},
                                  "resources": {"cpu": 1, "gpu": gpu}}}}
    return yaml.safe_dump(study, sort_keys=False)


def _write_study(ctx: Context, name: str, *, gpu: float, widths: tuple[int, ...], seeds: tuple[int, ...],
                 epochs: int) -> tuple[Path, list[dict]]:
    """The study file of a bench sweep, and its dense trials' flat configs."""
    from sdd.sweep.study_file import load_study

    path = ctx.workdir / f"{name}.yaml"
    path.write_text(_study_text(ctx, name, gpu=gpu, storage=ctx.workdir / "ray", widths=widths, seeds=seeds,
                                epochs=epochs))
    return path, [point for _, point in load_study(path).stages["dense"].points()]


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


def _dense_runs(uri: str, experiment: str) -> list:
    from sdd import tracking

    client = tracking.get_client(uri)
    return tracking.search(client, tracking.experiment_id(client, experiment), tags={"sdd.step": "train"})


def _train_times(uri: str, experiment: str) -> tuple[list[float], float]:
    """Training seconds of every dense run in the store, and the earliest run's start (epoch seconds)."""
    runs = _dense_runs(uri, experiment)
    return [r.data.metrics["train_time_s"] for r in runs], min(r.info.start_time for r in runs) / 1000


def _sweep_environ(uri: str) -> contextlib.AbstractContextManager:
    # The sweep reads its store from the environment; a run id, experiment or Ray address the caller may
    # have set must not leak into it.
    return patched_environ(MLFLOW_TRACKING_URI=uri, MLFLOW_RUN_ID=None, MLFLOW_EXPERIMENT_ID=None,
                           MLFLOW_EXPERIMENT_NAME=None, RAY_ADDRESS=None)


def _timed_sweep(path: Path, uri: str) -> tuple[float, float]:
    """Seconds of `run_sweep(path)` into the store `uri` on the Ray runtime already up, and when it began
    (epoch seconds); every trial must finish."""
    from sdd.sweep.run import run_sweep

    with _sweep_environ(uri):
        began, started = time.time(), time.perf_counter()
        outcome = run_sweep(path)
        seconds = time.perf_counter() - started
    if not outcome.complete:
        errors = "; ".join(r["error"] or r["status"] for s in outcome.stages for r in s.records
                           if r["status"] != "FINISHED")
        raise RuntimeError(f"the benchmark sweep {path.stem} did not finish every trial: {errors[:1000]}")
    return seconds, began


def _plain_processes(ctx: Context, points: list[dict], processes: int) -> tuple[float, list[dict]]:
    """The trainings of `points` as `processes` plain PyTorch scripts started at once (`baseline.train_grid_share`,
    each its share points[i::processes], one thread, no tracking) on data arrays built here once and shared
    through a file: their wall time, from the first start to the last exit, and their results."""
    import json

    import torch

    from sdd import config
    from sdd.problem import load_problem

    cfgs = [config.from_flat_dict(config.TrainConfig, point) for point in points]
    first = cfgs[0]
    optim = first.optim
    if (optim.optimizer, optim.batch_size, optim.schedule, optim.weight_decay, first.data.augment,
            first.model.model) != ("adam", 0, "constant", 0.0, False, "mlp"):
        raise RuntimeError("the plain grid script trains MLPs with full-batch Adam at a constant lr, without weight "
                           f"decay or augmentation; the quick preset's dense recipe is now {optim} ({first.model})")
    arrays: dict[str, torch.Tensor] = {}
    for seed in sorted({c.optim.seed for c in cfgs}):  # each seed draws its own label noise
        problem = load_problem(first.data, torch.device("cpu"), run_seed=seed)
        splits = problem.splits
        arrays.update(x_train=splits.x_train, x_test=splits.x_test, y_test=splits.y_test)
        arrays[f"y_train_seed{seed}"] = splits.y_train
    data_path = ctx.workdir / "plain-grid-data.pt"
    torch.save(arrays, data_path)
    trials = [[c.model.width, c.optim.seed] for c in cfgs]
    jobs = []
    for i in range(processes):
        job = {"data": str(data_path), "trials": trials[i::processes], "epochs": optim.epochs, "lr": optim.lr,
               "depth": first.model.depth, "classes": problem.splits.num_classes,
               "out": str(ctx.workdir / f"plain-grid-{i}.json")}
        jobs.append(ctx.workdir / f"plain-grid-job-{i}.json")
        jobs[-1].write_text(json.dumps(job))
    started = time.perf_counter()
    running = [subprocess.Popen([sys.executable, "-c", "from sdd.bench.baseline import train_grid_share; "
                                 f"train_grid_share({str(job)!r})"], cwd=ctx.workdir) for job in jobs]
    codes = [p.wait() for p in running]
    wall = time.perf_counter() - started
    if any(codes):
        raise RuntimeError(f"a plain grid process failed (exit statuses {codes})")
    return wall, [r for job in jobs for r in json.loads(Path(json.loads(job.read_text())["out"]).read_text())]


def sweep_speedup(ctx: Context, *, gpu: float = 0.0, item: int = 4, against_plain: bool = True) -> list[Figure]:
    """Item 4 (and item 6's GPU sharing): short trainings through `sdd.sweep.run.run_sweep` on a new local Ray
    runtime, against the same trainings by `sdd.dense.run_train` in a plain loop on one core; and, with
    `against_plain`, the quick preset's dense grid scaled down as a sweep on N = os.cpu_count() cores (in the same
    runtime, after the short one) against N plain PyTorch processes (`_plain_processes`) training the same grid."""
    from sdd import config
    from sdd.dense import run_train
    from sdd.sweep.ray_runner import ray_runtime

    size = ctx.size
    name = f"bench-sweep-{item}"
    path, points = _write_study(ctx, name, gpu=gpu, widths=size.sweep_widths, seeds=size.sweep_seeds,
                                epochs=size.sweep_epochs)
    trials = len(points)
    log.info("item %d: %d trainings one after another on one core", item, trials)
    sequential_uri = ctx.stores.new("sequential", name)
    with torch_threads(1):
        started = time.perf_counter()
        for point in points:
            run_train(config.from_flat_dict(config.TrainConfig, point), tracking_uri=sequential_uri, experiment=name)
        sequential = time.perf_counter() - started
    cores = os.cpu_count() or 1
    if against_plain:
        grid_path, grid_points = _write_study(ctx, "bench-grid", gpu=0.0, widths=size.grid_widths,
                                              seeds=size.grid_seeds, epochs=size.grid_epochs)
        log.info("item %d: the %d trainings of the scaled-down dense grid as %d plain processes", item,
                 len(grid_points), cores)
        plain, plain_results = _plain_processes(ctx, grid_points, cores)
    capacity = parallel_capacity()
    log.info("item %d: parallel capacity %.2f; the same %d trainings as a Ray Tune sweep", item, capacity, trials)
    sweep_uri = ctx.stores.new("sweep", name)
    with _sweep_environ(sweep_uri):
        started = time.perf_counter()
        with ray_runtime(None):
            start_up = time.perf_counter() - started
            swept, sweep_began = _timed_sweep(path, sweep_uri)
            if against_plain:
                log.info("item %d: the scaled-down dense grid as a Ray Tune sweep", item)
                grid_uri = ctx.stores.new("grid", "bench-grid")
                grid_swept, grid_began = _timed_sweep(grid_path, grid_uri)
    sequential_train, _ = _train_times(sequential_uri, name)
    swept_train, first_start = _train_times(sweep_uri, name)
    label = f"{trials} MNIST-1D MLP training{'s' if trials > 1 else ''} ({size.sweep_epochs} epochs)" + (
        f", {gpu:g} GPU each" if gpu else "")
    why = (f"{cores} CPUs, 1 CPU per trial, one run of each; parallel capacity just before the sweep "
           f"{capacity:.2f} (2 CPU-bound processes side by side ran {capacity:.2f}x as fast as one); the first "
           f"trial started {first_start - sweep_began:.1f}s into the sweep (worker start-up); median training "
           f"time per trial {statistics.median(sequential_train):.2f}s in the loop, "
           f"{statistics.median(swept_train):.2f}s in the sweep")
    figures = [
        Figure(item, label, "wall time: sequential loop on 1 core / sweep, Ray already up",
               sequential / swept, sequential, swept, "s", target=">= 1.7" if item == 4 else None, note=why),
        Figure(item, label, "wall time: sequential loop on 1 core / sweep including Ray start",
               sequential / (swept + start_up), sequential, swept + start_up, "s",
               note=f"starting the local Ray runtime took {start_up:.1f}s"),
    ]
    if against_plain:
        figures += _grid_figures(item, grid_points, plain, plain_results, grid_swept, grid_began, grid_uri,
                                 start_up, cores)
    return figures


def _grid_figures(item: int, points: list[dict], plain: float, plain_results: list[dict], swept: float,
                  began: float, uri: str, start_up: float, cores: int) -> list[Figure]:
    runs = _dense_runs(uri, "bench-grid")
    by_trial = {(int(r.data.params["width"]), int(r.data.params["seed"])): r for r in runs}
    # The same models trained on the same data: their test accuracies show that both sides did the same work.
    gap = max(abs(by_trial[(p["width"], p["seed"])].data.metrics["test_acc"] - p["test_acc"]) for p in plain_results)
    widths = sorted({int(p["width"]) for p in points})
    seeds = sorted({int(p["seed"]) for p in points})
    label = (f"{len(points)} MNIST-1D MLP trainings: the quick preset's dense grid scaled down (widths "
             f"{','.join(map(str, widths))} x {len(seeds)} seeds, {points[0]['epochs']} epochs)")
    note = (f"{cores} plain processes started together, each training its share of the grid with one thread "
            f"(data built once, shared through a file; no tracking, no evaluation until the end) against the sweep "
            f"(1 CPU per trial, every run tracked); the first trial started "
            f"{min(r.info.start_time for r in runs) / 1000 - began:.1f}s into the sweep; median training time per "
            f"trial {statistics.median(p['train_time_s'] for p in plain_results):.2f}s plain, "
            f"{statistics.median(r.data.metrics['train_time_s'] for r in runs):.2f}s in the sweep; the largest test "
            f"accuracy difference between a plain and a swept model of the same width and seed {gap:.4f}")
    return [
        Figure(item, label, f"wall time: {cores} plain processes / sweep on {cores} cores, Ray already up",
               plain / swept, plain, swept, "s", target=">= 0.9", note=note),
        Figure(item, label, f"wall time: {cores} plain processes / sweep on {cores} cores including Ray start",
               plain / (swept + start_up), plain, swept + start_up, "s",
               note=f"Ray's start-up ({start_up:.1f}s) is the one measured before the short trials' sweep"),
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
        _as_if_trained(state)
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


def _as_if_trained(state: Mapping[str, torch.Tensor]) -> None:
    """Jitters every float of `state` in place. A fresh model's BatchNorm tensors are constants (weight 1, bias 0,
    mean 0, variance 1) that deflate shrinks to almost nothing; a trained model's are arbitrary floats, and a
    level file is written after training. The dense file stores raw bytes, so its size does not change."""
    import torch

    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in state.values():
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=generator, dtype=t.dtype), alpha=1e-3)


def level_file_parts(path: Path, state: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]
                     ) -> dict[str, int]:
    """Where the bytes of the level file at `path` (of `state` pruned by `masks`) go, so that a missed target
    says what limits it: before deflating, the tensors kept whole (biases, normalisation), the kept weights
    with their index, the pickled names, dtypes and shapes (with the record of the one tensor holding the
    bytes), and torch's legacy header around them; then the tag and CRC, and what deflate saved (negative)."""
    from sdd import checkpoints

    payload = checkpoints.read_level_payload(path)
    stream = io.BytesIO(payload)
    pickles = []  # torch.save's legacy stream: magic number, protocol, system info, the dict, storage keys
    for _ in range(5):
        start = stream.tell()
        for _ in pickletools.genops(stream):  # steps over one pickle's opcodes, building nothing
            pass
        pickles.append(stream.tell() - start)
    tensor_bytes = len(payload) - stream.tell() - 8  # after the pickles: the storage's 8-byte length, its bytes
    whole = sum(t.numel() * t.element_size() for name, t in state.items() if name not in masks)
    return {"whole tensors (biases, normalisation)": whole, "kept weights + index": tensor_bytes - whole,
            "names, dtypes, shapes": pickles[3], "torch's header": sum(pickles) - pickles[3] + 8,
            "tag + CRC": checkpoints.DEFLATED_HEADER_BYTES,
            "saved by deflate": path.stat().st_size - checkpoints.DEFLATED_HEADER_BYTES - len(payload)}

