"""Typed configurations of every step, their validation, and the stable hash that names a run.

Each step takes one frozen dataclass. The command line is derived from the fields (see `sdd.cli`),
MLflow params are the flattened fields, and the config hash is computed from the fields that change
what a run computes or stores, so two runs with the same hash are interchangeable.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from sdd import names
from sdd.errors import UsageError


def opt(default: Any, help: str, *, choices: tuple[str, ...] | None = None, hashed: bool = True,
        added: bool = False) -> Any:
    """A config field: its default, its help text, allowed values, and whether it enters the hash.

    `added` marks a field added after runs were stored: it enters the hash only when it differs from its
    default, so every run made before it existed keeps its hash and is still reused.
    """
    meta = {"help": help, "choices": choices, "hashed": hashed, "added": added}
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults are not allowed in configs")
    return field(default=default, metadata=meta)


# Dense seeds lie in [0, 2^32) (NumPy's range too); `sdd.retraining.reinit_seed` draws from [2^63, 2^64), so a
# re-initialised level can never redraw a dense run's initialisation.
DENSE_SEED_LIMIT = 2 ** 32
# Evaluations of a dense run by default (`TrainConfig.eval_epochs`): ~40 points resolve an epoch-wise curve on
# its log axis; the 200 evenly spaced ones used before cost a third of a quick-preset run (`sdd bench`).
EVAL_POINTS = 40


@dataclass(frozen=True)
class DataConfig:
    dataset: str = opt("mnist1d", "dataset name", choices=names.DATASETS)
    data_dir: str | None = opt(None, "folder holding cifar/tinyimagenet files (mnist1d is generated)", hashed=False)
    train_size: int | None = opt(None, "training samples (mnist1d: generated, default 4000; others: subsample)")
    test_size: int | None = opt(None, "test samples (mnist1d: generated, default 10000; others: subsample)")
    val_size: int = opt(500, "validation samples (mnist1d: generated; others: held out from the training set); "
                             "0 = none: such a run cannot be pruned, distilled or registered, since model "
                             "selection never looks at the test set")
    val_seed: int = opt(0, "seed of the validation split")
    data_seed: int = opt(0, "seed of dataset generation / subsampling (mnist1d: train, validation and test are "
                            "separate streams, so one split's size never changes another's samples)")
    noise: float = opt(0.2, "label-noise rate on the training split, in [0, 1)")
    noise_kind: str = opt("symmetric", "label-noise definition", choices=names.NOISE_KINDS)
    noise_seed: int | None = opt(None, "seed of the label noise; None = the run's --seed, so each seed also "
                                       "draws its own noisy labels")
    val_noise: bool = opt(False, "corrupt the validation labels too (same kind and rate, their own draw); "
                                 "off: they are clean", added=True)
    augment: bool = opt(False, "pad-crop and flip augmentation (images only)")

    def validate(self) -> None:
        _check(0.0 <= self.noise < 1.0, f"--noise must be in [0, 1), got {self.noise}")
        _check(self.val_size >= 0, f"--val-size must be >= 0, got {self.val_size}")
        _check(not self.val_noise or self.val_size > 0, "--val-noise needs a validation split (--val-size > 0)")
        for name in ("train_size", "test_size"):
            value = getattr(self, name)
            _check(value is None or value > 0, f"--{_flag(name)} must be > 0, got {value}")
        _check(not (self.augment and self.dataset == "mnist1d"),
               "--augment applies to image datasets (cifar10, cifar100, tinyimagenet), not mnist1d")

    def effective_noise_seed(self, run_seed: int) -> int:
        """The seed the label noise is drawn from: `noise_seed` when given, else the run's `seed`.

        The one place this is decided: dense training, chains rebuilding their parent's data and the
        benchmark all draw the noise through it, and the dense run's hash holds its value.
        """
        return run_seed if self.noise_seed is None else self.noise_seed

    def revisions(self) -> dict[str, str]:
        """Markers of changes to what a stored data config computes; they enter the dense run's hash so a
        run made before such a change is not reused for the same config after it."""
        out = {}
        if self.dataset == "mnist1d":
            out["mnist1d_splits"] = "streams"  # each split from its own stream (was: one generated pool)
        if self.augment:
            out["pad_fill"] = "black"  # pad-crop pads with black (was: 0 after normalisation)
        return out


@dataclass(frozen=True)
class ModelConfig:
    model: str = opt("mlp", "model family", choices=names.MODELS)
    width: int = opt(64, "model width (hidden units for mlp, base channels k for the CNNs)")
    depth: int = opt(1, "hidden layers (mlp) or depth (vgg_like); 1 for the others")
    maxpool: bool = opt(False, "resnet18: max-pool after the stem (DSD2 keeps it, He et al. do not)")
    init: str = opt("default", "initialisation: each model's own, or open_lth's (He et al.: kaiming_normal "
                    "fan_in on every conv and linear weight, BatchNorm gamma ~ U(0, 1))", choices=names.INITS,
                    added=True)

    def validate(self) -> None:
        _check(self.width > 0, f"--width must be > 0, got {self.width}")
        _check(self.depth > 0, f"--depth must be > 0, got {self.depth}")


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = opt("adam", "optimizer", choices=names.OPTIMIZERS)
    lr: float = opt(1e-3, "learning rate")
    momentum: float = opt(0.9, "SGD momentum")
    weight_decay: float = opt(0.0, "weight decay")
    schedule: str = opt("constant", "learning-rate schedule (stepped per epoch)", choices=names.SCHEDULES)
    milestones: tuple[int, ...] = opt((), "multistep: epochs where the lr is multiplied by --gamma, e.g. 80,120")
    gamma: float = opt(0.1, "multistep decay factor")
    epochs: int = opt(2000, "passes over the training set (full-batch: one step each)")
    batch_size: int = opt(0, "minibatch size; 0 = full batch")
    seed: int = opt(0, "seed of initialisation and batch order")

    def validate(self) -> None:
        _check(self.lr > 0 and math.isfinite(self.lr), f"--lr must be > 0, got {self.lr}")
        _check(self.epochs > 0, f"--epochs must be > 0, got {self.epochs}")
        _check(self.batch_size >= 0, f"--batch-size must be >= 0 (0 = full batch), got {self.batch_size}")
        _check(0 <= self.seed < DENSE_SEED_LIMIT, f"--seed must be in [0, 2^32), got {self.seed}")
        _check(0.0 <= self.momentum < 1.0, f"--momentum must be in [0, 1), got {self.momentum}")
        _check(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        _check(0 < self.gamma <= 1, f"--gamma must be in (0, 1], got {self.gamma}")
        _check(all(m > 0 for m in self.milestones), f"--milestones must be positive epochs, got {self.milestones}")
        _check(self.schedule == "multistep" or not self.milestones,
               "--milestones needs --schedule multistep")


@dataclass(frozen=True)
class DistillConfig:
    teacher: str | None = opt(None, "teacher model: models:/name@alias, models:/name/version, runs:/ID/model or a run id")
    alpha: float = opt(0.8, "weight of the distillation term (0 = plain cross-entropy)")
    temperature: float = opt(10.0, "softmax temperature of the distillation term")

    def validate(self) -> None:
        _check(0.0 <= self.alpha <= 1.0, f"--alpha must be in [0, 1], got {self.alpha}")
        _check(self.temperature > 0 and math.isfinite(self.temperature),
               f"--temperature must be > 0, got {self.temperature}")


@dataclass(frozen=True)
class TrainConfig:
    """The `train` step: one dense model on one (noisy) dataset."""

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    distill: DistillConfig = DistillConfig()
    eval_every: int = opt(0, f"evaluate every N epochs; 0 = about {EVAL_POINTS} evaluations per run, spaced "
                             "evenly in log(epoch)")
    save_epochs: tuple[int, ...] = opt((), "epochs whose weights are saved as starting checkpoints, e.g. 100,500")
    rewind_step: int = opt(0, "optimizer step whose weights are saved for weight rewinding (0 = init, always saved)")
    resume_every: int = opt(600, "seconds between resumable training checkpoints (0 = none)", hashed=False)
    device: str = opt("auto", "device", choices=names.DEVICES, hashed=False)
    force: bool = opt(False, "train again even if a finished run with the same config exists", hashed=False)

    def validate(self) -> None:
        self.data.validate()
        self.model.validate()
        self.optim.validate()
        if self.distill.teacher is not None:
            self.distill.validate()
        _check(self.eval_every >= 0, f"--eval-every must be >= 0, got {self.eval_every}")
        _check(self.rewind_step >= 0, f"--rewind-step must be >= 0, got {self.rewind_step}")
        _check(self.resume_every >= 0, f"--resume-every must be >= 0, got {self.resume_every}")
        bad = [e for e in self.save_epochs if not 0 <= e <= self.optim.epochs]
        _check(not bad, f"--save-epochs must lie in [0, --epochs={self.optim.epochs}], got {bad}")

    def eval_epochs(self) -> frozenset[int]:
        """The epochs after which the run is evaluated, the last one included. By default about
        EVAL_POINTS, evenly spaced in log(epoch): the scale on which epoch-wise curves are read (early
        epochs change the most), at a cost that stays a small share of a run (`sdd bench`, item 3)."""
        epochs = self.optim.epochs
        if self.eval_every:
            return frozenset(range(self.eval_every, epochs + 1, self.eval_every)) | {epochs}
        return frozenset(round(epochs ** (i / (EVAL_POINTS - 1))) for i in range(EVAL_POINTS)) | {epochs}


@dataclass(frozen=True)
class PruneConfig:
    """The `prune` step: an iterative pruning chain from a dense parent run."""

    parent: str = opt("", "dense parent: run id or runs:/ID uri")
    start_epoch: int | None = opt(None, "start from this saved epoch of the parent (default: its final weights)")
    # How deep a chain goes is not part of its identity (open_lth's levels): level L is the same whatever depth
    # is asked for, so a finished chain asked for more levels is continued, not recomputed (`depth`).
    levels: int | None = opt(None, "number of pruning levels (default 20 unless --target-sparsity is given); a "
                                   "finished chain asked for more levels is continued", hashed=False)
    target_sparsity: float | None = opt(None, "prune until this sparsity is reached, in (0, 1)", hashed=False)
    rate: float = opt(0.2, "fraction of the remaining weights removed per level, in (0, 1)")
    criterion: str = opt("magnitude", "pruning criterion", choices=names.CRITERIA)
    scope: str = opt("global", "rank weights across all layers or per layer", choices=names.SCOPES)
    keep_output_dense: bool = opt(False, "never prune the output layer")
    gradient_batches: int = opt(1, "gradient criterion: training batches over which |w * dL/dw| is summed")
    retrain: str = opt("lr_rewind", "retraining at every level", choices=names.RETRAIN_MODES)
    epochs: int | None = opt(None, "retraining epochs per level (default: the parent's epochs)")
    lr: float | None = opt(None, "retraining lr (default: the parent's lr; finetune: a tenth of the parent's "
                                     "final lr, He et al.)")
    rewind_step: int = opt(0, "weight_rewind: the parent's saved optimizer step to rewind to (0 = lottery ticket)")
    seed: int = opt(0, "seed of random scores, re-initialisation and batch order")
    it_threshold: float = opt(0.95, "noisy-subset train accuracy below which the interpolation regime is left "
                                    "(He et al.: about 95%)")
    early_stop: str = opt("none", "stop the chain early", choices=names.EARLY_STOPS)
    entropy_drop: float = opt(0.1, "early stop: relative entropy drop from dense that ends the plateau")
    acc_tolerance: float = opt(0.02, "early stop: tolerated val_acc drop from the best level seen")
    eval_every: int = opt(0, "evaluate every N epochs while retraining; 0 = only at the end of a level")
    register: bool = opt(True, "register the best level as sdd-<dataset>-<model>@best-sparse", hashed=False)
    resume_every: int = opt(600, "seconds between resumable checkpoints inside a level (0 = none)", hashed=False)
    device: str = opt("auto", "device", choices=names.DEVICES, hashed=False)
    force: bool = opt(False, "run again even if a finished chain with the same config exists", hashed=False)

    def validate(self) -> None:
        _check(bool(self.parent), "--parent is required: the dense run id or runs:/ID uri")
        _check(0.0 < self.rate < 1.0, f"--rate must be in (0, 1), got {self.rate}")
        _check(self.levels is None or self.target_sparsity is None,
               "give either --levels or --target-sparsity, not both")
        _check(self.levels is None or self.levels > 0, f"--levels must be > 0, got {self.levels}")
        _check(self.target_sparsity is None or 0.0 < self.target_sparsity < 1.0,
               f"--target-sparsity must be in (0, 1), got {self.target_sparsity}")
        _check(self.epochs is None or self.epochs > 0, f"--epochs must be > 0, got {self.epochs}")
        _check(self.lr is None or self.lr > 0, f"--lr must be > 0, got {self.lr}")
        _check(self.rewind_step >= 0, f"--rewind-step must be >= 0, got {self.rewind_step}")
        _check(self.gradient_batches > 0, f"--gradient-batches must be > 0, got {self.gradient_batches}")
        _check(0.0 < self.it_threshold <= 1.0, f"--it-threshold must be in (0, 1], got {self.it_threshold}")
        _check(0.0 < self.entropy_drop < 1.0, f"--entropy-drop must be in (0, 1), got {self.entropy_drop}")
        _check(0.0 <= self.acc_tolerance < 1.0, f"--acc-tolerance must be in [0, 1), got {self.acc_tolerance}")
        _check(self.eval_every >= 0, f"--eval-every must be >= 0, got {self.eval_every}")
        _check(self.resume_every >= 0, f"--resume-every must be >= 0, got {self.resume_every}")
        _check(self.start_epoch is None or self.start_epoch >= 0,
               f"--start-epoch must be >= 0, got {self.start_epoch}")

    def depth(self) -> int:
        """The number of levels this chain runs: `levels`, the fewest reaching `target_sparsity`, or 20."""
        if self.target_sparsity is not None:
            return pruning_levels(self.rate, None, self.target_sparsity)
        return pruning_levels(self.rate, self.levels or 20, None)


def pruning_levels(rate: float, levels: int | None, target_sparsity: float | None) -> int:
    """Number of pruning levels: `levels` as given, or the fewest reaching `target_sparsity`.

    Each level removes `rate` of the remaining weights, so L levels leave (1 - rate)^L of them.
    """
    if not 0.0 < rate < 1.0:
        raise UsageError(f"--rate must be in (0, 1), got {rate}")
    if (levels is None) == (target_sparsity is None):
        raise UsageError("give exactly one of --levels and --target-sparsity")
    if levels is not None:
        if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
            raise UsageError(f"--levels must be a positive integer, got {levels}")
        return levels
    if not 0.0 < target_sparsity < 1.0:
        raise UsageError(f"--target-sparsity must be in (0, 1), got {target_sparsity}")

    def reached(n: int) -> bool:
        return 1.0 - (1.0 - rate) ** n >= target_sparsity

    # The logarithm gives the answer up to floating-point error; settle the boundary exactly.
    n = max(1, math.ceil(math.log1p(-target_sparsity) / math.log1p(-rate)))
    while not reached(n):
        n += 1
    while n > 1 and reached(n - 1):
        n -= 1
    return n


@dataclass(frozen=True)
class DistillChainConfig:
    """The `distill` step: a pruning chain whose retraining distils from a teacher."""

    prune: PruneConfig = PruneConfig()
    distill: DistillConfig = DistillConfig()

    def validate(self) -> None:
        self.prune.validate()
        _check(bool(self.distill.teacher), "--teacher is required: models:/NAME@ALIAS, models:/NAME/VERSION, "
                                           "runs:/ID/model or a run id")
        self.distill.validate()


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UsageError(message)


def _flag(name: str) -> str:
    return name.replace("_", "-")


def field_type(cls: type, f: dataclasses.Field) -> Any:
    """The resolved annotation of a dataclass field (annotations are strings here)."""
    return typing.get_type_hints(cls)[f.name]


def is_optional(tp: Any) -> tuple[bool, Any]:
    """(True, inner) for `X | None`, else (False, tp)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return True, args[0]
    return False, tp


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_NONE = {"", "none", "null"}


def parse_value(tp: Any, text: str) -> Any:
    """Parse a field's value from text (CLI, `mlflow run -P`, MLflow params); ValueError if malformed."""
    optional, inner = is_optional(tp)
    t = str(text).strip()
    if optional and t.lower() in _NONE:
        return None
    if typing.get_origin(inner) is tuple:
        if t.lower() in _NONE:
            return ()
        return tuple(parse_value(int, p) for p in t.replace(" ", "").split(",") if p)
    if inner is bool:
        if t.lower() in _TRUE:
            return True
        if t.lower() in _FALSE:
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    if inner is int:
        try:
            return int(t)
        except ValueError:
            raise ValueError(f"expected an integer, got {text!r}") from None
    if inner is float:
        try:
            value = float(t)
        except ValueError:
            raise ValueError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise ValueError(f"expected a finite number, got {text!r}")
        return value
    return t


def flat_fields(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    """{name: (field, resolved type)} over nested configs."""
    out: dict[str, tuple[dataclasses.Field, Any]] = {}
    for f in dataclasses.fields(cls):
        tp = field_type(cls, f)
        if dataclasses.is_dataclass(tp):
            out.update(flat_fields(tp))
        else:
            out[f.name] = (f, tp)
    return out


def to_flat_dict(config: Any, *, hashed_only: bool = False) -> dict[str, Any]:
    """Flatten nested configs into {field: value}; nested field names are unique by construction."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            out.update(to_flat_dict(value, hashed_only=hashed_only))
        elif not hashed_only or (f.metadata.get("hashed", True)
                                 and not (f.metadata.get("added") and value == f.default)):
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def config_hash(config: Any, **extra: Any) -> str:
    """Stable hash of everything that changes what a run computes or stores.

    `extra` carries values resolved at run time (e.g. the parent's run id), so that two chains from
    different parents never share a hash.
    """
    payload = {"kind": type(config).__name__, **to_flat_dict(config, hashed_only=True), **extra}
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def train_hash(cfg: TrainConfig, teacher_run: str | None) -> str:
    """The hash naming a dense run; the teacher enters by its run, not by how it was referred to.

    The noise seed enters by its effective value, so following `seed` and naming the same seed share a hash.
    """
    data = dataclasses.replace(cfg.data, noise_seed=cfg.data.effective_noise_seed(cfg.optim.seed))
    return config_hash(dataclasses.replace(cfg, data=data), teacher_run=teacher_run, **data.revisions())


def chain_hash(cfg: PruneConfig, parent_run_id: str, distill: DistillConfig | None, teacher_run: str | None) -> str:
    """The hash naming a pruning or distillation chain: its options, its dense parent and its teacher."""
    return config_hash(cfg, parent=parent_run_id, distill=to_flat_dict(distill) if distill else None,
                       teacher_run=teacher_run)


def from_flat_dict(cls: type, values: dict[str, Any]) -> Any:
    """Build a (nested) config from flat {field: value}; unknown keys raise UsageError."""
    remaining = dict(values)
    config = _build(cls, remaining)
    if remaining:
        raise UsageError(f"unknown option(s): {', '.join(sorted(remaining))}")
    return config


def _build(cls: type, remaining: dict[str, Any]) -> Any:
    kwargs = {}
    for f in dataclasses.fields(cls):
        tp = field_type(cls, f)
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, remaining)
        elif f.name in remaining:
            value = remaining.pop(f.name)
            kwargs[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**kwargs)
