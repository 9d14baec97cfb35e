"""Running a stage's trials as one Ray Tune grid: the Ray runtime, resource checks, the trainable.

Ray and torch load inside the functions that need them: a sweep whose trials are all covered by
finished runs never starts Ray.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdd import config, faults
from sdd.errors import UsageError
from sdd.steps import STEPS
from sdd.sweep.lineage import CONNECT_TIMEOUT_S, _record
from sdd.sweep.study_file import StudyFile

if TYPE_CHECKING:
    from sdd.sweep.plan import Trial

log = logging.getLogger(__name__)

HEARTBEAT_S = 60.0


# --- the runtime --------------------------------------------------------------------------------

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
    widths = study.stages["dense"].values("width", config.ModelConfig().width) if "dense" in study.stages else ()
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


# --- one trial, in a Ray worker -----------------------------------------------------------------

def _trial_resources(trial_config: dict[str, Any]) -> Any:
    from ray.tune import PlacementGroupFactory

    spec = trial_config["spec"]
    bundle = {"CPU": spec["cpu"]}
    if spec["gpu"]:
        bundle["GPU"] = spec["gpu"]
    return PlacementGroupFactory([bundle])


def run_trial(trial_config: dict[str, Any]) -> None:
    """The Tune trainable: run one launch (a trial, or a seed pack of trials) with retries and report
    each member's MLflow run id.

    Runs in a Ray worker; with actor reuse one worker runs many trials, so imports and the cached
    dataset are paid once per worker. Exceptions are caught here and reported as the trial's result,
    so the stage records them; Tune's own retries (FailureConfig) cover a worker process that dies.
    A member that failed is retried (in its own run) without the members that finished.
    """
    import torch
    from ray import tune

    _quiet_worker()
    spec, ctx = trial_config["spec"], trial_config["ctx"]
    _set_up_store(ctx["tracking_uri"])
    torch.set_num_threads(max(1, int(spec["cpu"])))
    members = spec["members"]
    outcomes: list[dict[str, Any]] = [{"status": "FAILED", "run_id": None, "reused": False, "error": None,
                                       "attempts": 0} for _ in members]
    pending = list(range(len(members)))
    for attempt in range(1, ctx["retries"] + 2):
        retry = []
        for m, (result, run_id) in zip(pending, _run_launch(spec, ctx, [members[i] for i in pending])):
            outcomes[m]["attempts"] = attempt
            if not isinstance(result, BaseException):
                outcomes[m].update(status="FINISHED", run_id=result.run_id, reused=result.reused, error=None,
                                   metrics={k: result.metrics[k] for k in ("test_acc", "val_acc", "train_acc_noisy")
                                            if k in result.metrics})
                continue
            bad_input = isinstance(result, UsageError)  # bad input stays bad: not retried
            error = (f"UsageError: {result}" if bad_input else f"{type(result).__name__}: {result}")[:2000]
            outcomes[m].update(error=error, run_id=run_id or outcomes[m]["run_id"])
            if not bad_input:  # any other failure may be transient: retried (in the same run)
                logging.getLogger(__name__).warning("trial %s attempt %d failed: %s", members[m]["key"], attempt,
                                                    error)
                retry.append(m)
        pending = retry
        if not pending:
            break
    outcomes = [{"trial": member["key"], **outcome} for member, outcome in zip(members, outcomes)]
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "trial.json").write_text(json.dumps(outcomes))
        tune.report({"status": "FINISHED" if all(o["status"] == "FINISHED" for o in outcomes) else "FAILED",
                     "outcomes": json.dumps(outcomes), "attempts": max(o["attempts"] for o in outcomes)},
                    checkpoint=tune.Checkpoint.from_directory(tmp))


def launch_spec(trials: list[Trial]) -> dict[str, Any]:
    """What a Tune trial receives: one trial, or the trials of a seed pack (same step and resources)."""
    first = trials[0]
    return {"key": " + ".join(t.key for t in trials), "step": first.step, "cpu": first.cpu, "gpu": first.gpu,
            "members": [{"key": t.key, "config": t.config, "tags": t.tags} for t in trials]}


def _run_launch(spec: dict[str, Any], ctx: dict[str, Any],
                members: list[dict[str, Any]]) -> list[tuple[Any, str | None]]:
    """Per member: its StepResult or the exception that failed it, and its run id (None: no run yet)."""
    step = STEPS[spec["step"]]
    common = {"tracking_uri": ctx["tracking_uri"], "experiment": ctx["experiment"], "parent_run_id": ctx["stage_run_id"]}
    lineage = {"sdd.study_run_id": ctx["study_run_id"], "sdd.stage_run_id": ctx["stage_run_id"]}
    try:
        if len(members) == 1:
            results = [step.run(step.from_flat(members[0]["config"]), extra_tags={**lineage, **members[0]["tags"]},
                                **common)]
        else:
            results = step.run_pack([step.from_flat(m["config"]) for m in members],
                                    extra_tags=[{**lineage, **m["tags"]} for m in members], **common)
    except Exception as err:  # the whole launch failed: every member, each with its own run
        run_ids = getattr(err, "sdd_run_ids", None) or [getattr(err, "sdd_run_id", None)] * len(members)
        return [(err, run_id) for run_id in run_ids]
    return [(r, r.run_id if not isinstance(r, BaseException) else getattr(r, "sdd_run_id", None)) for r in results]


# Tracking URIs whose store this worker process has set up: with actor reuse one worker runs many trials.
_WORKER_STORES: set[str] = set()


def _set_up_store(tracking_uri: str) -> None:
    """The store's client, once per worker process. The driver made the store, schema included, before any
    trial started, so workers skip the lock that serialises a new store's migration: N workers starting at
    once would otherwise queue there, one client set-up (about a second) after another."""
    if tracking_uri in _WORKER_STORES:
        return
    from sdd import tracking

    tracking.get_client(tracking_uri, schema_ready=True)
    _WORKER_STORES.add(tracking_uri)


def _quiet_worker() -> None:
    """Trials log warnings only: the driver reports progress, one line per finished trial."""
    import warnings

    import mlflow  # noqa: F401 - importing mlflow resets its loggers' levels: import it first

    logging.getLogger().setLevel(logging.WARNING)
    for name in ("mlflow", "alembic", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.ERROR if name in ("mlflow", "alembic") else logging.WARNING)
    warnings.filterwarnings("ignore", module="mlflow")


# --- the grid, from the driver ------------------------------------------------------------------

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
            for outcome in json.loads(result.get("outcomes") or "[]"):
                self.done += 1
                self.reused += bool(outcome["reused"])
                ok = outcome["status"] == "FINISHED"
                self.failed += not ok
                metrics = outcome.get("metrics", {})
                what = (("reused " if outcome["reused"] else "") + f"run {outcome['run_id'][:8]}"
                        + (f" test_acc {metrics['test_acc']:.4f}" if "test_acc" in metrics else "")) if ok \
                    else f"FAILED after {outcome['attempts']} attempt(s): {(outcome['error'] or '')[:200]}"
                log.info("%s %d/%d [%s]: %s -> %s", stage, self.done, total, self.elapsed(), outcome["trial"], what)

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            members = trial.config["spec"]["members"]
            self.done += len(members)
            self.failed += len(members)
            log.warning("%s %d/%d [%s]: %s -> worker died", stage, self.done, total, self.elapsed(),
                        trial.config["spec"]["key"])

        def on_step_end(self, iteration, trials, **info) -> None:
            if time.monotonic() - self.last >= HEARTBEAT_S:
                self.last = time.monotonic()
                running = sum(t.status == "RUNNING" for t in trials)
                log.info("%s: %d/%d trials done (%d reused, %d failed), %d running, %s elapsed", stage,
                         self.done, total, self.reused, self.failed, running, self.elapsed())

    return Progress()


def execute(launches: list[list[Trial]], stage: str, study: StudyFile, ctx: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Run launches (single trials and seed packs, see `sdd.sweep.plan.seed_packs`) as one Tune grid;
    the trials.json records of their trials, by trial key."""
    from ray import tune

    # Tune's new output engine prints its experiment table even at verbose=0; the legacy one is silent
    # there, and the progress callback reports instead. Set RAY_AIR_NEW_OUTPUT=1 to get Tune's table.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    tuner = tune.Tuner(
        tune.with_resources(run_trial, _trial_resources),
        param_space={"spec": tune.grid_search([launch_spec(members) for members in launches]), "ctx": ctx},
        tune_config=tune.TuneConfig(reuse_actors=True, max_concurrent_trials=study.max_concurrent,
                                    trial_dirname_creator=lambda t: f"{stage}_{t.trial_id}"),
        run_config=tune.RunConfig(
            name=f"{study.name}-{stage}-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=study.storage_path,
            verbose=0, failure_config=tune.FailureConfig(max_failures=study.retries),
            callbacks=[_progress_callback(stage, sum(map(len, launches)))]))
    results = {r.config["spec"]["key"]: r for r in tuner.fit()}
    records = {}
    for members in launches:
        result = results.get(launch_spec(members)["key"])
        metrics = result.metrics if result is not None else {}
        outcomes = {o["trial"]: o for o in json.loads(metrics.get("outcomes") or "[]")}
        for trial in members:
            outcome = outcomes.get(trial.key)
            if outcome is not None:
                records[trial.key] = _record(trial, run_id=outcome["run_id"] or None, status=outcome["status"],
                                             reused=bool(outcome["reused"]), error=outcome["error"] or None,
                                             attempts=int(outcome["attempts"]))
            elif result is not None and result.error is not None:  # the worker process died, retries included
                records[trial.key] = _record(trial, status="FAILED", attempts=study.retries + 1,
                                             error=f"{type(result.error).__name__}: {result.error}"[:2000])
            else:
                records[trial.key] = _record(trial)
    return records
