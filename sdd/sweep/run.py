"""`sdd sweep` and `sdd study`: a study file's stages, each a Ray Tune grid under one study run.

A stage whose trials are all covered by finished runs records them as reused and starts no Ray, so a
sweep run again after a kill finishes only what is missing. `run_study` runs every stage, then the
analysis, which reads the study back from MLflow and writes figures, tables and report.md (also
logged to the study run).
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdd import faults
from sdd.errors import UsageError
from sdd.sweep import presets
from sdd.sweep.lineage import (STARTS_ARTIFACT, TRIALS_ARTIFACT, Store, _ProjectRun, _record, find_study_run,
                               open_stage_run, open_store, open_study_run, settle_orphans)
from sdd.sweep.plan import DenseStageNotRun, Plan, covered_trials, finished_run, plan_stage, seed_packs
from sdd.sweep.ray_runner import _RayOnDemand, execute
from sdd.sweep.study_file import AutoStart, Stage, StudyFile, load_study, with_storage

log = logging.getLogger(__name__)

DEFAULT_FILE = presets.DEFAULT


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
class StudyResult:
    sweep: SweepOutcome
    report: Path
    seconds: float


# --- stages -------------------------------------------------------------------------------------

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
            launches = seed_packs(pending, study.stages[stage])
            packs = [len(members) for members in launches if len(members) > 1]
            if packs:
                log.info("%s stage: %d trials run as %d seed pack(s) of %s seeds (pack_seeds: %s)", stage,
                         sum(packs), len(packs), "/".join(map(str, sorted(set(packs)))),
                         study.stages[stage].pack_seeds)
            ran = execute(launches, stage, study, ctx)
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


# --- sweeps -------------------------------------------------------------------------------------

def run_sweep(path: str | Path, *, stage: str | None = None, address: str | None = None,
              storage_path: str | None = None) -> SweepOutcome:
    """Run a study file's stages (or one of them) under its study run; see the module docstring."""
    from sdd import tracking

    study = with_storage(load_study(presets.find(path)), storage_path)
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


def dry_run(path: str | Path, *, stage: str | None = None) -> list[str]:
    """Lines describing every trial the file would run, its resources, and whether a finished run
    covers it. Creates no run, no experiment and starts no Ray."""
    study = load_study(presets.find(path))
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
        packs = {t.key: len(members) for members in seed_packs([t for t in plan.trials if not done[t.key]],
                                                               study.stages[name]) for t in members}
        for t in plan.trials:
            state = f"finished run {done[t.key]}" if done[t.key] else "to run"
            if packs.get(t.key, 1) > 1:
                state += f" in a seed pack of {packs[t.key]}"
            lines.append(f"  {t.step:7s} {t.key}  [cpu {t.cpu:g}, gpu {t.gpu:g}]  {state}")
    return lines


def _start_summary(stage: Stage) -> str:
    points = len(stage.points())
    if isinstance(stage.start, AutoStart):
        seeds = f"seeds {', '.join(map(str, stage.seeds))}" if stage.seeds else "every dense seed"
        return (f"{points} chain(s) per seed from each of the widths {', '.join(stage.start.roles)} the "
                f"interpolation threshold it finds ({seeds}, per group of dense runs), chosen once it has run")
    starts = sum(len(s.seeds) for s in stage.start)
    return f"{starts} named checkpoint(s) and seed(s) x {points} grid point(s) = {starts * points} chain(s)"


# --- studies ------------------------------------------------------------------------------------

def run_study(path: str | Path, *, address: str | None = None, storage_path: str | None = None,
              out_dir: Path | None = None) -> StudyResult:
    """Run every stage, then the analysis; the report goes to `out_dir` (default reports/<name>-<id8>/)."""
    from analysis.report import analyze_study, default_out_dir
    from sdd import tracking

    started = time.monotonic()
    outcome = run_sweep(path, address=address, storage_path=storage_path)
    client = tracking.get_client(outcome.tracking_uri)
    study_run = client.get_run(outcome.study_run_id)
    log.info("analysis of study run %s", outcome.study_run_id)
    # No threshold passed: the report reads the one the study recorded (`sdd.it_threshold`) and says so.
    report = analyze_study(client, outcome.study_run_id, out_dir or default_out_dir(study_run))
    seconds = time.monotonic() - started
    client.log_metric(outcome.study_run_id, "wall_time_s", seconds)
    return StudyResult(outcome, report, seconds)
