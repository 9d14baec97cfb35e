"""The `train` step: one dense model, tracked as one MLflow run with its checkpoints and model."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
from mlflow.entities import RunTag

from sdd import faults, lifecycle, models, tracking
from sdd.config import DataConfig, TrainConfig, to_flat_dict, train_hash
from sdd.distillation import Teacher, distillation_loss, load_teacher
from sdd.errors import UsageError
from sdd.measures import activation_entropy, learning_distance, split_metrics
from sdd.packs import fit_pack
from sdd.problem import Problem, build_model, load_problem, resolve_device
from sdd.progress import Progress
from sdd.training import FitResult, Recipe, TrainingDiverged, converged, cross_entropy, fit

log = logging.getLogger(__name__)

RESUME_ARTIFACT = "checkpoints/resume.pt"


@dataclass
class StepResult:
    run_id: str
    reused: bool
    metrics: dict[str, float] = field(default_factory=dict)


def nonzero_counts(model: torch.nn.Module) -> dict[str, float]:
    """`nonzero_params` = nonzero prunable weights + every other parameter; `sparsity` over prunable weights.

    One definition for dense and pruned models, so both share the nonzero-parameter axis.
    """
    prunable = models.prunable_weights(model)
    names = {id(p) for p in prunable.values()}
    total = sum(p.numel() for p in prunable.values())
    nonzero = sum(int(torch.count_nonzero(p)) for p in prunable.values())
    others = sum(p.numel() for p in model.parameters() if id(p) not in names)
    return {"nonzero_params": float(nonzero + others), "sparsity": 1.0 - nonzero / max(1, total)}


def evaluate_all(model: torch.nn.Module, problem: Problem, init: dict[str, torch.Tensor]) -> dict[str, float]:
    metrics = split_metrics(model, problem.splits, problem.noisy_mask)
    metrics["learning_distance"] = learning_distance(models.prunable_weights(model), init)
    return metrics


def log_dataset_inputs(client, run_id: str, data: DataConfig, problem: Problem) -> None:
    """The run's splits as MLflow dataset inputs: generated (with its generator arguments) or read from
    `data_dir`; the training split carries the labels it was trained on, noise included."""
    generated = data.dataset == "mnist1d"
    source = {key: value for key, value in to_flat_dict(data).items()
              if key not in ("noise", "noise_kind", "noise_seed", "val_noise", "augment")
              and (generated or key != "data_dir")}
    if generated:
        source["generator"] = "mnist1d.transform, one stream per split (sdd.data)"
    splits = problem.splits
    noise = f"{data.noise_kind}{data.noise:g}-seed{problem.noise_seed}" if data.noise else "clean"
    val_noise = f"-{noise}" if data.val_noise and data.noise else ""
    tracking.log_datasets(client, run_id, "code" if generated else "local",
                          {"tags": source} if generated else {"uri": data.data_dir, **source}, [
        (f"{data.dataset}-train-{noise}", "training", splits.y_train),
        (f"{data.dataset}-validation{val_noise}", "validation", splits.y_val),
        (f"{data.dataset}-test", "test", splits.y_test)])


def run_train(cfg: TrainConfig, *, tracking_uri: str | None = None, experiment: str | None = None,
              parent_run_id: str | None = None, extra_tags: dict[str, str] | None = None) -> StepResult:
    """Train one dense model, or return the finished run that already holds this config.

    `tracking_uri` defaults to `sdd.tracking.tracking_uri()`; `experiment` is a name (default: see
    `sdd.tracking.experiment_id`); `parent_run_id` nests the run (e.g. under a sweep stage).
    """
    (outcome,) = run_train_pack([cfg], tracking_uri=tracking_uri, experiment=experiment,
                                parent_run_id=parent_run_id, extra_tags=[extra_tags or {}])
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def run_train_pack(cfgs: Sequence[TrainConfig], *, tracking_uri: str | None = None, experiment: str | None = None,
                   parent_run_id: str | None = None,
                   extra_tags: Sequence[dict[str, str]] | None = None) -> list[StepResult | TrainingDiverged]:
    """Train the dense models of configs that differ only in their seed as one seed pack
    (`sdd.packs.fit_pack`): each one is its own MLflow run (with its `extra_tags`), exactly as
    `run_train` would make it, reused when finished and continued from its own resume checkpoint when
    a process died. Members that resume from different epochs train in packs of their own (one alone
    trains by `fit`).

    Returns each config's StepResult, or the TrainingDiverged that failed its run alone (as training it
    alone would have). Any other error fails every run not yet finished, and carries their run ids in
    `sdd_run_ids` (one per config, None for a config that got no run).
    """
    for cfg in cfgs:
        cfg.validate()
    check_packable(cfgs)
    first = cfgs[0]
    device = resolve_device(first.device)
    client = tracking.get_client(tracking_uri)
    exp_id = tracking.experiment_id(client, experiment)
    teacher: Teacher | None = None
    problems = [load_problem(cfg.data, device, run_seed=cfg.optim.seed) for cfg in cfgs]
    if first.distill.teacher:
        teacher = load_teacher(client, first.distill.teacher, problems[0].splits.input_shape,
                               problems[0].splits.num_classes, device)
    tags = list(extra_tags or [{}] * len(cfgs))
    leases: list[lifecycle.Lease | None] = [None] * len(cfgs)
    runs: dict[int, ExitStack] = {}  # the open run of each config still training
    try:
        # Always in config-hash order, so two processes packing the same seeds never wait on each other.
        resumes = {}
        for i in sorted(range(len(cfgs)), key=lambda i: train_hash(cfgs[i], teacher.run_id if teacher else None)):
            lease = leases[i] = _lease(cfgs[i], client, exp_id, problems[i], teacher, parent_run_id, tags[i])
            if not lease.reused:
                runs[i] = ExitStack()
                resumes[i] = runs[i].enter_context(lease.running())
        results: list[StepResult | TrainingDiverged | None] = [
            StepResult(lease.run_id, True, dict(lease.finished.data.metrics)) if lease.reused else None
            for lease in leases]
        groups: dict[int, list[int]] = {}
        for i in sorted(runs):
            groups.setdefault(int(resumes[i]["epoch"]) if resumes[i] else 0, []).append(i)
        for members in groups.values():
            trained = _train([_DenseRun(cfgs[i], client, leases[i].run_id, problems[i], teacher, resumes[i])
                              for i in members])
            for i, outcome in zip(members, trained):
                stack = runs.pop(i)
                if isinstance(outcome, TrainingDiverged):
                    stack.__exit__(type(outcome), outcome, outcome.__traceback__)  # this run FAILED, with why
                    results[i] = outcome
                else:
                    stack.close()  # FINISHED
                    results[i] = StepResult(leases[i].run_id, False, outcome)
    except BaseException as err:
        for stack in runs.values():
            stack.__exit__(type(err), err, err.__traceback__)
        err.sdd_run_ids = [lease.run_id if lease else None for lease in leases]  # type: ignore[attr-defined]
        raise
    return results  # type: ignore[return-value]


def check_packable(cfgs: Sequence[TrainConfig]) -> None:
    """Configs share one pack only if they differ in nothing but their seed (which also draws the noise)
    and in what does not change a run (its hash leaves out e.g. resume_every: a reused dense parent may
    have been trained with another)."""
    if not cfgs:
        raise ValueError("no configs to train")

    def without_seed(cfg: TrainConfig) -> dict:
        flat = to_flat_dict(cfg, hashed_only=True)
        flat.pop("seed")
        return flat
    reference = without_seed(cfgs[0])
    for cfg in cfgs[1:]:
        other = without_seed(cfg)
        differ = sorted(k for k in reference if reference[k] != other.get(k))
        if differ:
            raise UsageError(f"a seed pack's configs may differ only in seed; these differ in {', '.join(differ)}")
    seeds = [cfg.optim.seed for cfg in cfgs]
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"a seed pack needs distinct seeds, got {seeds}")


def _lease(cfg: TrainConfig, client, exp_id: str, problem: Problem, teacher: Teacher | None,
           parent_run_id: str | None, extra_tags: dict[str, str] | None) -> lifecycle.Lease:
    config_hash = train_hash(cfg, teacher.run_id if teacher else None)
    m = cfg.model
    name = f"{cfg.data.dataset}-{m.model}-w{m.width}" + (f"-d{m.depth}" if m.depth != 1 else "") \
        + f"-n{cfg.data.noise:g}-s{cfg.optim.seed}"
    # The params hold noise_seed as configured (None: follow seed); the tag holds the seed drawn from.
    tags = {"sdd.step": "train", "sdd.config_hash": config_hash, "sdd.noise_seed": str(problem.noise_seed),
            **(extra_tags or {})}
    if teacher:
        tags.update({"sdd.teacher_uri": teacher.uri, "sdd.teacher_run_id": teacher.run_id})
    # A killed or failed run of this config is continued, not duplicated: from its last resume
    # checkpoint, or from the start inside the same run (the metrics it logged are not logged twice).
    return lifecycle.acquire(client, exp_id, lifecycle.RunSpec(
        "train", config_hash, name, tags, parent_run_id=parent_run_id, resume_artifact=RESUME_ARTIFACT),
        force=cfg.force)


class _DenseRun:
    """One dense run's tracking around the training loop: what it logs before, during and after `fit`."""

    def __init__(self, cfg: TrainConfig, client, run_id: str, problem: Problem, teacher: Teacher | None,
                 resume: dict | None) -> None:
        self.cfg, self.client, self.run_id, self.problem, self.resume = cfg, client, run_id, problem, resume
        self.model = build_model(cfg.model, problem, cfg.optim.seed)
        self.init = {k: v.detach().clone() for k, v in models.prunable_weights(self.model).items()}
        # A continued run re-computes steps it may already have logged before it stopped.
        self.logger = tracking.MetricLogger(client, run_id, skip_through=tracking.last_logged_step(client, run_id))
        self.loss_fn = cross_entropy
        if teacher is not None:
            self.loss_fn = distillation_loss(teacher, problem.splits.x_train, cfg.distill.alpha,
                                             cfg.distill.temperature, cfg.data.augment)
        self.generator = torch.Generator(device=problem.device).manual_seed(cfg.optim.seed)
        self.eval_epochs = cfg.eval_epochs()
        if resume is None:
            self._log_start()

    def _log_start(self) -> None:
        cfg, client, run_id, problem, model = self.cfg, self.client, self.run_id, self.problem, self.model
        num_params = models.count_params(model)
        tracking.log_params(client, run_id, {**to_flat_dict(cfg), "num_params": num_params})
        # The effective config, exactly; params may hold `mlflow run`'s spelling of the -P values.
        client.log_dict(run_id, to_flat_dict(cfg), "config.json")
        rates = {"wrong_label_rate": problem.wrong_label_rate}
        if cfg.data.val_noise:
            rates["val_wrong_label_rate"] = len(problem.val_noisy_idx) / max(1, len(problem.splits.y_val))
        self.logger.log({"num_params": num_params, **rates}, 0)
        tracking.log_state(client, run_id, {"noisy_idx": problem.noisy_idx.cpu(),
                                             "noisy_labels": problem.splits.y_train.cpu(),
                                             "val_noisy_idx": problem.val_noisy_idx.cpu()}, "noise/noisy_idx.pt")
        log_dataset_inputs(client, run_id, cfg.data, problem)
        tracking.log_state(client, run_id, model.state_dict(), "checkpoints/init.pt")
        self.logger.log({**evaluate_all(model, problem, self.init), **nonzero_counts(model)}, 0)
        if 0 in cfg.save_epochs:
            tracking.log_state(client, run_id, model.state_dict(), "checkpoints/epoch_0.pt")

    def on_step(self, step: int) -> None:
        if step == self.cfg.rewind_step and step > 0:
            tracking.log_state(self.client, self.run_id, self.model.state_dict(), f"checkpoints/step_{step}.pt")

    def on_epoch(self, epoch: int) -> None:
        if epoch in self.eval_epochs and epoch != self.cfg.optim.epochs:  # the final evaluation follows fit()
            self.logger.log(evaluate_all(self.model, self.problem, self.init), epoch)
        if epoch in self.cfg.save_epochs:
            tracking.log_state(self.client, self.run_id, self.model.state_dict(), f"checkpoints/epoch_{epoch}.pt")
        faults.reach(f"train-epoch-{epoch}", self.run_id)

    def snapshot(self, state: dict) -> None:
        self.logger.flush()  # metrics first: a resumed run skips the steps already logged
        tracking.log_training_state(self.client, self.run_id, state, RESUME_ARTIFACT)
        faults.reach(f"train-saved-{state['epoch']}", self.run_id)

    def finish(self, fitted: FitResult, seconds: float) -> dict[str, float]:
        client, run_id, model, problem = self.client, self.run_id, self.model, self.problem
        final = evaluate_all(model, problem, self.init)
        final.update(activation_entropy(model, problem.splits.x_train))
        final.update(nonzero_counts(model))
        final["train_time_s"] = seconds
        final["steps"] = fitted.steps
        final["converged"] = float(converged(fitted.epoch_losses, final.get("train_acc")))
        self.logger.log(final, self.cfg.optim.epochs)
        client.set_tag(run_id, "sdd.converged", "true" if final["converged"] else "false")
        self.logger.flush()
        tracking.log_state(client, run_id, model.state_dict(), "checkpoints/final.pt")
        tracking.log_model(client, run_id, model)
        log.info("%s: done in %.1fs: test_acc %.4f, train_acc_noisy %s", run_id[:8], seconds,
                 final["test_acc"], f"{final.get('train_acc_noisy', float('nan')):.4f}")
        return final


def _train(runs: list[_DenseRun]) -> list[dict[str, float] | TrainingDiverged]:
    """Train the runs (all at the same epoch) alone by `fit`, or together as a seed pack; each one's final
    metrics, or the TrainingDiverged that ended it (the others of a pack train on)."""
    first = runs[0]
    cfg, problem = first.cfg, first.problem
    epochs = cfg.optim.epochs
    recipe = Recipe.from_optim(cfg.optim, augment=cfg.data.augment)
    started = time.monotonic()
    resumed = int(first.resume["epoch"]) if first.resume else 0
    label = f"train {first.run_id[:8]}" if len(runs) == 1 else f"train pack of {len(runs)} ({first.run_id[:8]}, ...)"
    progress = Progress(epochs, label, initial=resumed)
    common = {"snapshot_every": cfg.resume_every, "snapshot_epochs": faults.snapshot_epochs(),
              "pad_fill": problem.splits.black}

    def on_epoch(run: _DenseRun) -> Callable[[int, float], None]:
        def call(epoch: int, loss: float) -> None:
            run.on_epoch(epoch)
            progress.update(epoch, loss=loss)
        return call

    fitted: list[FitResult | TrainingDiverged]
    try:
        if len(runs) == 1:
            try:
                fitted = [fit(first.model, problem.splits.x_train, problem.splits.y_train, recipe,
                              loss_fn=first.loss_fn, generator=first.generator, on_step=first.on_step,
                              on_epoch=on_epoch(first), resume=first.resume, snapshot=first.snapshot, **common)]
            except TrainingDiverged as err:
                fitted = [err]
        else:
            x = problem.splits.x_train
            # The lineage of an execution detail: which runs shared the batched model (and its wall time).
            members = ",".join(run.run_id for run in runs)
            for run in runs:
                run.client.log_batch(run.run_id, tags=[RunTag("sdd.pack_size", str(len(runs))),
                                                       RunTag("sdd.pack_runs", members)])
            for run in runs[1:]:
                if not torch.equal(run.problem.splits.x_train, x):
                    raise ValueError("seed pack members must share their training inputs")
            fitted = fit_pack([run.model for run in runs], x, [run.problem.splits.y_train for run in runs], recipe,
                              loss_fns=[run.loss_fn for run in runs], generators=[run.generator for run in runs],
                              on_steps=[run.on_step for run in runs], on_epochs=[on_epoch(run) for run in runs],
                              snapshots=[run.snapshot for run in runs],
                              resumes=[run.resume for run in runs] if resumed else None, **common)
    finally:
        progress.close()
    seconds = time.monotonic() - started
    return [result if isinstance(result, TrainingDiverged) else run.finish(result, seconds)
            for run, result in zip(runs, fitted)]
