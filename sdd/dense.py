"""The `train` step: one dense model, tracked as one MLflow run with its checkpoints and model."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from sdd import faults, lifecycle, models, tracking
from sdd.config import DataConfig, TrainConfig, to_flat_dict, train_hash
from sdd.distillation import Teacher, distillation_loss, load_teacher
from sdd.measures import activation_entropy, learning_distance, split_metrics
from sdd.problem import Problem, build_model, load_problem, resolve_device
from sdd.progress import Progress
from sdd.training import Recipe, converged, cross_entropy, fit

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
    cfg.validate()
    device = resolve_device(cfg.device)
    client = tracking.get_client(tracking_uri)
    exp_id = tracking.experiment_id(client, experiment)
    problem = load_problem(cfg.data, device, run_seed=cfg.optim.seed)
    teacher: Teacher | None = None
    if cfg.distill.teacher:
        teacher = load_teacher(client, cfg.distill.teacher, problem.splits.input_shape,
                               problem.splits.num_classes, device)
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
    lease = lifecycle.acquire(client, exp_id, lifecycle.RunSpec(
        "train", config_hash, name, tags, parent_run_id=parent_run_id, resume_artifact=RESUME_ARTIFACT),
        force=cfg.force)
    if lease.reused:
        return StepResult(lease.run_id, True, dict(lease.finished.data.metrics))
    with lease.running() as resume_state:
        metrics = _train(cfg, client, lease.run_id, problem, teacher, resume_state)
    return StepResult(lease.run_id, False, metrics)


def _train(cfg: TrainConfig, client, run_id: str, problem: Problem, teacher: Teacher | None,
           resume: dict | None) -> dict[str, float]:
    model = build_model(cfg.model, problem, cfg.optim.seed)
    weights = models.prunable_weights(model)
    num_params = models.count_params(model)
    init = {k: v.detach().clone() for k, v in weights.items()}
    # A continued run re-computes steps it may already have logged before it stopped.
    logger = tracking.MetricLogger(client, run_id, skip_through=tracking.last_logged_step(client, run_id))
    if resume is None:
        tracking.log_params(client, run_id, {**to_flat_dict(cfg), "num_params": num_params})
        # The effective config, exactly; params may hold `mlflow run`'s spelling of the -P values.
        client.log_dict(run_id, to_flat_dict(cfg), "config.json")
        rates = {"wrong_label_rate": problem.wrong_label_rate}
        if cfg.data.val_noise:
            rates["val_wrong_label_rate"] = len(problem.val_noisy_idx) / max(1, len(problem.splits.y_val))
        logger.log({"num_params": num_params, **rates}, 0)
        tracking.log_state(client, run_id, {"noisy_idx": problem.noisy_idx.cpu(),
                                             "noisy_labels": problem.splits.y_train.cpu(),
                                             "val_noisy_idx": problem.val_noisy_idx.cpu()}, "noise/noisy_idx.pt")
        log_dataset_inputs(client, run_id, cfg.data, problem)
        tracking.log_state(client, run_id, model.state_dict(), "checkpoints/init.pt")
        logger.log({**evaluate_all(model, problem, init), **nonzero_counts(model)}, 0)
        if 0 in cfg.save_epochs:
            tracking.log_state(client, run_id, model.state_dict(), "checkpoints/epoch_0.pt")

    epochs = cfg.optim.epochs
    every = cfg.effective_eval_every()

    loss_fn = cross_entropy
    if teacher is not None:
        loss_fn = distillation_loss(teacher, problem.splits.x_train, cfg.distill.alpha, cfg.distill.temperature,
                                    cfg.data.augment)
    recipe = Recipe.from_optim(cfg.optim, augment=cfg.data.augment)
    generator = torch.Generator(device=problem.device).manual_seed(cfg.optim.seed)
    started = time.monotonic()
    progress = Progress(epochs, f"train {run_id[:8]}", initial=int(resume["epoch"]) if resume else 0)

    def on_step(step: int) -> None:
        if step == cfg.rewind_step and step > 0:
            tracking.log_state(client, run_id, model.state_dict(), f"checkpoints/step_{step}.pt")

    def on_epoch(epoch: int, loss: float) -> None:
        if epoch % every == 0 and epoch != epochs:  # the final evaluation follows fit()
            logger.log(evaluate_all(model, problem, init), epoch)
        if epoch in cfg.save_epochs:
            tracking.log_state(client, run_id, model.state_dict(), f"checkpoints/epoch_{epoch}.pt")
        faults.reach(f"train-epoch-{epoch}", run_id)
        progress.update(epoch, loss=loss)

    def snapshot(state: dict) -> None:
        logger.flush()  # metrics first: a resumed run skips the steps already logged
        tracking.log_training_state(client, run_id, state, RESUME_ARTIFACT)
        faults.reach(f"train-saved-{state['epoch']}", run_id)

    try:
        fitted = fit(model, problem.splits.x_train, problem.splits.y_train, recipe, loss_fn=loss_fn,
                     generator=generator, on_step=on_step, on_epoch=on_epoch, resume=resume, snapshot=snapshot,
                     snapshot_every=cfg.resume_every, snapshot_epochs=faults.snapshot_epochs(),
                     pad_fill=problem.splits.black)
    finally:
        progress.close()
    final = evaluate_all(model, problem, init)
    final.update(activation_entropy(model, problem.splits.x_train))
    final.update(nonzero_counts(model))
    final["train_time_s"] = time.monotonic() - started
    final["steps"] = fitted.steps
    final["converged"] = float(converged(fitted.epoch_losses, final.get("train_acc")))
    logger.log(final, epochs)
    client.set_tag(run_id, "sdd.converged", "true" if final["converged"] else "false")
    logger.flush()
    tracking.log_state(client, run_id, model.state_dict(), "checkpoints/final.pt")
    tracking.log_model(client, run_id, model)
    log.info("%s: done in %.1fs: test_acc %.4f, train_acc_noisy %s", run_id[:8], final["train_time_s"],
             final["test_acc"], f"{final.get('train_acc_noisy', float('nan')):.4f}")
    return final
