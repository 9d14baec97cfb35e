"""Planning a stage's trials: the dense grid, and chains from starting checkpoints around the IT.

A chain stage is planned from MLflow alone (the dense stage run's `trials.json` and those runs), never
from memory, so any stage can be re-run by itself. A trial whose config hash already has a FINISHED
run is covered: recorded as reused without being launched (and the steps themselves return such a
run at once), so a sweep run again after a kill finishes only what is missing.
"""

from __future__ import annotations

import functools
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean
from typing import Any

from sdd import config
from sdd.errors import UsageError
from sdd.steps import STEP_OF_STAGE, STEPS
from sdd.sweep.lineage import TRIALS_ARTIFACT, Store, find_stage_run, read_trials
from sdd.sweep.study_file import (AUTO_PACK, PARENT, AutoStart, Stage, StudyFile, TeacherSelector, parse_teacher,
                                 show_value)


@dataclass
class Trial:
    """One planned trial: the step it runs, its full flat config, the resources it asks for."""

    key: str
    step: str  # a name in `sdd.steps.STEPS`
    config: dict[str, Any]
    cpu: float
    gpu: float
    tags: dict[str, str] = field(default_factory=dict)
    # Resolved teacher run (distill / dense with a teacher): part of the run's config hash.
    teacher_run: str | None = None
    # A chain's dense parent's flat config (what a seed pack of chains must share, less the seed).
    dense_config: dict[str, Any] | None = None


@dataclass
class Plan:
    stage: str
    trials: list[Trial]
    notes: list[str] = field(default_factory=list)  # what was selected and why, for the log and --dry-run
    tags: dict[str, str] = field(default_factory=dict)  # set on the stage run
    starts: list[dict[str, Any]] = field(default_factory=list)  # logged as starts.json (chain stages)


def plan_stage(store: Store, study: StudyFile, stage: str, study_run_id: str | None) -> Plan:
    plan = plan_dense(store, study) if stage == "dense" else plan_chains(store, study, stage, study_run_id)
    keys = [t.key for t in plan.trials]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise UsageError(f"{study.display_path}: stages.{stage}: the trial {twice[0]!r} appears twice "
                         "(a starting checkpoint listed twice?)")
    return plan


def plan_dense(store: Store, study: StudyFile) -> Plan:
    stage, step = study.stages["dense"], STEP_OF_STAGE["dense"]
    trials = []
    for label, point in stage.points():
        if point.get("data_dir"):
            # Trials run in their own working directories: a relative data_dir means the sweep's.
            point = {**point, "data_dir": str(Path(point["data_dir"]).resolve())}
        cfg = step.from_flat(point)
        teacher_run = _teacher_run(store, cfg.distill.teacher) if cfg.distill.teacher else None
        trials.append(_make_trial(stage, label or "dense", step.name, config.to_flat_dict(cfg), cfg.model.width, {},
                                  teacher_run))
    return Plan("dense", trials)


def _make_trial(stage: Stage, key: str, step: str, flat: dict[str, Any], width: int, tags: dict[str, str],
                teacher_run: str | None) -> Trial:
    rule = stage.resources.for_width(width)
    assert rule is not None  # study_file checked that the rules cover every dense width
    return Trial(key, step, flat, rule.cpu, rule.gpu, tags, teacher_run)


def _teacher_run(store: Store, ref: str) -> str:
    from sdd.distillation import resolve_teacher

    return resolve_teacher(store.client, ref).run_id


# --- the dense stage's results ------------------------------------------------------------------

class DenseStageNotRun(UsageError):
    """A chain stage asked for before its study's dense stage ran (a dry run reports it instead)."""


@dataclass
class DenseResult:
    """A finished dense run of the dense stage, as its trials.json record and MLflow run report it."""

    run_id: str
    config: dict[str, Any]
    metrics: dict[str, float]

    @property
    def width(self) -> int:
        return int(self.config["width"])

    @property
    def seed(self) -> int:
        return int(self.config["seed"])

    def memorisation(self) -> float:
        """Final train accuracy on the noisy-label subset; without label noise, on the whole training set."""
        return self.metrics.get("train_acc_noisy", self.metrics.get("train_acc", 0.0))


def dense_results(store: Store, study: StudyFile, study_run_id: str | None, stage: str) -> list[DenseResult]:
    """The finished runs of the study's dense stage, read back from its stage run's trials.json."""
    from sdd import tracking

    dense_run = find_stage_run(store, study_run_id, "dense") if study_run_id else None
    if dense_run is None:
        raise DenseStageNotRun(f"{stage} stage: the dense stage of study {study.name} has not run yet; run "
                               f"`sdd sweep {study.display_path} --stage dense` first")
    try:
        records = read_trials(store, dense_run.info.run_id)
    except FileNotFoundError:
        raise UsageError(f"{stage} stage: the dense stage run {dense_run.info.run_id} of study {study.name} "
                         f"has no {TRIALS_ARTIFACT} (it was killed); run `sdd sweep {study.display_path} "
                         f"--stage dense` again") from None
    finished = [r for r in records if r["status"] == "FINISHED" and r["run_id"]]
    if not finished:
        raise UsageError(f"{stage} stage: the dense stage of study {study.name} has no finished runs")
    failed = [r["trial"] for r in records if r not in finished]
    if failed and isinstance(study.stages[stage].start, AutoStart):
        # Without them the threshold would be placed on a width sweep with holes, possibly on the
        # wrong width, and the chains started from the wrong checkpoints.
        raise UsageError(f"{stage} stage: {len(failed)} dense trial(s) did not finish ({'; '.join(failed)}), so "
                         "the interpolation threshold cannot be placed; run the dense stage again, or name "
                         "starting checkpoints explicitly")
    out = []
    for record in finished:
        run = tracking.get_run(store.client, record["run_id"])
        out.append(DenseResult(record["run_id"], record["config"], dict(run.data.metrics)))
    return out


# --- starting checkpoints -----------------------------------------------------------------------

def _group_key(dense: Stage, flat: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """Dense runs that differ only in width and seed share one DD curve and one threshold."""
    return tuple((axis, show_value(flat[axis])) for axis in dense.axes if axis not in ("width", "seed"))


def _group_label(key: tuple[tuple[str, str], ...]) -> str:
    return ",".join(f"{k}={v}" for k, v in key) or "all"


@dataclass
class Start:
    """A starting checkpoint of chains: a finished dense run, an epoch, and why it was chosen."""

    result: DenseResult
    epoch: int | None
    role: str | None
    group: tuple[tuple[str, str], ...]

    def label(self, dense: Stage) -> str:
        names = [axis for axis in dense.axes if axis not in ("width", "seed")] + ["width", "seed"]
        text = ",".join(f"{n}={show_value(self.result.config[n])}" for n in names)
        if self.epoch is not None:
            text += f",epoch={self.epoch}"
        return f"{self.role} {text}" if self.role else text


def select_starts(study: StudyFile, stage: str, results: list[DenseResult]) -> tuple[list[Start], Plan]:
    """The starting checkpoints of a chain stage, with the notes and tags that explain the choice."""
    spec, dense = study.stages[stage], study.stages["dense"]
    plan = Plan(stage, [])
    groups: dict[tuple[tuple[str, str], ...], list[DenseResult]] = defaultdict(list)
    for r in results:
        groups[_group_key(dense, r.config)].append(r)
    starts: list[Start] = []
    if isinstance(spec.start, AutoStart):
        it_widths = {}
        for key, members in groups.items():
            chosen, it = _auto_group(spec.start, spec.seeds, stage, key, members, plan)
            it_widths[_group_label(key)] = it
            starts.extend(chosen)
        plan.tags["sdd.it_widths"] = json.dumps(it_widths)
        plan.tags["sdd.it_threshold"] = f"{spec.start.threshold:g}"
    else:
        for ref in spec.start:
            for seed in ref.seeds:
                matches = [r for r in results if r.seed == seed and
                           all(show_value(r.config[k]) == show_value(v) for k, v in ref.match.items())]
                if len(matches) != 1:
                    why = "no finished run" if not matches else f"{len(matches)} runs"
                    named = ", ".join(filter(None, (ref.label(), f"epoch {ref.epoch}" if ref.epoch is not None
                                                    else "", f"seed {seed}")))
                    raise UsageError(f"{study.display_path}: stages.{stage}.start ({named}): the dense stage has "
                                     f"{why} with these settings")
                starts.append(Start(matches[0], ref.epoch, None, _group_key(dense, matches[0].config)))
    plan.starts = [{"role": s.role, "group": _group_label(s.group), "width": s.result.width,
                    "seed": s.result.seed, "epoch": s.epoch, "dense_run_id": s.result.run_id} for s in starts]
    return starts, plan


def _auto_group(auto: AutoStart, chain_seeds: tuple[int, ...] | None, stage: str, key: tuple[tuple[str, str], ...],
                members: list[DenseResult], plan: Plan) -> tuple[list[Start], float]:
    from sdd.phases import width_threshold

    label = _group_label(key)
    by_width: dict[int, list[float]] = defaultdict(list)
    for r in members:
        by_width[r.width].append(r.memorisation())
    widths = sorted(by_width)
    fit = [mean(by_width[w]) for w in widths]
    it = width_threshold(widths, fit, auto.threshold)
    if it is None:
        best = max(range(len(widths)), key=lambda i: fit[i])
        raise UsageError(f"{stage} stage ({label}): no dense width fits the noisy labels to {auto.threshold:g} "
                         f"(best: {fit[best]:.3f} at width {widths[best]}); lower start.threshold, add wider "
                         f"models or epochs, or name starting checkpoints explicitly")
    i = widths.index(it)
    # The threshold and its neighbours first; then the controls: the nearest widths a factor away.
    candidates = {
        "at": [it],
        "below": widths[i - 1:i] if i > 0 else [],
        "above": widths[i + 1:i + 2],
        "before": [w for w in reversed(widths) if w <= it / auto.control_factor],
        "after": [w for w in widths if w >= it * auto.control_factor],
    }
    roles: dict[str, int] = {}
    for role in ("at", "below", "above", "before", "after"):
        free = [w for w in candidates[role] if w not in roles.values()]
        if role in auto.roles and free:
            roles[role] = free[0]
        elif role in auto.roles:
            plan.notes.append(f"{label}: no width left for '{role}' (threshold {it}, widths "
                              f"{', '.join(map(str, widths))}); skipped")
    starts = []
    for role in auto.roles:
        if role not in roles:
            continue
        # The threshold is placed on the mean over seeds; each seed then starts its own replicate chain.
        for seed in chain_seeds or sorted({r.seed for r in members if r.width == roles[role]}):
            match = [r for r in members if r.width == roles[role] and r.seed == seed]
            if not match:
                raise UsageError(f"{stage} stage ({label}): the dense run of width {roles[role]}, seed {seed} did "
                                 f"not finish; run the dense stage again")
            starts.append(Start(match[0], auto.epoch, role, key))
    plan.notes.append(f"{label}: interpolation threshold at width {it} (mean noisy-subset fit "
                      f"{fit[i]:.3f} >= {auto.threshold:g}); starts: " +
                      ", ".join(f"{role} {roles[role]}" for role in auto.roles if role in roles))
    return starts, it


# --- chains -------------------------------------------------------------------------------------

def plan_chains(store: Store, study: StudyFile, stage: str, study_run_id: str | None) -> Plan:
    """Chains of a prune or distill stage: starting checkpoints x seeds x grid points (x teachers).

    Each chain takes its dense parent's seed, and the study's threshold unless its recipe sets one.
    """
    results = dense_results(store, study, study_run_id, stage)
    starts, plan = select_starts(study, stage, results)
    spec, dense, step = study.stages[stage], study.stages["dense"], STEP_OF_STAGE[stage]
    for start in starts:
        for label, point in spec.points():
            values = {"it_threshold": study.it_threshold, **point, "parent": start.result.run_id,
                      "start_epoch": start.epoch, "seed": start.result.seed}
            teacher_run = None
            if stage == "distill":
                values["teacher"] = _teacher_ref(point["teacher"], start, results)
                teacher_run = _teacher_run(store, values["teacher"])
            key = start.label(dense) + (f" | {label}" if label else "")
            tags = {"sdd.start_role": start.role} if start.role else {}
            trial = _make_trial(spec, key, step.name, config.to_flat_dict(step.from_flat(values)),
                                start.result.width, tags, teacher_run)
            trial.dense_config = start.result.config
            plan.trials.append(trial)
    return plan


def _teacher_ref(teacher: str, start: Start, results: list[DenseResult]) -> str:
    """The teacher reference of one chain: selectors resolved against the dense stage's runs."""
    parsed = parse_teacher(teacher)
    if parsed == PARENT:
        return start.result.run_id
    if isinstance(parsed, TeacherSelector):
        peers = [r for r in results if _data_key(r) == _data_key(start.result) and parsed.accepts(r.config)]
        if not peers:
            raise UsageError(f"teacher {teacher}: no finished dense run on the data of {start.result.run_id} "
                             "has these options")
        return max(peers, key=lambda r: (r.metrics.get("val_acc", -1.0), -r.width)).run_id
    return parsed


_DATA_FIELDS = tuple(config.flat_fields(config.DataConfig))


def _data_key(r: DenseResult) -> tuple[str, ...]:
    """Dense runs trained on the same data (dataset, noise and its draw, ...): the teachers a chain may use.

    A teacher trained on another noise draw would know the clean labels of the student's noisy samples.
    """
    drawn = config.DataConfig(noise_seed=r.config.get("noise_seed")).effective_noise_seed(r.seed)
    return tuple(show_value(drawn if k == "noise_seed" else r.config.get(k)) for k in _DATA_FIELDS if k != "data_dir")


# --- covered trials -----------------------------------------------------------------------------

def finished_run(store: Store, trial: Trial) -> str | None:
    """The FINISHED run that already covers this trial, by the config hash its step would compute and,
    for a chain, its depth: a finished chain with fewer levels than the trial asks for is launched
    (the step continues it)."""
    from sdd import tracking

    if store.exp_id is None:
        return None
    step = STEPS[trial.step]
    cfg = step.from_flat(trial.config)
    run = tracking.find_finished(store.client, store.exp_id, step.tag, step.config_hash(cfg, trial.teacher_run))
    return run.info.run_id if run and step.covers(cfg, run) else None


def covered_trials(store: Store, plan: Plan) -> dict[str, str]:
    """Trials whose finished run already exists (by config hash): recorded as reused, never launched.

    The steps themselves would return the same run, but only after a worker has started, imported
    torch and loaded the data; a re-run of a finished study then takes seconds and needs no Ray.
    """
    found = {t.key: finished_run(store, t) for t in plan.trials if not t.config.get("force")}
    return {k: v for k, v in found.items() if v}


# --- seed packs ---------------------------------------------------------------------------------

def seed_packs(trials: list[Trial], stage: Stage) -> list[list[Trial]]:
    """The trials grouped into launches: trials whose configs differ only in their seed (and that ask
    for the same resources) share one launch, a seed pack, as the stage's `pack_seeds` says; every
    other trial is a launch of its own. Packs keep the stage's trial order."""
    setting = stage.pack_seeds
    step = STEP_OF_STAGE[stage.kind]
    if setting is False or step.run_pack is None:
        return [[t] for t in trials]
    groups: dict[str, list[Trial]] = {}
    for trial in trials:
        # A chain's parent is the dense run of its seed: chains of one pack differ in both.
        own = {k: v for k, v in trial.config.items() if k not in ("seed", "parent")}
        parent = {k: v for k, v in (trial.dense_config or {}).items() if k != "seed"}
        key = json.dumps({"config": own, "parent": parent, "cpu": trial.cpu, "gpu": trial.gpu,
                          "teacher": trial.teacher_run}, sort_keys=True, default=str)
        groups.setdefault(key, []).append(trial)
    launches = []
    for members in groups.values():
        size = len(members)
        if isinstance(setting, int) and not isinstance(setting, bool):
            size = setting
        elif setting == AUTO_PACK and not pack_pays_for(members[0]):
            size = 1
        launches += [members[i:i + size] for i in range(0, len(members), size)]
    return launches


def pack_pays_for(trial: Trial) -> bool:
    """`sdd.packs.pack_pays` for a planned trial (a chain: for its dense parent's model and recipe, which
    its levels retrain with), on the device its resources give it (a trial that reserves no GPU sees
    none): the model is built on the meta device, for the shapes of its data."""
    import torch

    from sdd import models
    from sdd.packs import pack_may_pay, pack_pays

    cfg = STEP_OF_STAGE["dense"].from_flat(trial.dense_config or trial.config)
    device = torch.device("cuda" if trial.gpu > 0 else "cpu")
    if not pack_may_pay(cfg.model, cfg.optim, device):
        return False
    try:
        input_shape, num_classes, train_size = _data_shapes(cfg.data)
    except UsageError:  # data that cannot be read: the trial itself fails with the reason, alone
        return False
    with torch.device("meta"):
        model = models.build_model(cfg.model.model, width=cfg.model.width, depth=cfg.model.depth,
                                   input_shape=input_shape, num_classes=num_classes, maxpool=cfg.model.maxpool,
                                   init=cfg.model.init)
    return pack_pays(cfg.model, cfg.optim, models.count_params(model), train_size, device)


@functools.lru_cache(maxsize=16)
def _data_shapes(data: config.DataConfig) -> tuple[tuple[int, ...], int, int]:
    """Input shape, number of classes and training-set size of the data a config trains on."""
    from sdd.data import load_dataset

    splits = load_dataset(data.dataset, data_dir=data.data_dir, train_size=data.train_size, test_size=data.test_size,
                          val_size=data.val_size, val_seed=data.val_seed, data_seed=data.data_seed)
    return splits.input_shape, splits.num_classes, len(splits.y_train)
