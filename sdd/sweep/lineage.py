"""A study's lineage in MLflow: the tracking store, the study and stage runs, and the trials record.

Lineage (design.md): study run (sdd.step=study) -> stage run (sdd.step=sweep, sdd.stage=...) -> dense
runs nested under the dense stage run; chains are nested under their dense parent by `run_prune` and
carry the study and stage run ids as tags. Every stage run logs `trials.json` (`TRIALS_ARTIFACT`), one
record per trial: {"trial", "step", "config", "run_id", "status", "reused", "error", "attempts"}.

The analysis reads these back, so importing this module loads no torch, mlflow or ray (they load
inside the functions that need them).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdd.errors import UsageError
from sdd.sweep.study_file import StudyFile, content_hash

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

    from sdd.sweep.plan import Trial

log = logging.getLogger(__name__)

TRIALS_ARTIFACT = "trials.json"
STARTS_ARTIFACT = "starts.json"
# Ray workers of a killed driver outlive it for a moment; their runs are left alone until they exit.
ORPHAN_WAIT_S = 60.0
CONNECT_TIMEOUT_S = 5.0


# --- tracking store -----------------------------------------------------------------------------

@dataclass
class Store:
    """The tracking store a sweep writes to; `exp_id` is None when a dry run finds no experiment."""

    uri: str
    client: MlflowClient
    exp_id: str | None
    experiment: str


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


# --- study and stage runs -----------------------------------------------------------------------

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

    # sdd.it_threshold: the one threshold that selected the starts and labels the chains, for `sdd analyze`.
    tags = {"sdd.step": "study", "sdd.study_file": study.display_path, "sdd.config_hash": study.content_hash,
            "sdd.study_name": study.name, "sdd.stages": ",".join(study.stage_names()),
            "sdd.it_threshold": f"{study.it_threshold:g}"}
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


# --- the trials record --------------------------------------------------------------------------

def _record(trial: Trial, **fields: Any) -> dict[str, Any]:
    """A trials.json record (the format the analysis reads); a trial that never reported is KILLED."""
    return {"trial": trial.key, "step": trial.step, "config": trial.config, "run_id": None, "status": "KILLED",
            "reused": False, "error": None, "attempts": 0, **fields}


def read_trials(store: Store, stage_run_id: str) -> list[dict[str, Any]]:
    """A stage run's trials.json records; FileNotFoundError if it has none (a killed stage)."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = store.client.download_artifacts(stage_run_id, TRIALS_ARTIFACT, tmp)
        except Exception as err:  # MLflow raises store-specific errors for a missing artifact
            raise FileNotFoundError(TRIALS_ARTIFACT) from err
        return json.loads(Path(local).read_text())
