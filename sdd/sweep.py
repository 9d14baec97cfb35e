"""`sdd sweep`: the stages of a study file run as Ray Tune grids, under one study run in MLflow.

Lineage (design.md): study run (sdd.step=study) -> stage run (sdd.step=sweep, sdd.stage=...) -> dense
runs nested under the dense stage run; chains are nested under their dense parent by `run_prune` and
carry the study and stage run ids as tags. Every stage run logs `trials.json`, one record per trial:
{"trial", "step", "config", "run_id", "status", "reused", "error", "attempts"}.

A chain stage is planned from MLflow alone (the dense stage run's `trials.json` and those runs), never
from memory, so any stage can be re-run by itself. A trial whose config hash already has a FINISHED
run is recorded as reused without being launched (and the steps themselves return such a run at once),
so a sweep run again after a kill finishes only what is missing, and Ray starts only if something is.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import tempfile
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean
from typing import TYPE_CHECKING, Any

from sdd import config as C
from sdd import faults
from sdd.errors import UsageError
from sdd.study_file import (PARENT, STAGES, AutoStart, Stage, StudyFile, TeacherSelector, chain_config,
                             content_hash, load_study, parse_teacher, show_value, with_storage)

if TYPE_CHECKING:  # torch, mlflow and ray load inside functions: `sdd --help` stays fast
    from mlflow import MlflowClient
    from mlflow.entities import Run

log = logging.getLogger(__name__)

STEP_OF_STAGE = {"dense": "train", "prune": "prune", "distill": "distill"}
TRIALS_ARTIFACT = "trials.json"
STARTS_ARTIFACT = "starts.json"
# Ray workers of a killed driver outlive it for a moment; their runs are left alone until they exit.
ORPHAN_WAIT_S = 60.0
CONNECT_TIMEOUT_S = 5.0
HEARTBEAT_S = 60.0


# --- plans --------------------------------------------------------------------------------------

@dataclass
class Trial:
    """One planned trial: the step it runs, its full flat config, the resources it asks for."""

    key: str
    step: str
    config: dict[str, Any]
    cpu: float
    gpu: float
    tags: dict[str, str] = field(default_factory=dict)
    # Resolved teacher run (distill / dense with a teacher): part of the run's config hash.
    teacher_run: str | None = None

    def spec(self) -> dict[str, Any]:
        return {"key": self.key, "step": self.step, "config": self.config, "cpu": self.cpu, "gpu": self.gpu,
                "tags": self.tags}


@dataclass
class Plan:
    stage: str
    trials: list[Trial]
    notes: list[str] = field(default_factory=list)  # what was selected and why, for the log and --dry-run
    tags: dict[str, str] = field(default_factory=dict)  # set on the stage run
    starts: list[dict[str, Any]] = field(default_factory=list)  # logged as starts.json (chain stages)


@dataclass
class StageOutcome:
    stage: str
    run_id: str
    records: list[dict[str, Any]]
    seconds: float
    not_run: str | None = None  # why a chain stage could not be planned (e.g. its dense runs failed)

    @property
    def failed(self) -> int:
        return sum(r["status"] != "FINISHED" for r in self.records)


@dataclass
class SweepOutcome:
    study: StudyFile
    study_run_id: str
    stages: list[StageOutcome]
    tracking_uri: str
    planned: list[str]  # the stages asked for

    @property
    def complete(self) -> bool:
        return len(self.stages) == len(self.planned) and not any(s.failed or s.not_run for s in self.stages)


@dataclass
class Store:
    """The tracking store a sweep writes to; `exp_id` is None when a dry run finds no experiment."""

    uri: str
    client: MlflowClient
    exp_id: str | None
    experiment: str


# --- tracking store -----------------------------------------------------------------------------

def open_store(experiment: str | None, *, create: bool) -> Store:
    """The store named by MLFLOW_TRACKING_URI (absolute), checked reachable before anything else."""
    from sdd import tracking

    uri = tracking.tracking_uri()
    _check_store(uri)
    client = tracking.get_client(uri)
    if create:
        exp_id = tracking.experiment_id(client, experiment)
        return Store(uri, client, exp_id, client.get_experiment(exp_id).name)
    if experiment is None and os.environ.get("MLFLOW_EXPERIMENT_ID"):
        exp = client.get_experiment(os.environ["MLFLOW_EXPERIMENT_ID"])
    else:
        name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or tracking.DEFAULT_EXPERIMENT
        exp = client.get_experiment_by_name(name)
        if exp is None:
            return Store(uri, client, None, name)
    return Store(uri, client, exp.experiment_id, exp.name)


def _check_store(uri: str) -> None:
    from sdd import tracking

    if uri.startswith(("http://", "https://")):
        # MLflow's client retries unreachable servers for minutes: ask the health endpoint first.
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=CONNECT_TIMEOUT_S) as response:
                if response.status != 200:
                    raise OSError(f"health check answered {response.status}")
        except (OSError, urllib.error.URLError) as err:
            reason = getattr(err, "reason", err)
            raise UsageError(f"tracking server {uri} is unreachable ({reason}); start it with "
                             f"`mlflow server --host ...` or fix MLFLOW_TRACKING_URI") from None
        return
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        if not folder.is_dir():
            raise UsageError(f"tracking store {uri}: folder {folder} does not exist")
    try:
        tracking.get_client(uri).search_experiments(max_results=1)
    except Exception as err:  # any failure here means the store is unusable, whatever its kind
        raise UsageError(f"tracking store {uri} is not usable: {type(err).__name__}: {err}".splitlines()[0]) \
            from None


# --- lineage: study and stage runs --------------------------------------------------------------

def find_study_run(store: Store, study: StudyFile) -> Run | None:
    """The most recent study run of this file with this content."""
    from sdd import tracking

    if store.exp_id is None:
        return None
    runs = tracking.search(store.client, store.exp_id, tags={
        "sdd.step": "study", "sdd.study_file": study.display_path, "sdd.config_hash": study.content_hash})
    return runs[-1] if runs else None


def find_stage_run(store: Store, study_run_id: str, stage: str) -> Run | None:
    from sdd import tracking

    if store.exp_id is None:
        return None
    runs = tracking.search(store.client, store.exp_id, tags={"sdd.step": "sweep", "sdd.stage": stage},
                           parent=study_run_id)
    return runs[-1] if runs else None


class _ProjectRun:
    """The run `mlflow run` created (MLFLOW_RUN_ID), held aside while Ray starts.

    Ray workers inherit the environment of the process that starts Ray; with MLFLOW_RUN_ID in it every
    trial would write into that one run. It is offered to the study and stage runs this sweep opens
    (the first new one adopts it, see `tracking.start_run`), or discarded.
    """

    def __init__(self) -> None:
        self.run_id = os.environ.pop("MLFLOW_RUN_ID", None)

    def restore(self) -> None:
        """Put it back: for the next run opened to adopt, or for the command line to discard on bad input."""
        if self.run_id:
            os.environ["MLFLOW_RUN_ID"] = self.run_id
            self.run_id = None

    def discard(self, store: Store) -> None:
        from sdd import tracking

        if self.run_id:
            self.restore()
            tracking.discard_project_run(store.client)


def _open_run(store: Store, spec: Any, project: _ProjectRun, what: str) -> Any:
    """A study or stage run: its newest run is continued (refused while a live process holds it)."""
    from sdd import lifecycle

    project.restore()
    return lifecycle.acquire(store.client, store.exp_id, spec, wait=False, reopen_finished=True, what=what)


def open_study_run(store: Store, study: StudyFile, project: _ProjectRun) -> str:
    from sdd.lifecycle import RunSpec

    tags = {"sdd.step": "study", "sdd.study_file": study.display_path, "sdd.config_hash": study.content_hash,
            "sdd.study_name": study.name, "sdd.stages": ",".join(study.stage_names())}
    lease = _open_run(store, RunSpec("study", study.content_hash, study.name, tags,
                                     match_tags={"sdd.study_file": study.display_path}), project,
                      f"study {study.name} run")
    if not lease.is_new:
        log.info("study %s: continuing study run %s", study.name, lease.run_id)
        return lease.run_id
    store.client.log_text(lease.run_id, study.text, "study.yaml")
    if study.description:
        store.client.set_tag(lease.run_id, "mlflow.note.content", study.description)
    log.info("study %s: new study run %s", study.name, lease.run_id)
    return lease.run_id


def open_stage_run(store: Store, study: StudyFile, study_run_id: str, stage: str, project: _ProjectRun) -> str:
    from sdd import tracking
    from sdd.lifecycle import RunSpec

    config_hash = content_hash(f"{study.content_hash}:{stage}")
    tags = {"sdd.step": "sweep", "sdd.stage": stage, "sdd.study_run_id": study_run_id, "sdd.config_hash": config_hash}
    lease = _open_run(store, RunSpec("sweep", config_hash, f"{study.name}/{stage}", tags, parent_run_id=study_run_id,
                                     scope_parent=study_run_id, match_tags={"sdd.stage": stage}), project,
                      f"stage {stage} run")
    if lease.is_new:
        spec = study.stages[stage]
        params = {f"recipe.{k}": v for k, v in spec.recipe.items()}
        params["grid"] = json.dumps([{k: list(v) for k, v in grid.items()} for grid in spec.grids])
        tracking.log_params(store.client, lease.run_id, params)
    return lease.run_id


def settle_orphans(store: Store, stage_run_id: str) -> None:
    """Mark runs of this stage left RUNNING by a killed sweep KILLED, once their processes are gone.

    A killed driver's Ray workers may still be training for a moment: starting the same trial beside
    them would create a duplicate, so wait for them first.
    """
    from sdd import tracking

    deadline = time.monotonic() + ORPHAN_WAIT_S
    for run in tracking.search(store.client, store.exp_id, tags={"sdd.stage_run_id": stage_run_id},
                               status="RUNNING"):
        if run.data.tags.get("sdd.host") != socket.gethostname():
            log.warning("run %s is RUNNING on host %s; left alone", run.info.run_id, run.data.tags.get("sdd.host"))
            continue
        while tracking.held_by_live_process(run):
            if time.monotonic() > deadline:
                raise UsageError(f"run {run.info.run_id} of this stage is still being trained by process "
                                 f"{run.data.tags['sdd.pid']}; is another sweep of this study running?")
            time.sleep(0.5)
        tracking.mark_killed(store.client, store.client.get_run(run.info.run_id))
        log.info("marked run %s of a killed sweep KILLED", run.info.run_id)


# --- planning -----------------------------------------------------------------------------------

def plan_dense(store: Store, study: StudyFile) -> Plan:
    stage = study.stages["dense"]
    trials = []
    for label, point in stage.points():
        if point.get("data_dir"):
            # Trials run in their own working directories: a relative data_dir means the sweep's.
            point = {**point, "data_dir": str(Path(point["data_dir"]).resolve())}
        cfg = C.from_flat_dict(C.TrainConfig, point)
        teacher_run = _teacher_run(store, cfg.distill.teacher) if cfg.distill.teacher else None
        trials.append(_make_trial(stage, label or "dense", "train", C.to_flat_dict(cfg), cfg.model.width, {},
                             teacher_run))
    return Plan("dense", trials)


def _make_trial(stage: Stage, key: str, step: str, config: dict[str, Any], width: int, tags: dict[str, str],
           teacher_run: str | None) -> Trial:
    rule = stage.resources.for_width(width)
    assert rule is not None  # study_file checked that the rules cover every dense width
    return Trial(key, step, config, rule.cpu, rule.gpu, tags, teacher_run)


def _teacher_run(store: Store, ref: str) -> str:
    from sdd.distillation import resolve_teacher

    return resolve_teacher(store.client, ref).run_id


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
        records = json.loads(_read_artifact_text(store, dense_run.info.run_id, TRIALS_ARTIFACT))
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


def _read_artifact_text(store: Store, run_id: str, path: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = store.client.download_artifacts(run_id, path, tmp)
        except Exception as err:  # MLflow raises store-specific errors for a missing artifact
            raise FileNotFoundError(path) from err
        return Path(local).read_text()


def _group_key(dense: Stage, config: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """Dense runs that differ only in width and seed share one DD curve and one threshold."""
    return tuple((axis, show_value(config[axis])) for axis in dense.axes if axis not in ("width", "seed"))


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
            chosen, it = _auto_group(spec.start, stage, key, members, plan)
            it_widths[_group_label(key)] = it
            starts.extend(chosen)
        plan.tags["sdd.it_widths"] = json.dumps(it_widths)
        plan.tags["sdd.it_threshold"] = f"{spec.start.threshold:g}"
    else:
        for i, ref in enumerate(spec.start):
            matches = [r for r in results
                       if all(show_value(r.config[k]) == show_value(v) for k, v in ref.match.items())]
            if len(matches) != 1:
                why = "no finished run" if not matches else f"{len(matches)} runs"
                raise UsageError(f"{study.display_path}: stages.{stage}.start[{i}] ({ref.label()}): the dense stage "
                                 f"has {why} with these settings")
            starts.append(Start(matches[0], ref.epoch, None, _group_key(dense, matches[0].config)))
    plan.starts = [{"role": s.role, "group": _group_label(s.group), "width": s.result.width,
                    "seed": s.result.seed, "epoch": s.epoch, "dense_run_id": s.result.run_id} for s in starts]
    return starts, plan


def _auto_group(auto: AutoStart, stage: str, key: tuple[tuple[str, str], ...], members: list[DenseResult],
                plan: Plan) -> tuple[list[Start], float]:
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
    seeds = auto.seeds or (min(r.seed for r in members),)
    starts = []
    for role in auto.roles:
        if role not in roles:
            continue
        for seed in seeds:
            match = [r for r in members if r.width == roles[role] and r.seed == seed]
            if not match:
                raise UsageError(f"{stage} stage ({label}): the dense run of width {roles[role]}, seed {seed} did "
                                 f"not finish; run the dense stage again")
            starts.append(Start(match[0], auto.epoch, role, key))
    plan.notes.append(f"{label}: interpolation threshold at width {it} (mean noisy-subset fit "
                      f"{fit[i]:.3f} >= {auto.threshold:g}); starts: " +
                      ", ".join(f"{role} {roles[role]}" for role in auto.roles if role in roles))
    return starts, it


def plan_chains(store: Store, study: StudyFile, stage: str, study_run_id: str | None) -> Plan:
    """Chains of a prune or distill stage: starting checkpoints x grid points (x teachers)."""
    results = dense_results(store, study, study_run_id, stage)
    starts, plan = select_starts(study, stage, results)
    spec, dense = study.stages[stage], study.stages["dense"]
    step = STEP_OF_STAGE[stage]
    for start in starts:
        for label, point in spec.points():
            teacher, teacher_run = "", None
            if stage == "distill":
                teacher = _teacher_ref(point["teacher"], start, results)
                teacher_run = _teacher_run(store, teacher)
            cfg = chain_config(stage, {**point, "start_epoch": start.epoch}, parent=start.result.run_id,
                               teacher=teacher)
            key = start.label(dense) + (f" | {label}" if label else "")
            tags = {"sdd.start_role": start.role} if start.role else {}
            plan.trials.append(_make_trial(spec, key, step, C.to_flat_dict(cfg), start.result.width, tags, teacher_run))
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


_DATA_FIELDS = tuple(C.flat_fields(C.DataConfig))


def _data_key(r: DenseResult) -> tuple[str, ...]:
    """Dense runs trained on the same data (dataset, noise, ...): the teachers a chain may use."""
    return tuple(show_value(r.config.get(k)) for k in _DATA_FIELDS if k != "data_dir")


def plan_stage(store: Store, study: StudyFile, stage: str, study_run_id: str | None) -> Plan:
    plan = plan_dense(store, study) if stage == "dense" else plan_chains(store, study, stage, study_run_id)
    keys = [t.key for t in plan.trials]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise UsageError(f"{study.display_path}: stages.{stage}: the trial {twice[0]!r} appears twice "
                         "(a starting checkpoint listed twice?)")
    return plan


# --- finished-run lookup (dry run) --------------------------------------------------------------

def finished_run(store: Store, trial: Trial) -> str | None:
    """The FINISHED run that already covers this trial, by the config hash its step would compute."""
    from sdd import tracking

    if store.exp_id is None:
        return None
    if trial.step == "train":
        chash = C.train_hash(C.from_flat_dict(C.TrainConfig, trial.config), trial.teacher_run)
    elif trial.step == "prune":
        cfg = C.from_flat_dict(C.PruneConfig, trial.config)
        chash = C.chain_hash(cfg, cfg.parent, None, None)
    else:
        both = C.from_flat_dict(C.DistillChainConfig, trial.config)
        chash = C.chain_hash(both.prune, both.prune.parent, both.distill, trial.teacher_run)
    run = tracking.find_finished(store.client, store.exp_id, trial.step, chash)
    return run.info.run_id if run else None


# --- Ray ----------------------------------------------------------------------------------------

@contextmanager
def ray_runtime(address: str | None) -> Iterator[None]:
    """Connect to Ray (`address`: None = RAY_ADDRESS or a new local instance; 'auto'; host:port;
    ray://host:port), or use the runtime the caller already started."""
    import ray

    if ray.is_initialized():
        yield
        return
    _check_ray_address(address)
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING}
    if _is_local(address):
        kwargs["include_dashboard"] = False  # a local runtime: nobody watches its dashboard
    if faults.forwarded_environment():  # a test's fault points must reach the trials' workers
        kwargs["runtime_env"] = {"env_vars": faults.forwarded_environment()}
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, ValueError, RuntimeError, TimeoutError) as err:
        raise UsageError(f"cannot connect to Ray at {address}: {str(err).splitlines()[0]}") from None
    try:
        yield
    finally:
        ray.shutdown()


def _check_ray_address(address: str | None) -> None:
    if address in (None, "auto", "local"):
        return
    if address.startswith(("http://", "https://")):
        raise UsageError(f"--address {address}: that is the dashboard (for `ray job submit`); give the cluster's "
                         "GCS address host:6379 or a Ray Client address ray://host:10001")
    hostport = address[len("ray://"):] if address.startswith("ray://") else address
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--address {address}: expected auto, host:port or ray://host:port")
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as err:
        raise UsageError(f"Ray at {address} is unreachable ({err.strerror or err})") from None


def _is_local(address: str | None) -> bool:
    return address is None and os.environ.get("RAY_ADDRESS", "local") in ("", "local")


def local_node() -> dict[str, float]:
    """The resources a new local Ray runtime would have: checked before starting one for nothing."""
    import torch

    return {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}


def check_resources(study: StudyFile, stages: list[str], nodes: list[dict[str, float]] | None = None) -> None:
    """Every resource request of these stages must fit on some node (default: Ray's alive nodes)."""
    if nodes is None:
        import ray

        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    widths = study.stages["dense"].values("width", C.ModelConfig().width) if "dense" in study.stages else ()
    for stage in stages:
        resources = study.stages[stage].resources
        used = {resources.for_width(int(w)) for w in widths} if widths else set(resources.rules)
        for rule in used:
            if rule is None:
                continue
            if not any(n.get("CPU", 0) >= rule.cpu and n.get("GPU", 0) >= rule.gpu for n in nodes):
                have = ", ".join(f"{n.get('CPU', 0):g} CPU/{n.get('GPU', 0):g} GPU" for n in nodes)
                raise UsageError(f"{study.display_path}: stages.{stage}.resources: no node can run a trial with "
                                 f"cpu {rule.cpu:g}, gpu {rule.gpu:g} (nodes: {have})")


def _trial_resources(config: dict[str, Any]) -> Any:
    from ray.tune import PlacementGroupFactory

    spec = config["spec"]
    bundle = {"CPU": spec["cpu"]}
    if spec["gpu"]:
        bundle["GPU"] = spec["gpu"]
    return PlacementGroupFactory([bundle])


def run_trial(config: dict[str, Any]) -> None:
    """The Tune trainable: run one step with retries and report its MLflow run id.

    Runs in a Ray worker; with actor reuse one worker runs many trials, so imports and the cached
    dataset are paid once per worker. Exceptions are caught here and reported as the trial's result,
    so the stage records them; Tune's own retries (FailureConfig) cover a worker process that dies.
    """
    import torch
    from ray import tune

    _quiet_worker()
    spec, ctx = config["spec"], config["ctx"]
    torch.set_num_threads(max(1, int(spec["cpu"])))
    outcome: dict[str, Any] = {"run_id": None, "reused": False, "error": None}
    attempts = 0
    for attempts in range(1, ctx["retries"] + 2):
        try:
            result = _run_step(spec, ctx)
        except UsageError as err:  # bad input stays bad: not retried
            outcome.update(status="FAILED", error=f"UsageError: {err}", run_id=getattr(err, "sdd_run_id", None))
            break
        except Exception as err:  # any other failure may be transient: retried (in the same run)
            outcome.update(status="FAILED", error=f"{type(err).__name__}: {err}"[:2000],
                           run_id=getattr(err, "sdd_run_id", None))
            logging.getLogger(__name__).warning("trial %s attempt %d failed: %s", spec["key"], attempts,
                                                outcome["error"])
            continue
        outcome.update(status="FINISHED", run_id=result.run_id, reused=result.reused, error=None,
                       metrics={k: result.metrics[k] for k in ("test_acc", "val_acc", "train_acc_noisy")
                                if k in result.metrics})
        break
    outcome["attempts"] = attempts
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "trial.json").write_text(json.dumps({"trial": spec["key"], **outcome}))
        tune.report({"status": outcome["status"], "run_id": outcome["run_id"] or "",
                     "reused": outcome["reused"], "error": outcome["error"] or "", "attempts": attempts,
                     **outcome.get("metrics", {})},
                    checkpoint=tune.Checkpoint.from_directory(tmp))


def _run_step(spec: dict[str, Any], ctx: dict[str, Any]) -> Any:
    tags = {"sdd.study_run_id": ctx["study_run_id"], "sdd.stage_run_id": ctx["stage_run_id"], **spec["tags"]}
    if spec["step"] == "train":
        from sdd.dense import run_train

        cfg = C.from_flat_dict(C.TrainConfig, spec["config"])
        return run_train(cfg, tracking_uri=ctx["tracking_uri"], experiment=ctx["experiment"],
                         parent_run_id=ctx["stage_run_id"], extra_tags=tags)
    from sdd.chain import run_prune

    if spec["step"] == "prune":
        return run_prune(C.from_flat_dict(C.PruneConfig, spec["config"]), tracking_uri=ctx["tracking_uri"],
                         extra_tags=tags)
    both = C.from_flat_dict(C.DistillChainConfig, spec["config"])
    return run_prune(both.prune, both.distill, tracking_uri=ctx["tracking_uri"], extra_tags=tags)


def _quiet_worker() -> None:
    """Trials log warnings only: the driver reports progress, one line per finished trial."""
    import warnings

    import mlflow  # noqa: F401 - importing mlflow resets its loggers' levels: import it first

    logging.getLogger().setLevel(logging.WARNING)
    for name in ("mlflow", "alembic", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.ERROR if name in ("mlflow", "alembic") else logging.WARNING)
    warnings.filterwarnings("ignore", module="mlflow")


def _progress_callback(stage: str, total: int) -> Any:
    from ray import tune

    class Progress(tune.Callback):
        """One log line per finished trial and a heartbeat while trials run: done / total, elapsed."""

        def __init__(self) -> None:
            self.started = time.monotonic()
            self.done = self.failed = self.reused = 0
            self.last = self.started

        def elapsed(self) -> str:
            s = int(time.monotonic() - self.started)
            return f"{s // 60}:{s % 60:02d}"

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            self.done += 1
            self.reused += bool(result.get("reused"))
            ok = result.get("status") == "FINISHED"
            self.failed += not ok
            what = (("reused " if result.get("reused") else "") + f"run {result['run_id'][:8]}"
                    + (f" test_acc {result['test_acc']:.4f}" if "test_acc" in result else "")) if ok \
                else f"FAILED after {result.get('attempts')} attempt(s): {result.get('error', '')[:200]}"
            log.info("%s %d/%d [%s]: %s -> %s", stage, self.done, total, self.elapsed(),
                     trial.config["spec"]["key"], what)

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            self.done += 1
            self.failed += 1
            log.warning("%s %d/%d [%s]: %s -> worker died", stage, self.done, total, self.elapsed(),
                        trial.config["spec"]["key"])

        def on_step_end(self, iteration, trials, **info) -> None:
            if time.monotonic() - self.last >= HEARTBEAT_S:
                self.last = time.monotonic()
                running = sum(t.status == "RUNNING" for t in trials)
                log.info("%s: %d/%d trials done (%d reused, %d failed), %d running, %s elapsed", stage,
                         self.done, total, self.reused, self.failed, running, self.elapsed())

    return Progress()


def _record(trial: Trial, **fields: Any) -> dict[str, Any]:
    """A trials.json record (the format the analysis reads)."""
    return {"trial": trial.key, "step": trial.step, "config": trial.config, "run_id": None, "status": "KILLED",
            "reused": False, "error": None, "attempts": 0, **fields}


def execute(trials: list[Trial], stage: str, study: StudyFile, ctx: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Run trials as one Tune grid; their trials.json records by trial key."""
    from ray import tune

    # Tune's new output engine prints its experiment table even at verbose=0; the legacy one is silent
    # there, and the progress callback reports instead. Set RAY_AIR_NEW_OUTPUT=1 to get Tune's table.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    tuner = tune.Tuner(
        tune.with_resources(run_trial, _trial_resources),
        param_space={"spec": tune.grid_search([t.spec() for t in trials]), "ctx": ctx},
        tune_config=tune.TuneConfig(reuse_actors=True, max_concurrent_trials=study.max_concurrent,
                                    trial_dirname_creator=lambda t: f"{stage}_{t.trial_id}"),
        run_config=tune.RunConfig(
            name=f"{study.name}-{stage}-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=study.storage_path,
            verbose=0, failure_config=tune.FailureConfig(max_failures=study.retries),
            callbacks=[_progress_callback(stage, len(trials))]))
    results = {r.config["spec"]["key"]: r for r in tuner.fit()}
    records = {}
    for trial in trials:
        result = results.get(trial.key)
        metrics = result.metrics if result is not None else {}
        if metrics.get("status"):
            records[trial.key] = _record(trial, run_id=metrics["run_id"] or None, status=metrics["status"],
                                         reused=bool(metrics["reused"]), error=metrics["error"] or None,
                                         attempts=int(metrics["attempts"]))
        elif result is not None and result.error is not None:  # the worker process died, retries included
            records[trial.key] = _record(trial, status="FAILED", attempts=study.retries + 1,
                                         error=f"{type(result.error).__name__}: {result.error}"[:2000])
        else:
            records[trial.key] = _record(trial)
    return records


def covered_trials(store: Store, plan: Plan) -> dict[str, str]:
    """Trials whose finished run already exists (by config hash): recorded as reused, never launched.

    The steps themselves would return the same run, but only after a worker has started, imported
    torch and loaded the data; a re-run of a finished study then takes seconds and needs no Ray.
    """
    found = {t.key: finished_run(store, t) for t in plan.trials if not t.config.get("force")}
    return {k: v for k, v in found.items() if v}


class _RayOnDemand:
    """Starts (or connects to) Ray the first time a trial has to run, and checks the resource requests."""

    def __init__(self, stack: ExitStack, address: str | None, study: StudyFile, stages: list[str]) -> None:
        self.stack, self.address, self.study, self.stages = stack, address, study, stages
        self.ready = False

    def __call__(self) -> None:
        if not self.ready:
            if _is_local(self.address):
                check_resources(self.study, self.stages, [local_node()])
            self.stack.enter_context(ray_runtime(self.address))
            check_resources(self.study, self.stages)
            self.ready = True


# --- stages and sweeps --------------------------------------------------------------------------

def run_stage(store: Store, study: StudyFile, study_run_id: str, plan: Plan, covered: dict[str, str],
              project: _ProjectRun, need_ray: _RayOnDemand) -> StageOutcome:
    from mlflow.entities import Metric, RunTag

    from sdd import tracking

    client, stage = store.client, plan.stage
    stage_run_id = open_stage_run(store, study, study_run_id, stage, project)
    if "sdd.not_run" in client.get_run(stage_run_id).data.tags:  # it could not be planned last time; now it can
        client.delete_tag(stage_run_id, "sdd.not_run")
        client.delete_tag(stage_run_id, "sdd.error")
    for note in plan.notes:
        log.info("%s stage: %s", stage, note)
    if plan.tags:
        client.log_batch(stage_run_id, tags=[RunTag(k, v) for k, v in plan.tags.items()])
    if plan.starts:
        client.log_text(stage_run_id, json.dumps(plan.starts, indent=1), STARTS_ARTIFACT)
    pending = [t for t in plan.trials if t.key not in covered]
    log.info("%s stage (run %s): %d trials, %d covered by finished runs, %d to run", stage, stage_run_id,
             len(plan.trials), len(covered), len(pending))
    ctx = {"tracking_uri": store.uri, "experiment": store.experiment, "study_run_id": study_run_id,
           "stage_run_id": stage_run_id, "retries": study.retries}
    started = time.monotonic()
    try:
        ran = {}
        if pending:
            settle_orphans(store, stage_run_id)
            need_ray()
            ran = execute(pending, stage, study, ctx)
    except BaseException as err:
        client.set_tag(stage_run_id, "sdd.error", f"{type(err).__name__}: {err}"[:5000])
        tracking.terminate(client, stage_run_id, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    seconds = time.monotonic() - started
    records = [ran[t.key] if t.key in ran else _record(t, run_id=covered[t.key], status="FINISHED", reused=True)
               for t in plan.trials]
    outcome = StageOutcome(stage, stage_run_id, records, seconds)
    client.log_text(stage_run_id, json.dumps(records, indent=1), TRIALS_ARTIFACT)
    finished = sum(r["status"] == "FINISHED" for r in records)
    reused = sum(r["reused"] for r in records)
    failed_keys = "; ".join(r["trial"] for r in records if r["status"] != "FINISHED")
    client.log_batch(stage_run_id, metrics=[
        Metric(k, float(v), int(time.time() * 1000), 0) for k, v in (
            ("trials_total", len(records)), ("trials_finished", finished), ("trials_failed", outcome.failed),
            ("trials_reused", reused), ("wall_time_s", seconds))],
        tags=[RunTag("sdd.trials_failed", str(outcome.failed))] + (
            [RunTag("sdd.failed_trials", failed_keys[:5000])] if failed_keys else []))
    tracking.terminate(client, stage_run_id, "FAILED" if outcome.failed else "FINISHED")
    faults.reach(f"stage-{stage}-done", stage_run_id)
    log.info("%s stage: %d/%d trials finished (%d reused, %d failed) in %.0fs", stage, finished, len(records),
             reused, outcome.failed, seconds)
    return outcome


def skip_stage(store: Store, study: StudyFile, study_run_id: str, stage: str, reason: str,
               project: _ProjectRun) -> StageOutcome:
    """Record a chain stage that could not be planned: its stage run, FAILED, says why."""
    from mlflow.entities import RunTag

    from sdd import tracking

    stage_run_id = open_stage_run(store, study, study_run_id, stage, project)
    store.client.log_text(stage_run_id, "[]", TRIALS_ARTIFACT)
    store.client.log_batch(stage_run_id, tags=[RunTag("sdd.not_run", reason[:5000]),
                                               RunTag("sdd.error", f"UsageError: {reason}"[:5000])])
    tracking.terminate(store.client, stage_run_id, "FAILED")
    log.error("%s stage not run: %s", stage, reason)
    return StageOutcome(stage, stage_run_id, [], 0.0, not_run=reason)


def run_sweep(path: str | Path, *, stage: str | None = None, address: str | None = None,
              storage_path: str | None = None) -> SweepOutcome:
    """Run a study file's stages (or one of them) under its study run; see the module docstring."""
    from sdd import tracking

    study = with_storage(load_study(path), storage_path)
    stages = _stages(study, stage)
    project = _ProjectRun()
    outcomes: list[StageOutcome] = []
    with ExitStack() as stack:
        # Bad input (the store, the first stage's plan, Ray, resources) fails here, before any run exists.
        try:
            store = open_store(study.experiment, create=True)
            previous = find_study_run(store, study)
            need_ray = _RayOnDemand(stack, address, study, stages)
            plan = plan_stage(store, study, stages[0], previous.info.run_id if previous else None)
            covered = covered_trials(store, plan)
            if len(covered) < len(plan.trials):
                need_ray()
            study_run_id = open_study_run(store, study, project)
        except BaseException:
            project.restore()
            raise
        try:
            for i, name in enumerate(stages):
                if i:
                    # A chain stage starts from the dense runs that finished; one that cannot (say, its
                    # starting width failed) is recorded as not run, and the study goes on.
                    try:
                        plan = plan_stage(store, study, name, study_run_id)
                    except UsageError as err:
                        outcomes.append(skip_stage(store, study, study_run_id, name, str(err), project))
                        continue
                    covered = covered_trials(store, plan)
                outcomes.append(run_stage(store, study, study_run_id, plan, covered, project, need_ray))
                if name == "dense" and outcomes[-1].failed and len(stages) > 1:
                    log.warning("dense stage: %d trial(s) failed; the chain stages start from the dense runs "
                                "that finished", outcomes[-1].failed)
        except BaseException as err:
            store.client.set_tag(study_run_id, "sdd.error", f"{type(err).__name__}: {err}"[:5000])
            tracking.terminate(store.client, study_run_id, "KILLED" if isinstance(err, KeyboardInterrupt)
                               else "FAILED")
            raise
        finally:
            project.discard(store)
    outcome = SweepOutcome(study, study_run_id, outcomes, store.uri, stages)
    tracking.terminate(store.client, study_run_id, "FINISHED" if outcome.complete else "FAILED")
    return outcome


def _stages(study: StudyFile, stage: str | None) -> list[str]:
    if stage is None:
        return study.stage_names()
    if stage not in study.stages:
        raise UsageError(f"--stage {stage}: {study.display_path} has no {stage} stage (it has: "
                         f"{', '.join(study.stage_names())})")
    return [stage]


# --- dry run ------------------------------------------------------------------------------------

def dry_run(path: str | Path, *, stage: str | None = None) -> list[str]:
    """Lines describing every trial the file would run, its resources, and whether a finished run
    covers it. Creates no run, no experiment and starts no Ray."""
    study = load_study(path)
    stages = _stages(study, stage)
    store = open_store(study.experiment, create=False)
    previous = find_study_run(store, study)
    lines = [f"study {study.name} ({study.display_path}, content {study.content_hash}); tracking {store.uri}, "
             f"experiment {store.experiment}" + (f"; study run {previous.info.run_id}" if previous else
                                                 "; no study run yet")]
    for name in stages:
        try:
            plan = plan_stage(store, study, name, previous.info.run_id if previous else None)
        except DenseStageNotRun:
            lines.append(f"stage {name}: the dense stage has not run yet; {_start_summary(study.stages[name])}")
            continue
        done = {t.key: finished_run(store, t) for t in plan.trials}
        todo = sum(v is None for v in done.values())
        lines.append(f"stage {name}: {len(plan.trials)} trial(s), {todo} to run, {len(plan.trials) - todo} "
                     f"covered by finished runs")
        lines.extend(f"  note: {n}" for n in plan.notes)
        for t in plan.trials:
            state = f"finished run {done[t.key]}" if done[t.key] else "to run"
            lines.append(f"  {t.step:7s} {t.key}  [cpu {t.cpu:g}, gpu {t.gpu:g}]  {state}")
    return lines


def _start_summary(stage: Stage) -> str:
    points = len(stage.points())
    if isinstance(stage.start, AutoStart):
        seeds = f"seeds {', '.join(map(str, stage.start.seeds))}" if stage.start.seeds else "the first seed"
        return (f"{points} chain(s) from each of the widths {', '.join(stage.start.roles)} the interpolation "
                f"threshold it finds ({seeds}, per group of dense runs), chosen once it has run")
    return f"{len(stage.start)} named checkpoint(s) x {points} grid point(s) = {len(stage.start) * points} chain(s)"


# --- command line -------------------------------------------------------------------------------

HELP = "run a study file's stages as Ray Tune grids (dense widths, pruning and distillation chains)"


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="study file, e.g. sweeps/mnist1d_quick.yaml")
    p.add_argument("--stage", type=_choice_or_none(STAGES), default=None, metavar="{" + ",".join(STAGES) + "}",
                   help="run only this stage, inside the file's most recent study run (default: every stage)")
    add_ray_options(p)
    p.add_argument("--dry-run", nargs="?", const=True, default=False, type=_flag, metavar="true|false",
                   help="print every trial with its resources and whether a finished run covers it; run nothing")


def add_ray_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", type=_text_or_none, default=None,
                   help="Ray cluster: auto, host:port (GCS) or ray://host:port (default: $RAY_ADDRESS, else a "
                        "new local Ray)")
    p.add_argument("--storage-path", type=_text_or_none, default=None,
                   help="Ray Tune storage (shared folder or s3:// on multi-node clusters; overrides the file's "
                        "storage_path; default: ~/ray_results)")


# MLproject entry points pass every parameter, an unset one as "": it means the option's default.

def _text_or_none(text: str) -> str | None:
    return text.strip() or None


def _choice_or_none(choices: tuple[str, ...]) -> Any:
    def parse(text: str) -> str | None:
        value = _text_or_none(text)
        if value is not None and value not in choices:
            raise argparse.ArgumentTypeError(f"expected one of {', '.join(choices)}, got {text!r}")
        return value
    return parse


def _flag(text: str) -> bool:
    try:
        return bool(C.parse_value(bool, text or "false"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def command(args: argparse.Namespace) -> int:
    if args.dry_run:
        for line in dry_run(args.file, stage=args.stage):
            print(line)
        if os.environ.get("MLFLOW_RUN_ID"):  # under `mlflow run`: a dry run leaves nothing behind
            from sdd.tracking import discard_project_run

            discard_project_run()
        return 0
    outcome = run_sweep(args.file, stage=args.stage, address=args.address, storage_path=args.storage_path)
    print_outcome(outcome)
    print(f"browse the runs: mlflow ui --backend-store-uri {outcome.tracking_uri}")
    return 0 if outcome.complete else 1


def print_outcome(outcome: SweepOutcome) -> None:
    for stage in outcome.stages:
        if stage.not_run:
            print(f"{stage.stage}: not run: {stage.not_run} (stage run {stage.run_id})")
            continue
        finished = sum(r["status"] == "FINISHED" for r in stage.records)
        print(f"{stage.stage}: {finished}/{len(stage.records)} trials finished, {stage.failed} failed "
              f"({stage.seconds:.0f}s), stage run {stage.run_id}")
    print(f"study run {outcome.study_run_id} ({outcome.study.name})")
