"""MLflow bookkeeping shared by every step: the store, run lineage, reuse by config hash, batched logging.

Everything goes through an explicit `MlflowClient` and run ids, never MLflow's fluent "active run"
stack, so Ray trials, nested chains and tests cannot leak runs into each other.

Longer than most modules because every MLflow call of the steps goes through it (store, search,
run state, artifacts, datasets, model logging): the steps and `sdd.lifecycle` stay free of MLflow
details, and one MLflow change is mended here.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import logging
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import mlflow
import torch
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, Run, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_PARENT_RUN_ID

from sdd import checkpoints
from sdd.errors import UsageError

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_EXPERIMENT = "sdd"
PARENT_TAG = MLFLOW_PARENT_RUN_ID
MAX_BATCH = 1000
MAX_PARAM_CHARS = 6000
# Marks the experiment as model training. MLflow 3.17.2's UI does not act on it yet (checked in a browser:
# `#/experiments/<id>` opens on the GenAI overview, tagged or not); the `workflowType` URL parameter of
# every link sdd prints (RUNS_VIEW) is what opens the runs table.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
RUNS_VIEW = "?workflowType=machine_learning"
LOCAL_UI = "http://127.0.0.1:5000"
PIP_REQUIREMENTS = ["torch==2.14.1", "mlflow==3.17.2", "numpy"]


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else MLflow 3's own default: a sqlite file in the working directory.

    Made absolute so that processes that change directory (Ray trials) write to the same store.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"
    if uri.startswith("file:") or "://" not in uri:
        raise UsageError(f"MLFLOW_TRACKING_URI={uri!r}: the file store is refused by MLflow 3.13+; "
                         "use sqlite:///ABSOLUTE/path.db or http://host:port")
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    return uri


_READY_STORES: set[str] = set()


def get_client(uri: str | None = None, *, schema_ready: bool = False) -> MlflowClient:
    """A client of the store; a new sqlite store's schema is created by one process at a time.

    MLflow migrates a fresh sqlite database on first use; several trials doing that at once fail
    ("Online migration expected to match one row"), so the first use is serialised by a file lock.
    `schema_ready`: the caller knows the schema is complete (a sweep's driver made the store before any
    trial started), so this process skips the lock, now and in later calls for `uri`: a sweep's workers
    would otherwise wait for each other there, one client set-up at a time.
    """
    uri = uri or tracking_uri()
    if schema_ready:
        _READY_STORES.add(uri)
    if not uri.startswith("sqlite:///") or uri in _READY_STORES:
        return MlflowClient(tracking_uri=uri)
    lock_path = Path(uri[len("sqlite:///"):]).with_suffix(".lock")
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)
        client.search_registered_models(max_results=1)
    _READY_STORES.add(uri)
    return client


def experiment_id(client: MlflowClient, name: str | None = None) -> str:
    """The experiment to log into, created once even when concurrent trials race to create it.

    Precedence: explicit name, MLFLOW_EXPERIMENT_ID, MLFLOW_EXPERIMENT_NAME, then 'sdd'.
    """
    name = name or None
    if name is None and os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return os.environ["MLFLOW_EXPERIMENT_ID"]
    name = name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    for attempt in range(5):
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            if exp.tags.get(EXPERIMENT_KIND_TAG) is None:  # made before sdd tagged its experiments
                client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            return exp.experiment_id
        try:
            return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException:
            time.sleep(0.1 * (attempt + 1))  # another process created it first: read it back
    raise RuntimeError(f"could not create or find experiment {name!r}")


def ui_link(uri: str, exp_id: str, run_id: str | None = None) -> str:
    """Where a person browses a run (or an experiment's runs table): the tracking server's own page, or
    for a local store the page `mlflow ui` serves, with the command that starts it."""
    page = f"#/experiments/{exp_id}/runs" + (f"/{run_id}" if run_id else "") + RUNS_VIEW
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{page}"
    return f"{LOCAL_UI}/{page} (after `mlflow ui --backend-store-uri {uri}`)"


def search(client: MlflowClient, exp_id: str, *, tags: Mapping[str, str] | None = None,
           status: str | None = None, parent: str | None = None) -> list[Run]:
    """All active runs matching the tags (and status / parent run), oldest first."""
    clauses = [f"tags.`{k}` = '{v}'" for k, v in (tags or {}).items()]
    if status:
        clauses.append(f"attributes.status = '{status}'")
    if parent:
        clauses.append(f"tags.`{PARENT_TAG}` = '{parent}'")
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs([exp_id], " and ".join(clauses), max_results=1000,
                                  order_by=["attributes.start_time ASC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def find_finished(client: MlflowClient, exp_id: str, step: str, config_hash: str) -> Run | None:
    runs = search(client, exp_id, tags={"sdd.step": step, "sdd.config_hash": config_hash}, status="FINISHED")
    return runs[0] if runs else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_orphan(run: Run) -> bool:
    """A RUNNING run whose process (on this host) is gone: left behind by a kill."""
    if run.info.status != "RUNNING":
        return False
    tags = run.data.tags
    if tags.get("sdd.host") != socket.gethostname():
        return False
    pid = int(tags.get("sdd.pid", "0") or 0)
    return pid > 0 and not pid_alive(pid)


def unfinished(client: MlflowClient, exp_id: str, step: str, config_hash: str) -> list[Run]:
    """Runs of this config that did not finish: killed, failed, or orphaned RUNNING ones."""
    runs = search(client, exp_id, tags={"sdd.step": step, "sdd.config_hash": config_hash})
    return [r for r in runs if r.info.status in ("FAILED", "KILLED") or is_orphan(r)]


def held_by_live_process(run: Run) -> bool:
    """RUNNING, and its process (another one, on this host) is alive."""
    tags = run.data.tags
    return (run.info.status == "RUNNING" and tags.get("sdd.host") == socket.gethostname()
            and tags.get("sdd.pid") not in (None, "", str(os.getpid())) and not is_orphan(run))


def last_logged_step(client: MlflowClient, run_id: str, key: str = "test_acc") -> int:
    """The last step of `key` a run has logged (-1 if none): a continued run skips steps up to it."""
    return max((m.step for m in client.get_metric_history(run_id, key)), default=-1)


def mark_killed(client: MlflowClient, run: Run) -> None:
    """Mark a run KILLED if it is still RUNNING and no live process on this host holds it."""
    run = client.get_run(run.info.run_id)  # the caller's copy may be out of date
    if run.info.status == "RUNNING" and not held_by_live_process(run):
        client.log_batch(run.info.run_id, tags=[RunTag("sdd.error", "process died while running; marked KILLED"),
                                                RunTag("sdd.failure", "killed")])
        client.set_terminated(run.info.run_id, "KILLED")


def claim_run(client: MlflowClient, run_id: str, tags: Mapping[str, str]) -> None:
    """Continue a run in this process as it is (a study or stage run): RUNNING, owned by this pid."""
    client.update_run(run_id, status="RUNNING")
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in {
        **tags, "sdd.pid": str(os.getpid()), "sdd.host": socket.gethostname()}.items()])


def take_over(client: MlflowClient, stale: list[Run], tags: Mapping[str, str] | None = None) -> Run | None:
    """Of the unfinished runs of one config (oldest first), reopen the newest; mark the others KILLED.

    The reopened run is continued by this process, so a killed or failed config ends as one run;
    `tags` (e.g. the study and stage now running it) are written onto it again.
    """
    if not stale:
        return None
    for run in stale:  # a run left RUNNING by a dead process is marked KILLED first, so its record says so
        mark_killed(client, run)
    run_id = stale[-1].info.run_id
    reopen_run(client, run_id)
    if tags:
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    return stale[-1]


def start_run(client: MlflowClient, exp_id: str, *, name: str, tags: Mapping[str, str],
              parent_run_id: str | None = None, adopt_project_run: bool = True) -> str:
    """Create a run (nested under `parent_run_id` if given) and return its id.

    Under `mlflow run`, MLflow has already created a run for the entry point and put its id in
    MLFLOW_RUN_ID: that run becomes this step's run instead of being left empty beside it.
    """
    all_tags = {**tags, "sdd.host": socket.gethostname(), "sdd.pid": str(os.getpid())}
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    project_run = os.environ.get("MLFLOW_RUN_ID") if adopt_project_run else None
    if project_run and client.get_run(project_run).info.experiment_id != exp_id:
        # Nesting across experiments would hide the run from its parent's lineage.
        discard_project_run(client)
        project_run = None
    if project_run:
        del os.environ["MLFLOW_RUN_ID"]
        client.set_tag(project_run, "mlflow.runName", name)
        client.log_batch(project_run, tags=[RunTag(k, v) for k, v in all_tags.items()])
        return project_run
    run = client.create_run(exp_id, run_name=name, tags=all_tags)
    return run.info.run_id


def discard_project_run(client: MlflowClient | None = None) -> None:
    """Remove the run `mlflow run` created when the step has nothing to log into it.

    Used on bad input and when a finished run is reused. The `mlflow run` launcher finalises that
    run after this process exits and fails on a deleted run, so a detached reaper deletes it once
    the launcher has marked it terminated.
    """
    run_id = os.environ.pop("MLFLOW_RUN_ID", None)
    if not run_id:
        return
    try:
        uri = client.tracking_uri if client else tracking_uri()
        subprocess.Popen([sys.executable, "-m", "sdd", "_reap", uri, run_id], start_new_session=True,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except Exception as err:  # the store may be the very thing that is wrong
        log.warning("could not remove the mlflow-run project run %s: %s", run_id, err)


def _reap(uri: str, run_id: str, timeout: float = 120.0) -> None:
    client = get_client(uri)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and client.get_run(run_id).info.status == "RUNNING":
        time.sleep(0.2)
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, "KILLED")
    client.delete_run(run_id)


# A uniqueness violation, as sqlite, PostgreSQL and MySQL word it (through SQLAlchemy, or relayed by a
# tracking server): another writer inserted the same row first.
_UNIQUE_VIOLATIONS = ("UNIQUE constraint failed", "duplicate key value", "Duplicate entry", "IntegrityError")
DATASET_ATTEMPTS = 5


def log_datasets(client: MlflowClient, run_id: str, source_type: str, source: Mapping[str, Any],
                 splits: list[tuple[str, str, torch.Tensor]]) -> None:
    """Log each split (name, context, labels) as a run input; the digest covers the source and the
    labels, so two noise draws of the same data show as two datasets in the UI's Dataset column."""
    source_text = json.dumps(source, sort_keys=True, default=str)
    inputs = []
    for name, context, labels in splits:
        labels = labels.detach().to("cpu", torch.int64).contiguous()
        digest = hashlib.sha256(source_text.encode() + labels.numpy().tobytes()).hexdigest()[:10]
        dataset = Dataset(name=name, digest=digest, source_type=source_type, source=source_text,
                          profile=json.dumps({"num_rows": len(labels)}))
        inputs.append(DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)]))
    # The store keeps one row per dataset (experiment, name, digest) and inserts a missing one after
    # looking for it, so runs that log the same split at the same moment (every run of a study logs
    # its validation and test sets) can lose that race with a uniqueness error. The transaction is
    # rolled back, the row now exists, and the next attempt links to it.
    for attempt in range(DATASET_ATTEMPTS):
        try:
            client.log_inputs(run_id, datasets=inputs)
            return
        except MlflowException as err:
            if attempt + 1 == DATASET_ATTEMPTS or not any(m in str(err) for m in _UNIQUE_VIOLATIONS):
                raise
            time.sleep(random.uniform(0.05, 0.25))


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    """Log params, skipping keys already set (under `mlflow run` the project run holds the -P values)."""
    existing = client.get_run(run_id).data.params
    items = [Param(k, _param_str(v)) for k, v in params.items() if k not in existing]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100])


def _param_str(value: Any) -> str:
    """The spelling the CLI accepts back (so a param can be pasted as an option)."""
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value) or None
    if isinstance(value, bool):
        value = str(value).lower()
    return ("none" if value is None else str(value))[:MAX_PARAM_CHARS]


class MetricLogger:
    """Buffers metrics and writes them with `log_batch` (one call instead of one per metric).

    Flushed when the buffer is large, when `interval` seconds have passed, and on `flush()`, so a
    killed process loses at most the last few seconds of curve.
    """

    def __init__(self, client: MlflowClient, run_id: str, interval: float = 10.0, skip_through: int = -1) -> None:
        self.client, self.run_id, self.interval = client, run_id, interval
        # A resumed run re-computes steps it may already have logged before it was killed.
        self.skip_through = skip_through
        self.buffer: list[Metric] = []
        self.last_flush = time.monotonic()

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if step <= self.skip_through:
            return
        now = int(time.time() * 1000)
        self.buffer.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
        if len(self.buffer) >= MAX_BATCH - 100 or time.monotonic() - self.last_flush > self.interval:
            self.flush()

    def flush(self) -> None:
        for i in range(0, len(self.buffer), MAX_BATCH):
            self.client.log_batch(self.run_id, metrics=self.buffer[i:i + MAX_BATCH])
        self.buffer.clear()
        self.last_flush = time.monotonic()


def _log_file(client: MlflowClient, run_id: str, artifact_path: str, write: Callable[[Path], None]) -> None:
    """Write a file with `write(path)` into a temporary folder and log it as `artifact_path`."""
    folder, filename = os.path.split(artifact_path)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / filename
        write(path)
        client.log_artifact(run_id, str(path), folder or None)


def _read_file(client: MlflowClient, run_id: str, artifact_path: str, read: Callable[[str], T]) -> T:
    """Download `artifact_path` into a temporary folder and return `read(local path)`."""
    with tempfile.TemporaryDirectory() as tmp:
        return read(client.download_artifacts(run_id, artifact_path, tmp))


def _cpu(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in tensors.items()}


def log_state(client: MlflowClient, run_id: str, state: Mapping[str, torch.Tensor], artifact_path: str) -> None:
    """Log a state_dict as the artifact `artifact_path` (e.g. 'checkpoints/final.pt')."""
    _log_file(client, run_id, artifact_path, lambda path: checkpoints.save_state(_cpu(state), path))


def log_sparse_state(client: MlflowClient, run_id: str, state: Mapping[str, torch.Tensor],
                     masks: Mapping[str, torch.Tensor], artifact_path: str) -> None:
    bool_masks = {k: v.bool() for k, v in _cpu(masks).items()}
    _log_file(client, run_id, artifact_path, lambda path: checkpoints.save_sparse(_cpu(state), bool_masks, path))


def log_training_state(client: MlflowClient, run_id: str, state: Mapping[str, Any], artifact_path: str) -> None:
    _log_file(client, run_id, artifact_path, lambda path: checkpoints.save_training_state(state, path))


def list_artifacts(client: MlflowClient, run_id: str, path: str) -> list[str]:
    return [a.path for a in client.list_artifacts(run_id, path)]


def load_state_artifact(client: MlflowClient, run_id: str, artifact_path: str) -> dict[str, torch.Tensor]:
    return _read_file(client, run_id, artifact_path, checkpoints.load_state)


def load_sparse_artifact(client: MlflowClient, run_id: str, artifact_path: str):
    return _read_file(client, run_id, artifact_path, checkpoints.load_sparse)


def load_training_state_artifact(client: MlflowClient, run_id: str, artifact_path: str) -> dict[str, Any]:
    return _read_file(client, run_id, artifact_path, checkpoints.load_training_state)


def load_resume_state(client: MlflowClient, run_id: str, artifact_path: str) -> dict[str, Any] | None:
    """A run's resume checkpoint, or None if it has none or a kill left it unreadable."""
    if artifact_path not in list_artifacts(client, run_id, os.path.dirname(artifact_path)):
        return None
    try:
        return load_training_state_artifact(client, run_id, artifact_path)
    except UsageError as err:  # e.g. truncated by a kill while it was being copied into the store
        log.warning("run %s: %s; training again from the start", run_id, err)
        return None


def load_json_artifact(client: MlflowClient, run_id: str, artifact_path: str) -> Any:
    return _read_file(client, run_id, artifact_path, lambda path: json.loads(Path(path).read_text()))


def reopen_run(client: MlflowClient, run_id: str) -> None:
    """Continue a killed or failed run in this process (RUNNING again, owned by this pid).

    The run counts its restarts; the reason it stopped moves from `sdd.error` to `sdd.previous_error`.
    """
    run = client.get_run(run_id)
    # Another process may have finished or taken over the run since it was found.
    if run.info.status == "FINISHED" or (run.info.status == "RUNNING" and not is_orphan(run)):
        raise RuntimeError(f"run {run_id} is {run.info.status} and held by process {run.data.tags.get('sdd.pid')} "
                           f"on {run.data.tags.get('sdd.host')}; not taking it over")
    tags = run.data.tags
    new = [RunTag("sdd.pid", str(os.getpid())), RunTag("sdd.host", socket.gethostname()),
           RunTag("sdd.restarts", str(int(tags.get("sdd.restarts", "0")) + 1))]
    if "sdd.error" in tags:
        new.append(RunTag("sdd.previous_error", tags["sdd.error"]))
    client.update_run(run_id, status="RUNNING")
    client.log_batch(run_id, tags=new)
    for key in ("sdd.error", "sdd.failure"):
        if key in tags:
            client.delete_tag(run_id, key)


def record_resume(client: MlflowClient, run_id: str, resume_state: Mapping[str, Any] | None) -> None:
    """Tag a continued run with the epoch it continued from (0: its checkpoint was missing or unreadable)."""
    client.set_tag(run_id, "sdd.resumed_from_epoch", str(int(resume_state["epoch"]) if resume_state else 0))


def delete_artifact(client: MlflowClient, run_id: str, artifact_path: str) -> None:
    """Remove an artifact that is no longer needed (a resume checkpoint of a finished run), if the
    artifact store allows deletion; otherwise it stays, which costs space but nothing else."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    try:
        repo = get_artifact_repository(client.get_run(run_id).info.artifact_uri, tracking_uri=client.tracking_uri)
        repo.delete_artifacts(artifact_path)
    except Exception as err:  # best effort: the artifact store decides what may be deleted
        log.warning("could not delete %s of run %s (%s); it is no longer needed", artifact_path, run_id, err)


def log_model(client: MlflowClient, run_id: str, model: torch.nn.Module, artifact_path: str = "model") -> str:
    """Log a loadable PyTorch model; returns its runs:/ uri.

    Pickle format: the default pt2 export needs an input example and loads back as a graph module
    without the zeroed weights' structure. The model is copied to the CPU first so it loads anywhere.
    """
    cpu_model = copy.deepcopy(model).to("cpu").eval()
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.pytorch.save_model(cpu_model, os.path.join(tmp, artifact_path), serialization_format="pickle",
                                  pip_requirements=PIP_REQUIREMENTS)
        client.log_artifacts(run_id, os.path.join(tmp, artifact_path), artifact_path)
    return f"runs:/{run_id}/{artifact_path}"


def parse_run_ref(ref: str) -> str:
    """A run id from 'ID' or 'runs:/ID[/path]'."""
    ref = ref.strip()
    if ref.startswith("runs:/"):
        ref = ref[len("runs:/"):].strip("/").split("/")[0]
    if not ref or not all(c in "0123456789abcdef" for c in ref.lower()):
        raise UsageError(f"{ref!r} is not a run id or runs:/RUN_ID uri")
    return ref


def get_run(client: MlflowClient, run_id: str) -> Run:
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise UsageError(f"run {run_id} not found in {client.tracking_uri}") from None
    if run.info.lifecycle_stage != "active":
        raise UsageError(f"run {run_id} is deleted")
    return run


def failure_kind(err: BaseException) -> str:
    """A short class of failure for the `sdd.failure` tag: what a researcher filters runs by."""
    if isinstance(err, KeyboardInterrupt):
        return "interrupted"
    if isinstance(err, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(err) \
            or "out of memory" in str(err).lower():
        return "out_of_memory"
    if type(err).__name__ == "TrainingDiverged":
        return "diverged"
    return "error"


@contextlib.contextmanager
def finishing(client: MlflowClient, run_id: str) -> Iterator[None]:
    """FINISHED when the block completes; if not, FAILED (KILLED on Ctrl-C) with the reason as
    `sdd.error` and its class as `sdd.failure`. The exception carries the run id as `sdd_run_id`
    (the outermost run's, for nested ones), so a sweep can name the run that failed."""
    try:
        yield
    except BaseException as err:
        client.log_batch(run_id, tags=[RunTag("sdd.error", f"{type(err).__name__}: {err}"[:5000]),
                                       RunTag("sdd.failure", failure_kind(err))])
        terminate(client, run_id, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        with contextlib.suppress(AttributeError, TypeError):
            err.sdd_run_id = run_id
        raise
    terminate(client, run_id)


def terminate(client: MlflowClient, run_id: str, status: str = "FINISHED") -> None:
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.from_string(status)))
