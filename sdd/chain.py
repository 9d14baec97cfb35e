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
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from sdd import faults, lifecycle, models, names, pruning, registry, retraining, tracking
from sdd.checkpoints import check_masks_fit
from sdd.config import DistillConfig, PruneConfig, TrainConfig, chain_hash, from_flat_dict, to_flat_dict
from sdd.dense import StepResult, check_packable, evaluate_all, log_dataset_inputs, nonzero_counts
from sdd.distillation import Teacher, distillation_loss, load_teacher
from sdd.errors import UsageError
from sdd.measures import activation_entropy, forward_flops, learning_distance
from sdd.packs import fit_pack
from sdd.phases import LEVEL_PHASES, best_level, entropy_early_stop, it_level_label, pruning_threshold, sdd_phases
from sdd.problem import Problem, build_model, load_problem, resolve_device
from sdd.progress import Progress
from sdd.steps import chain_covers
from sdd.training import FitResult, TrainingDiverged, converged, cross_entropy, fit

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


@dataclass
class LevelWork:
    """One level of one chain between its pruning and its run's end."""

    chain: Chain
    level: int
    run_id: str
    masks: pruning.Masks
    float_masks: dict[str, torch.Tensor]
    generator: torch.Generator
    after_prune: dict[str, float]
    level_start: dict[str, torch.Tensor]
    logger: tracking.MetricLogger
    resume: dict | None
    started: float
    metrics: dict[str, float] = field(default_factory=dict)


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
    (outcome,) = run_prune_pack([cfg], distill, tracking_uri=tracking_uri, extra_tags=[extra_tags or {}])
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def run_prune_pack(cfgs: Sequence[PruneConfig], distill: DistillConfig | None = None, *,
                   tracking_uri: str | None = None,
                   extra_tags: Sequence[dict[str, str]] | None = None) -> list[StepResult | TrainingDiverged]:
    """Run chains that differ only in their seed and dense parent (the parent of that seed) as one seed
    pack: every level of every chain is pruned on its own (its own global masks), and the levels are
    retrained together (`sdd.packs.fit_pack`). Each chain and level is its own run, as `run_prune`
    makes it; chains stopped early drop out, levels resumed from different epochs retrain apart.

    Returns each chain's StepResult, or the TrainingDiverged that failed it alone (as pruning it alone
    would have). Any other error fails every chain not yet finished, and carries their run ids in
    `sdd_run_ids` (one per config, None for a config that got no run).
    """
    for cfg in cfgs:
        cfg.validate()
    if distill is not None:
        distill.validate()
    check_chains_packable(cfgs)
    device = resolve_device(cfgs[0].device)
    client = tracking.get_client(tracking_uri)
    parents = [resolve_parent(client, cfg) for cfg in cfgs]
    check_packable([parent.config for parent in parents])
    tags = list(extra_tags or [{}] * len(cfgs))
    run_ids: list[str | None] = [None] * len(cfgs)
    results: list[StepResult | TrainingDiverged | None] = [None] * len(cfgs)
    runs: dict[int, ExitStack] = {}  # the open run of each chain still pruning
    chains: dict[int, Chain] = {}
    levels: dict[int, ExitStack] = {}  # the open level run of each chain retraining
    try:
        # Always in parent order (each parent is one seed's run), so two processes packing the same chains
        # never wait on each other.
        for i in sorted(range(len(cfgs)), key=lambda i: parents[i].run.info.run_id):
            runs[i] = ExitStack()
            lease, chain = _open_chain(cfgs[i], distill, client, device, parents[i], tags[i], runs[i])
            run_ids[i] = lease.run_id
            if chain is None:
                results[i] = StepResult(lease.run_id, True, dict(lease.finished.data.metrics))
                runs.pop(i).close()
            else:
                chains[i] = chain
                chain.prepare()
        while any(chain.pending() for chain in chains.values()):
            works = {}
            for i, chain in chains.items():
                if chain.pending():
                    levels[i] = ExitStack()
                    works[i] = chain.begin_level(levels[i])
            for i, fitted in zip(list(works), _fit_levels(list(works.values()))):
                work = works[i]
                if isinstance(fitted, TrainingDiverged):  # this chain fails, as it would alone
                    for stack in (levels.pop(i), runs.pop(i)):
                        stack.__exit__(type(fitted), fitted, fitted.__traceback__)
                    chains.pop(i).progress.close()
                    results[i] = fitted
                    continue
                work.chain.record_level(work, fitted)
                levels.pop(i).close()  # the level run FINISHED
                work.chain.close_level(work)
        for i, chain in list(chains.items()):
            chain.progress.close()
            results[i] = StepResult(chain.chain_id, False, chain.finish())
            chains.pop(i)
            runs.pop(i).close()  # the chain run FINISHED
    except BaseException as err:
        for stack in [*levels.values(), *runs.values()]:
            stack.__exit__(type(err), err, err.__traceback__)
        for chain in chains.values():
            if chain.progress is not None:  # made by prepare
                chain.progress.close()
        err.sdd_run_ids = run_ids  # type: ignore[attr-defined]
        raise
    return results  # type: ignore[return-value]


def check_chains_packable(cfgs: Sequence[PruneConfig]) -> None:
    """Chains share one pack only if they differ in nothing but their seed and dense parent."""
    def rest(cfg: PruneConfig) -> dict:
        flat = to_flat_dict(cfg)
        return {k: v for k, v in flat.items() if k not in ("seed", "parent")}
    reference = rest(cfgs[0])
    for cfg in cfgs[1:]:
        other = rest(cfg)
        differ = sorted(k for k in reference if reference[k] != other.get(k))
        if differ:
            raise UsageError(f"a seed pack's chains may differ only in seed and parent; these differ in "
                             f"{', '.join(differ)}")
    seeds = [cfg.seed for cfg in cfgs]
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"a seed pack needs distinct seeds, got {seeds}")


def _fit_levels(works: list[LevelWork]) -> list[FitResult | TrainingDiverged]:
    """Retrain the levels of several chains: those continuing from the same epoch together as a seed pack,
    a level alone by `fit`. A level whose loss diverged gets its TrainingDiverged; the others train on."""
    groups: dict[int, list[int]] = {}
    for i, work in enumerate(works):
        groups.setdefault(int(work.resume["epoch"]) if work.resume else 0, []).append(i)
    fitted: list[FitResult | TrainingDiverged | None] = [None] * len(works)
    for members in groups.values():
        if len(members) == 1:
            work = works[members[0]]
            try:
                fitted[members[0]] = work.chain.fit_level(work)
            except TrainingDiverged as err:
                fitted[members[0]] = err
            continue
        group = [works[i] for i in members]
        first = group[0].chain
        x = first.problem.splits.x_train
        if any(not torch.equal(w.chain.problem.splits.x_train, x) for w in group[1:]):
            raise ValueError("seed pack members must share their training inputs")
        members_ids = ",".join(w.run_id for w in group)
        for work in group:
            work.chain.client.log_batch(work.run_id, tags=[tracking.RunTag("sdd.pack_size", str(len(group))),
                                                           tracking.RunTag("sdd.pack_runs", members_ids)])
        results = fit_pack(
            [w.chain.model for w in group], x, [w.chain.problem.splits.y_train for w in group], first.recipe,
            masks=[w.float_masks for w in group], loss_fns=[w.chain.loss_fn for w in group],
            generators=[w.generator for w in group],
            on_epochs=[lambda epoch, loss, w=w: w.chain.on_level_epoch(w, epoch, loss) for w in group],
            snapshots=[lambda state, w=w: w.chain.level_snapshot(w, state) for w in group],
            resumes=[w.resume for w in group] if group[0].resume else None,
            snapshot_every=first.cfg.resume_every, snapshot_epochs=faults.snapshot_epochs(),
            pad_fill=first.problem.splits.black)
        for i, result in zip(members, results):
            fitted[i] = result
    return fitted  # type: ignore[return-value]


def _open_chain(cfg: PruneConfig, distill: DistillConfig | None, client: MlflowClient, device: torch.device,
                parent: Parent, extra_tags: dict[str, str], stack: ExitStack) -> tuple[lifecycle.Lease, Chain | None]:
    """The chain's run (new, continued or reused) and, unless reused, its level loop, the run open in
    `stack` (FINISHED when it closes, FAILED if it closes on an exception)."""
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
            **extra_tags}
    if teacher:
        tags.update({"sdd.teacher_uri": teacher.uri, "sdd.teacher_run_id": teacher.run_id})
    lease = lifecycle.acquire(client, exp_id, lifecycle.RunSpec(step, config_hash, name, tags,
                                                                parent_run_id=parent.run.info.run_id),
                              force=cfg.force, extend_finished=lambda run: not chain_covers(cfg, run))
    if lease.reused:
        return lease, None
    stack.enter_context(lease.running())
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
    return lease, Chain(cfg, distill, client, exp_id, lease.run_id, config_hash, parent, problem, teacher)


class Chain:
    """The level loop of one chain, with its resume state: `prepare`, then while `pending`: `begin_level`,
    retrain (`fit_level`, or with other chains in `run_prune_pack`), `record_level`, `close_level`; then
    `finish`."""

    def __init__(self, cfg: PruneConfig, distill: DistillConfig | None, client: MlflowClient, exp_id: str,
                 chain_id: str, config_hash: str, parent: Parent, problem: Problem, teacher: Teacher | None) -> None:
        self.cfg, self.distill, self.client, self.exp_id = cfg, distill, client, exp_id
        self.chain_id, self.config_hash, self.parent = chain_id, config_hash, parent
        self.problem, self.teacher = problem, teacher
        self.dense_id = parent.run.info.run_id
        self.levels = cfg.depth()
        self.progress: Progress | None = None
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

    def prepare(self) -> None:
        """Replay the finished levels (a resumed chain) and stand at the next level to run."""
        done = self._finished_levels()
        self.history: list[dict[str, float]] = []
        logged = self._chain_steps("test_acc")
        self.logger = tracking.MetricLogger(self.client, self.chain_id)

        start = tracking.load_state_artifact(self.client, self.dense_id, self.parent.start_artifact)
        self.model.load_state_dict(start)
        self.masks = pruning.full_masks(self.weights)
        dense = self._measure(self.model, level_start={k: v.detach().clone() for k, v in self.weights.items()})
        self.history.append(dense)
        if 0 not in logged:
            self.logger.log(dense, 0)
        # Resume: replay the finished levels' records, then continue from the last one's weights.
        resumed = 0
        while resumed + 1 in done:
            resumed += 1
            metrics = dict(done[resumed].data.metrics)
            self.history.append(metrics)
            if resumed not in logged:
                self.logger.log({k: metrics[k] for k in names.CHAIN_METRICS if k in metrics}, resumed)
        if resumed:
            self.masks = self._load_level(self.model, done[resumed])
            log.info("%s: levels 1-%d already finished, resuming at level %d", self.chain_id[:8], resumed, resumed + 1)
        # The level a kill interrupted is continued in its own run (`begin_level` takes it over, from its
        # resume checkpoint if it wrote one); any other unfinished level run is a leftover: KILLED.
        stale = [r for r in self._level_runs() if r.info.status != "FINISHED"]
        self.interrupted = [r for r in stale if r.data.tags["sdd.level"] == str(resumed + 1)]
        for run in stale:
            if run.data.tags["sdd.level"] != str(resumed + 1):
                tracking.mark_killed(self.client, run)
        self.resumed = resumed
        self.stop = self._early_stop(self.history)
        self.started = time.monotonic()
        self.level = resumed + 1
        self.progress = Progress(self.levels * self.recipe.epochs, f"{self.chain_id[:8]} levels",
                                 initial=resumed * self.recipe.epochs)

    def pending(self) -> bool:
        """Whether a level is left to run (neither the depth nor the early stop reached)."""
        return self.stop is None and self.level <= self.levels

    def finish(self) -> dict[str, float]:
        if self.level == self.resumed + 1:  # stopped early before the interrupted level: it is not continued
            for run in self.interrupted:
                tracking.mark_killed(self.client, run)
        epochs_spent = (len(self.history) - 1) * self.recipe.epochs
        self.logger.flush()
        return self._summarise(self.history, self.stop, epochs_spent, time.monotonic() - self.started)

    def _early_stop(self, history: list[dict[str, float]]):
        if self.cfg.early_stop != "entropy" or len(history) < 2:
            return None
        return entropy_early_stop([h.get("entropy") for h in history],
                                  [h["val_acc"] for h in history],
                                  self.cfg.entropy_drop, self.cfg.acc_tolerance)

    # --- one level -------------------------------------------------------------------------------

    def begin_level(self, stack: ExitStack) -> LevelWork:
        """Prune for the next level and open its run (in `stack`: FINISHED when the stack closes, FAILED
        if it closes on an exception); returns what its retraining needs."""
        cfg, model, weights, level = self.cfg, self.model, self.weights, self.level
        t0 = time.monotonic()
        seed = retraining.level_seed(cfg.seed, level)
        generator = torch.Generator(device=self.problem.device).manual_seed(seed)
        scores = pruning.CRITERIA[cfg.criterion](pruning.ScoringInputs(
            model, weights, generator, lambda: self._gradient_batches(generator)))
        masks = pruning.prune_masks(scores, self.masks, cfg.rate, cfg.scope, exclude=self.exclude)
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
        logged = -1 if lease.is_new else tracking.last_logged_step(self.client, lease.run_id)
        resume = stack.enter_context(lease.running())
        return LevelWork(self, level, lease.run_id, masks, float_masks, generator, after_prune, level_start,
                         tracking.MetricLogger(self.client, lease.run_id, skip_through=logged), resume, t0)

    def on_level_epoch(self, work: LevelWork, epoch: int, loss: float) -> None:
        every = self.cfg.eval_every
        if every and epoch % every == 0 and epoch != self.recipe.epochs:
            work.logger.log(evaluate_all(self.model, self.problem, self.init), epoch)
        faults.reach(f"level-{work.level}-epoch-{epoch}", work.run_id)
        self.progress.update((work.level - 1) * self.recipe.epochs + epoch, level=f"{work.level}/{self.levels}",
                             loss=loss)

    def level_snapshot(self, work: LevelWork, state: dict) -> None:
        work.logger.flush()  # metrics first: a continued level skips the steps already logged
        tracking.log_training_state(self.client, work.run_id, state, LEVEL_RESUME_ARTIFACT)
        faults.reach(f"level-{work.level}-saved-{state['epoch']}", work.run_id)

    def fit_level(self, work: LevelWork) -> FitResult:
        """Retrain this chain's level alone (a seed pack retrains several: `run_prune_pack`)."""
        return fit(self.model, self.problem.splits.x_train, self.problem.splits.y_train, self.recipe,
                   masks=work.float_masks, weights=self.weights, loss_fn=self.loss_fn, generator=work.generator,
                   on_epoch=lambda epoch, loss: self.on_level_epoch(work, epoch, loss), resume=work.resume,
                   snapshot=lambda state: self.level_snapshot(work, state), snapshot_every=self.cfg.resume_every,
                   snapshot_epochs=faults.snapshot_epochs(), pad_fill=self.problem.splits.black)

    def record_level(self, work: LevelWork, fitted: FitResult) -> None:
        """The retrained level's measures, metrics and weights, into its run (still open)."""
        metrics = self._measure(self.model, work.level_start)
        metrics["converged"] = float(converged(fitted.epoch_losses, metrics.get("train_acc")))
        self.client.set_tag(work.run_id, "sdd.converged", "true" if metrics["converged"] else "false")
        metrics.update({f"pruned_{k}": work.after_prune[k] for k in ("train_acc", "val_acc", "test_acc")
                        if k in work.after_prune})
        metrics["level_time_s"] = time.monotonic() - work.started
        work.logger.log(metrics, self.recipe.epochs)  # a level run's x axis is its retraining epoch
        work.logger.flush()
        tracking.log_sparse_state(self.client, work.run_id, self.model.state_dict(), work.masks, "level/weights.pt")
        work.metrics = metrics

    def close_level(self, work: LevelWork) -> None:
        """After the level's run finished: the chain's point for it, and on to the next level."""
        metrics, level = work.metrics, work.level
        self.logger.log({k: metrics[k] for k in names.CHAIN_METRICS if k in metrics}, level)
        self.logger.flush()
        faults.reach(f"level-{level}-done", work.run_id)
        log.info("%s level %d/%d: sparsity %.4f test_acc %.4f (pruned %.4f) noisy-fit %s (%.1fs)",
                 self.chain_id[:8], level, self.levels, metrics["sparsity"], metrics["test_acc"],
                 metrics["pruned_test_acc"], f"{metrics.get('train_acc_noisy', float('nan')):.3f}",
                 metrics["level_time_s"])
        self.masks = work.masks
        self.history.append(metrics)
        self.stop = self._early_stop(self.history)
        self.level += 1

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
