"""The `prune` and `distill` steps: an iterative pruning chain from a dense parent run.

A chain run is nested under its dense parent; every level is a run nested under the chain holding
that level's weights and mask. The chain logs one point per level (step = level), so its chart in
the MLflow UI is its sparse-double-descent curve. A killed chain continues after its last finished
level, and inside the interrupted level from that level's resume checkpoint.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from dataclasses import dataclass

import torch
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from sdd import faults, lifecycle, models, names, pruning, registry, retraining, tracking
from sdd.checkpoints import check_masks_fit
from sdd.config import DistillConfig, PruneConfig, TrainConfig, chain_hash, from_flat_dict, to_flat_dict
from sdd.dense import StepResult, evaluate_all, log_dataset_inputs, nonzero_counts
from sdd.distillation import Teacher, distillation_loss, load_teacher
from sdd.errors import UsageError
from sdd.measures import activation_entropy, forward_flops, learning_distance
from sdd.phases import LEVEL_PHASES, best_level, entropy_early_stop, it_level_label, pruning_threshold, sdd_phases
from sdd.problem import Problem, build_model, load_problem, resolve_device
from sdd.progress import Progress
from sdd.steps import chain_covers
from sdd.training import converged, cross_entropy, fit

log = logging.getLogger(__name__)

LEVEL_RESUME_ARTIFACT = "level/resume.pt"
# How deep a chain goes is not part of its identity (a finished chain asked for more levels is
# continued), and MLflow params cannot change: the depth is the chain's tag `sdd.levels` (and
# `sdd.target_sparsity` when asked that way), rewritten whenever the chain is deepened.
DEPTH_OPTIONS = ("levels", "target_sparsity")



@dataclass
class Parent:
    run: Run
    config: TrainConfig
    start_artifact: str
    rewind_artifact: str | None


def resolve_parent(client: MlflowClient, cfg: PruneConfig) -> Parent:
    """The dense parent and the checkpoints this chain needs from it, or a UsageError."""
    run = tracking.get_run(client, tracking.parse_run_ref(cfg.parent))
    run_id = run.info.run_id
    if run.data.tags.get("sdd.step") != "train":
        raise UsageError(f"--parent {run_id} is not a dense training run (sdd.step="
                         f"{run.data.tags.get('sdd.step', 'missing')}); pass the run id of an `sdd train` run")
    if run.info.status != "FINISHED":
        raise UsageError(f"--parent {run_id} is {run.info.status}, not FINISHED")
    saved = set(tracking.list_artifacts(client, run_id, "checkpoints"))
    if cfg.start_epoch is None:
        start = "checkpoints/final.pt"
    else:
        start = f"checkpoints/epoch_{cfg.start_epoch}.pt"
    if start not in saved:
        epochs = sorted(int(p.split("_")[1][:-3]) for p in saved if p.startswith("checkpoints/epoch_"))
        raise UsageError(f"--parent {run_id} has no saved epoch {cfg.start_epoch}; saved epochs: "
                         f"{epochs or 'none'} (train with --save-epochs)")
    rewind = None
    if retraining.MODES[cfg.retrain].needs_rewind_weights:
        rewind = "checkpoints/init.pt" if cfg.rewind_step == 0 else f"checkpoints/step_{cfg.rewind_step}.pt"
        if rewind not in saved:
            steps = sorted(int(p.split("_")[1][:-3]) for p in saved if p.startswith("checkpoints/step_"))
            raise UsageError(f"--rewind-step {cfg.rewind_step}: parent {run_id} saved weights only at steps "
                             f"{[0, *steps]} (train with --rewind-step)")
    try:
        config = from_flat_dict(TrainConfig, tracking.load_json_artifact(client, run_id, "config.json"))
    except (OSError, ValueError, TypeError, MlflowException) as err:
        raise UsageError(f"--parent {run_id}: no readable config.json of an sdd training ({err})") from None
    if config.data.val_size == 0:
        # Levels are selected, registered and early-stopped by val_acc; the test set must never stand in.
        raise UsageError(f"--parent {run_id} has no validation split (val_size 0): a chain selects its levels "
                         "by val_acc, never by test accuracy; train the parent with --val-size > 0")
    return Parent(run, config, start, rewind)


def run_prune(cfg: PruneConfig, distill: DistillConfig | None = None, *, tracking_uri: str | None = None,
              extra_tags: dict[str, str] | None = None) -> StepResult:
    """Run (or resume, or reuse) a pruning chain; with `distill`, retrain by distillation.

    The chain goes into its dense parent's experiment, nested under the parent run.
    """
    cfg.validate()
    if distill is not None:
        distill.validate()
    device = resolve_device(cfg.device)
    client = tracking.get_client(tracking_uri)
    parent = resolve_parent(client, cfg)
    exp_id = parent.run.info.experiment_id
    problem = load_problem(parent.config.data, device, run_seed=parent.config.optim.seed)
    teacher = None
    if distill is not None:
        teacher = load_teacher(client, distill.teacher, problem.splits.input_shape, problem.splits.num_classes,
                               device)
    step = "distill" if teacher else "prune"
    config_hash = chain_hash(cfg, parent.run.info.run_id, distill, teacher.run_id if teacher else None)
    m = parent.config.model
    name = f"{step} {cfg.criterion}/{cfg.retrain} w{m.width} " + \
        (f"e{cfg.start_epoch}" if cfg.start_epoch is not None else "final")
    tags = {"sdd.step": step, "sdd.config_hash": config_hash, "sdd.dense_run_id": parent.run.info.run_id,
            "sdd.levels": str(cfg.depth()),
            **({"sdd.target_sparsity": f"{cfg.target_sparsity:g}"} if cfg.target_sparsity is not None else {}),
            "sdd.it_threshold": f"{cfg.it_threshold:g}",
            **(extra_tags or {})}
    if teacher:
        tags.update({"sdd.teacher_uri": teacher.uri, "sdd.teacher_run_id": teacher.run_id})
    lease = lifecycle.acquire(client, exp_id, lifecycle.RunSpec(step, config_hash, name, tags,
                                                                parent_run_id=parent.run.info.run_id),
                              force=cfg.force, extend_finished=lambda run: not chain_covers(cfg, run))
    if lease.reused:
        return StepResult(lease.run_id, True, dict(lease.finished.data.metrics))
    if lease.is_new:
        options = {k: v for k, v in to_flat_dict(cfg).items() if k not in DEPTH_OPTIONS}
        params = {**options, **(to_flat_dict(distill) if distill else {}),
                  "dense_model": m.model, "dense_width": m.width, "dense_depth": m.depth,
                  "dataset": parent.config.data.dataset, "noise": parent.config.data.noise}
        tracking.log_params(client, lease.run_id, params)
        log_dataset_inputs(client, lease.run_id, parent.config.data, problem)
    elif lease.reopened.info.status == "FINISHED":
        log.info("deepening chain %s from %d to %d levels", lease.run_id,
                 int(lease.reopened.data.metrics.get("levels_run", 0)), cfg.depth())
    else:
        log.info("resuming chain %s", lease.run_id)
    with lease.running():
        metrics = Chain(cfg, distill, client, exp_id, lease.run_id, config_hash, parent, problem, teacher).run()
    return StepResult(lease.run_id, False, metrics)


class Chain:
    """The level loop of one chain, with its resume state."""

    def __init__(self, cfg: PruneConfig, distill: DistillConfig | None, client: MlflowClient, exp_id: str,
                 chain_id: str, config_hash: str, parent: Parent, problem: Problem, teacher: Teacher | None) -> None:
        self.cfg, self.distill, self.client, self.exp_id = cfg, distill, client, exp_id
        self.chain_id, self.config_hash, self.parent = chain_id, config_hash, parent
        self.problem, self.teacher = problem, teacher
        self.dense_id = parent.run.info.run_id
        self.levels = cfg.depth()
        self.model = build_model(parent.config.model, problem, parent.config.optim.seed)
        self.weights = models.prunable_weights(self.model)
        self.exclude = {models.output_layer_name(self.model)} if cfg.keep_output_dense else set()
        self.init = {k: v for k, v in tracking.load_state_artifact(client, self.dense_id, "checkpoints/init.pt").items()
                     if k in self.weights}
        self.rewind = (tracking.load_state_artifact(client, self.dense_id, parent.rewind_artifact)
                       if parent.rewind_artifact else None)
        self.mode = retraining.MODES[cfg.retrain]
        self.recipe = self.mode.recipe(parent.config.optim, cfg, parent.config.data.augment)
        same = retraining.same_retraining(parent.config.optim, cfg, parent.config.data.augment)
        if same is not None:
            log.warning("%s retrains exactly as %s would here (lr %g, %s schedule, %d epochs): this chain "
                        "does not tell the two modes apart", cfg.retrain, same, self.recipe.lr, self.recipe.schedule,
                        self.recipe.epochs)
        self.loss_fn = cross_entropy
        if teacher is not None:
            self.loss_fn = distillation_loss(teacher, problem.splits.x_train, distill.alpha, distill.temperature,
                                             parent.config.data.augment)

    # --- records of finished levels -------------------------------------------------------------

    def _finished_levels(self) -> dict[int, Run]:
        """Finished level runs by level."""
        done: dict[int, Run] = {}
        for run in self._level_runs():
            level = int(run.data.tags["sdd.level"])
            if run.info.status == "FINISHED" and level not in done:
                done[level] = run
        return done

    def _level_runs(self) -> list[Run]:
        return tracking.search(self.client, self.exp_id, tags={"sdd.step": "level"}, parent=self.chain_id)

    def _load_level(self, model: torch.nn.Module, run: Run) -> pruning.Masks:
        """Load a level's weights into `model`; a file that does not fit the model is refused."""
        state, masks = tracking.load_sparse_artifact(self.client, run.info.run_id, "level/weights.pt")
        check_masks_fit(masks, models.prunable_weights(model))
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise UsageError(f"level {run.data.tags.get('sdd.level')} of chain {self.chain_id}: "
                             f"level/weights.pt does not fit the model ({str(err).splitlines()[0]})") from None
        return masks

    def _chain_steps(self, key: str) -> set[int]:
        return {m.step for m in self.client.get_metric_history(self.chain_id, key)}

    def run(self) -> dict[str, float]:
        done = self._finished_levels()
        history: list[dict[str, float]] = []
        logged = self._chain_steps("test_acc")
        logger = tracking.MetricLogger(self.client, self.chain_id)

        start = tracking.load_state_artifact(self.client, self.dense_id, self.parent.start_artifact)
        self.model.load_state_dict(start)
        masks = pruning.full_masks(self.weights)
        dense = self._measure(self.model, level_start={k: v.detach().clone() for k, v in self.weights.items()})
        history.append(dense)
        if 0 not in logged:
            logger.log(dense, 0)
        # Resume: replay the finished levels' records, then continue from the last one's weights.
        resumed = 0
        while resumed + 1 in done:
            resumed += 1
            metrics = dict(done[resumed].data.metrics)
            history.append(metrics)
            if resumed not in logged:
                logger.log({k: metrics[k] for k in names.CHAIN_METRICS if k in metrics}, resumed)
        if resumed:
            masks = self._load_level(self.model, done[resumed])
            log.info("%s: levels 1-%d already finished, resuming at level %d", self.chain_id[:8], resumed, resumed + 1)
        # The level a kill interrupted is continued in its own run (`_level` takes it over, from its
        # resume checkpoint if it wrote one); any other unfinished level run is a leftover: KILLED.
        stale = [r for r in self._level_runs() if r.info.status != "FINISHED"]
        interrupted = [r for r in stale if r.data.tags["sdd.level"] == str(resumed + 1)]
        for run in stale:
            if run.data.tags["sdd.level"] != str(resumed + 1):
                tracking.mark_killed(self.client, run)
        stop = self._early_stop(history)
        started = time.monotonic()
        level = resumed + 1
        self.progress = Progress(self.levels * self.recipe.epochs, f"{self.chain_id[:8]} levels",
                                 initial=resumed * self.recipe.epochs)
        try:
            while stop is None and level <= self.levels:
                metrics, masks = self._level(level, masks, logger)
                history.append(metrics)
                stop = self._early_stop(history)
                level += 1
        finally:
            self.progress.close()
        if level == resumed + 1:  # stopped early before the interrupted level: it is not continued
            for run in interrupted:
                tracking.mark_killed(self.client, run)
        epochs_spent = (len(history) - 1) * self.recipe.epochs
        logger.flush()
        summary = self._summarise(history, stop, epochs_spent, time.monotonic() - started)
        return summary

    def _early_stop(self, history: list[dict[str, float]]):
        if self.cfg.early_stop != "entropy" or len(history) < 2:
            return None
        return entropy_early_stop([h.get("entropy") for h in history],
                                  [h["val_acc"] for h in history],
                                  self.cfg.entropy_drop, self.cfg.acc_tolerance)

    # --- one level -------------------------------------------------------------------------------

    def _level(self, level: int, masks, logger: tracking.MetricLogger):
        cfg, model, weights = self.cfg, self.model, self.weights
        t0 = time.monotonic()
        seed = retraining.level_seed(cfg.seed, level)
        generator = torch.Generator(device=self.problem.device).manual_seed(seed)
        scores = pruning.CRITERIA[cfg.criterion](pruning.ScoringInputs(
            model, weights, generator, lambda: self._gradient_batches(generator)))
        masks = pruning.prune_masks(scores, masks, cfg.rate, cfg.scope, exclude=self.exclude)
        float_masks = pruning.as_float_masks(masks, weights)
        pruning.apply_masks(weights, float_masks)
        after_prune = evaluate_all(model, self.problem, self.init)
        reinit_seed = retraining.reinit_seed(self.parent.config.optim.seed, cfg.seed, level)
        start = self.mode.start(self.rewind, lambda: build_model(self.parent.config.model, self.problem,
                                                                  seed=reinit_seed).state_dict())
        if start is not None:
            model.load_state_dict(start)
        pruning.apply_masks(weights, float_masks)
        level_start = {k: v.detach().clone() for k, v in weights.items()}

        level_tags = {"sdd.step": "level", "sdd.level": str(level), "sdd.dense_run_id": self.dense_id,
                      "sdd.chain_run_id": self.chain_id, "sdd.config_hash": f"{self.config_hash}-{level}"}
        # Pruning above is deterministic, so it re-creates an interrupted level's masks and start; its
        # run is continued, and its checkpoint restores the retraining where it stopped.
        lease = lifecycle.acquire(self.client, self.exp_id, lifecycle.RunSpec(
            "level", level_tags["sdd.config_hash"], f"level {level}", level_tags, parent_run_id=self.chain_id,
            scope_parent=self.chain_id, adopt_project_run=False, resume_artifact=LEVEL_RESUME_ARTIFACT))
        level_id = lease.run_id
        logged = -1 if lease.is_new else tracking.last_logged_step(self.client, level_id)
        level_logger = tracking.MetricLogger(self.client, level_id, skip_through=logged)
        every = cfg.eval_every

        def on_epoch(epoch: int, loss: float) -> None:
            if every and epoch % every == 0 and epoch != self.recipe.epochs:
                level_logger.log(evaluate_all(model, self.problem, self.init), epoch)
            faults.reach(f"level-{level}-epoch-{epoch}", level_id)
            self.progress.update((level - 1) * self.recipe.epochs + epoch, level=f"{level}/{self.levels}", loss=loss)

        def snapshot(state: dict) -> None:
            level_logger.flush()  # metrics first: a continued level skips the steps already logged
            tracking.log_training_state(self.client, level_id, state, LEVEL_RESUME_ARTIFACT)
            faults.reach(f"level-{level}-saved-{state['epoch']}", level_id)

        with lease.running() as resume:
            fitted = fit(model, self.problem.splits.x_train, self.problem.splits.y_train, self.recipe,
                         masks=float_masks, weights=weights, loss_fn=self.loss_fn, generator=generator,
                         on_epoch=on_epoch, resume=resume, snapshot=snapshot, snapshot_every=cfg.resume_every,
                         snapshot_epochs=faults.snapshot_epochs(), pad_fill=self.problem.splits.black)
            metrics = self._measure(model, level_start)
            metrics["converged"] = float(converged(fitted.epoch_losses, metrics.get("train_acc")))
            self.client.set_tag(level_id, "sdd.converged", "true" if metrics["converged"] else "false")
            metrics.update({f"pruned_{k}": after_prune[k] for k in ("train_acc", "val_acc", "test_acc")
                            if k in after_prune})
            metrics["level_time_s"] = time.monotonic() - t0
            level_logger.log(metrics, self.recipe.epochs)  # a level run's x axis is its retraining epoch
            level_logger.flush()
            tracking.log_sparse_state(self.client, level_id, model.state_dict(), masks, "level/weights.pt")
        logger.log({k: metrics[k] for k in names.CHAIN_METRICS if k in metrics}, level)
        logger.flush()
        faults.reach(f"level-{level}-done", level_id)
        log.info("%s level %d/%d: sparsity %.4f test_acc %.4f (pruned %.4f) noisy-fit %s (%.1fs)",
                 self.chain_id[:8], level, self.levels, metrics["sparsity"], metrics["test_acc"],
                 metrics["pruned_test_acc"], f"{metrics.get('train_acc_noisy', float('nan')):.3f}",
                 metrics["level_time_s"])
        return metrics, masks

    def _gradient_batches(self, generator: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The training batches a data-dependent criterion scores on, in the dense run's batch size."""
        x, y = self.problem.splits.x_train, self.problem.splits.y_train
        batch = self.parent.config.optim.batch_size or len(x)
        order = torch.randperm(len(x), device=x.device, generator=generator)
        return [(x[order[i:i + batch]], y[order[i:i + batch]])
                for i in range(0, min(len(x), batch * self.cfg.gradient_batches), batch)]

    def _measure(self, model: torch.nn.Module, level_start: dict[str, torch.Tensor]) -> dict[str, float]:
        metrics = evaluate_all(model, self.problem, self.init)
        metrics["learning_distance_level"] = learning_distance(self.weights, level_start)
        metrics.update(activation_entropy(model, self.problem.splits.x_train))
        metrics.update(nonzero_counts(model))
        metrics["flops_per_sample"] = forward_flops(model, self.problem.splits.x_train[:1])
        report = pruning.sparsity_report({k: v.detach() for k, v in self.weights.items()})
        metrics.update({f"sparsity/{name}": s for name, s in report["per_layer"].items()})
        return metrics

    # --- end of chain ----------------------------------------------------------------------------

    def _summarise(self, history: list[dict[str, float]], stop, epochs_spent: int, seconds: float) -> dict[str, float]:
        cfg, client, chain_id = self.cfg, self.client, self.chain_id
        test = [h["test_acc"] for h in history]
        noisy = [h.get("train_acc_noisy", 1.0) for h in history]
        it = pruning_threshold(noisy, cfg.it_threshold)
        phases = sdd_phases(test, noisy, cfg.it_threshold)
        tags = {"sdd.it_level": it_level_label(noisy, cfg.it_threshold),
                "sdd.phases": ",".join(phases)}
        for phase in LEVEL_PHASES:
            levels = [i for i, p in enumerate(phases) if p == phase]
            if levels:
                tags[f"sdd.phase.{phase}"] = f"{levels[0]}-{levels[-1]}"
        # Compute spent against the full schedule: levels not run are estimated from the dense
        # model's FLOPs scaled by the fraction of weights that level would keep.
        n_train, epochs = len(self.problem.splits.x_train), self.recipe.epochs
        spent = [3 * h["flops_per_sample"] * n_train * epochs for h in history[1:]]
        skipped = [3 * history[0]["flops_per_sample"] * (1 - cfg.rate) ** lv * n_train * epochs
                   for lv in range(len(history), self.levels + 1)]
        summary = {"it_level": float(it) if it is not None else -1.0, "levels_run": float(len(history) - 1),
                   "epochs_spent": float(epochs_spent), "epochs_full": float(self.levels * epochs),
                   "train_flops_spent": sum(spent), "train_flops_full": sum(spent) + sum(skipped),
                   "chain_time_s": seconds}
        if stop is not None:
            tags.update({"sdd.early_stop_level": str(stop.level), "sdd.early_stop_reason": stop.reason})
        self.client.log_batch(chain_id, tags=[tracking.RunTag(k, v) for k, v in tags.items()])
        table = io.StringIO()
        writer = csv.writer(table)
        writer.writerow(["level", "sparsity", "nonzero_params", "test_acc", "val_acc", "train_acc_noisy",
                         "entropy", "phase"])
        for i, (h, phase) in enumerate(zip(history, phases)):
            writer.writerow([i, h.get("sparsity"), h.get("nonzero_params"), h.get("test_acc"), h.get("val_acc"),
                             h.get("train_acc_noisy"), h.get("entropy"), phase])
        client.log_text(chain_id, table.getvalue(), "phases.csv")
        best = best_level([h.get("val_acc") for h in history], [h["sparsity"] for h in history])
        if best is not None:
            summary.update({"best_level": float(best), "best_val_acc": history[best].get("val_acc", float("nan")),
                            "best_test_acc": history[best]["test_acc"], "best_sparsity": history[best]["sparsity"]})
            if cfg.register:
                self._register(best, history[best])
        logger = tracking.MetricLogger(client, chain_id)
        logger.log(summary, len(history) - 1)
        logger.flush()
        return {**history[-1], **summary}

    def _register(self, level: int, metrics: dict[str, float]) -> None:
        run = next(r for lv, r in self._finished_levels().items() if lv == level)
        model = build_model(self.parent.config.model, self.problem, self.parent.config.optim.seed)
        self._load_level(model, run)
        registry.register_best_sparse(self.client, model, level_run=run, dense_run_id=self.dense_id,
                                      dataset=self.parent.config.data.dataset,
                                      model_name=self.parent.config.model.model, metrics=metrics)
