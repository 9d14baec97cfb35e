"""One run lifecycle for every step run (dense, chain, level, stage, study).

`acquire` decides, under a lock on the config hash held in the tracking store itself, what this
process does with a config: reuse its FINISHED run, wait for the live process that runs it (or
refuse, naming that process), continue the run a dead process left (from its resume checkpoint),
continue a FINISHED run that holds less than asked for (a chain asked for more levels), or start a
new run. Because the decision and the run's creation happen under the lock, two
identical steps started at the same moment make exactly one run.

The lock is a registered model named after the experiment and the config hash: the store refuses
a second model of the same name (sqlite and `mlflow server` alike), and deleting it frees the name.
Its tags name the holder, so a lock left by a process killed inside the few store calls it guards
is broken once that process is gone, or after `LOCK_STALE_S`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from sdd import tracking
from sdd.errors import UsageError

log = logging.getLogger(__name__)

LOCK_PREFIX = "sdd-lock"
LOCK_STALE_S = 120.0  # far longer than the store calls a lock guards, on any store
POLL_S = 0.25
WAIT_POLL_S = 2.0


@dataclass(frozen=True)
class RunSpec:
    """What identifies a step's run and what a new one is created with."""

    step: str  # the `sdd.step` tag
    config_hash: str
    name: str
    tags: Mapping[str, str] = field(default_factory=dict)
    parent_run_id: str | None = None
    # Runs of this config are looked for under this parent only (levels: their chain)...
    scope_parent: str | None = None
    # ...and among runs with these tags (a study run: its file).
    match_tags: Mapping[str, str] = field(default_factory=dict)
    # Under `mlflow run`, a new run takes over the run the launcher made (see tracking.start_run).
    adopt_project_run: bool = True
    # A checkpoint that a continued run resumes from; deleted once the run has finished.
    resume_artifact: str | None = None


@dataclass
class Lease:
    """The run this process works in (new or continued), or the finished run it reuses."""

    client: MlflowClient
    spec: RunSpec
    run_id: str
    finished: Run | None = None
    reopened: Run | None = None

    @property
    def reused(self) -> bool:
        return self.finished is not None

    @property
    def is_new(self) -> bool:
        return self.finished is None and self.reopened is None

    @contextlib.contextmanager
    def running(self) -> Iterator[dict[str, Any] | None]:
        """The run's work: FINISHED when the block completes, FAILED (KILLED on Ctrl-C) if not.

        Yields the resume checkpoint of a continued run (None for a new one, or when it has none).
        """
        client, run_id, artifact = self.client, self.run_id, self.spec.resume_artifact
        with tracking.finishing(client, run_id):
            resume = None
            if self.reopened is not None and artifact:
                resume = tracking.load_resume_state(client, run_id, artifact)
                log.info("continuing %s run %s %s", self.spec.step, run_id,
                         f"at epoch {resume['epoch']}" if resume else "from its start")
                tracking.record_resume(client, run_id, resume)
            yield resume
        if artifact:
            tracking.delete_artifact(client, run_id, artifact)  # up to 3x the model's size, not needed now


def acquire(client: MlflowClient, exp_id: str, spec: RunSpec, *, force: bool = False, wait: bool = True,
            reopen_finished: bool = False, extend_finished: Callable[[Run], bool] | None = None,
            what: str | None = None) -> Lease:
    """The run this process should use for `spec`'s config.

    force: start a new run whatever exists (runs left by dead processes are marked KILLED).
    wait: while a live process runs this config, wait for it and then reuse (or continue) its run;
        without it, refuse with one line naming that process.
    reopen_finished: continue the newest run even if it FINISHED (study and stage runs, whose
        stages are re-checked on every run of the study).
    extend_finished: a FINISHED run for which this is true holds less than the config asks for (a
        chain asked for more levels than it ran): it is continued in place instead of reused.
    """
    label = what or f"{spec.step} run"
    waiting_for: str | None = None
    while True:
        with store_lock(client, f"{LOCK_PREFIX}-{exp_id}-{spec.config_hash}"):
            runs = tracking.search(client, exp_id, parent=spec.scope_parent, tags={
                "sdd.step": spec.step, "sdd.config_hash": spec.config_hash, **spec.match_tags})
            live = [] if force else [r for r in runs if holder_alive(r)]
            if not live:
                return _decide(client, exp_id, spec, runs, force=force, reopen_finished=reopen_finished,
                               extend_finished=extend_finished)
        holder = live[-1]
        tags = holder.data.tags
        if not wait:
            raise UsageError(f"{label} {holder.info.run_id} is being run by process {tags.get('sdd.pid')} on "
                             f"{tags.get('sdd.host')}; wait for it or stop it")
        if waiting_for != holder.info.run_id:
            waiting_for = holder.info.run_id
            log.info("%s %s is being run by process %s on %s: waiting for it", label, holder.info.run_id,
                     tags.get("sdd.pid"), tags.get("sdd.host"))
        time.sleep(WAIT_POLL_S)


def _decide(client: MlflowClient, exp_id: str, spec: RunSpec, runs: list[Run], *, force: bool,
            reopen_finished: bool, extend_finished: Callable[[Run], bool] | None) -> Lease:
    """Under the lock, with no live holder: reuse, continue or start."""
    tags = {**spec.tags, **({tracking.PARENT_TAG: spec.parent_run_id} if spec.parent_run_id else {})}
    if not force and not reopen_finished:
        done = [r for r in runs if r.info.status == "FINISHED"]
        if done and extend_finished is not None and extend_finished(done[0]):
            tracking.claim_run(client, done[0].info.run_id, tags)
            tracking.discard_project_run(client)
            return Lease(client, spec, done[0].info.run_id, reopened=done[0])
        if done:
            log.info("reusing finished %s run %s (config %s)", spec.step, done[0].info.run_id, spec.config_hash)
            tracking.discard_project_run(client)
            return Lease(client, spec, done[0].info.run_id, finished=done[0])
    if reopen_finished and runs:
        run = runs[-1]
        tracking.claim_run(client, run.info.run_id, tags)
        tracking.discard_project_run(client)
        return Lease(client, spec, run.info.run_id, reopened=run)
    stale = [r for r in runs if r.info.status in ("FAILED", "KILLED", "RUNNING")]
    if force:
        for run in stale:
            tracking.mark_killed(client, run)
        stale = []
    reopened = tracking.take_over(client, stale, tags)
    if reopened is not None:
        tracking.discard_project_run(client)
        return Lease(client, spec, reopened.info.run_id, reopened=reopened)
    run_id = tracking.start_run(client, exp_id, name=spec.name, tags=spec.tags, parent_run_id=spec.parent_run_id,
                                adopt_project_run=spec.adopt_project_run)
    return Lease(client, spec, run_id)


def holder_alive(run: Run) -> bool:
    """RUNNING and held by a live process other than this one (a process on another host counts as
    live: it cannot be checked from here)."""
    if run.info.status != "RUNNING":
        return False
    tags = run.data.tags
    if tags.get("sdd.host") != socket.gethostname():
        return True
    return tags.get("sdd.pid") not in (None, "", str(os.getpid())) and not tracking.is_orphan(run)


@contextlib.contextmanager
def store_lock(client: MlflowClient, name: str) -> Iterator[None]:
    """Hold the store-wide lock `name` (a registered model) for the block."""
    me = {"sdd.lock.pid": str(os.getpid()), "sdd.lock.host": socket.gethostname(),
          "sdd.lock.since": f"{time.time():.3f}"}
    while True:
        try:
            client.create_registered_model(name, tags=me, description="sdd: a lock held for a moment")
            break
        except MlflowException as err:
            # Taken; or (a tracking server with several workers) released while this request raced
            # with it: either way not ours, so try again.
            if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise
        _break_if_stale(client, name)
        time.sleep(POLL_S)
    try:
        yield
    finally:
        with contextlib.suppress(MlflowException):
            client.delete_registered_model(name)


def _break_if_stale(client: MlflowClient, name: str) -> None:
    try:
        lock = client.get_registered_model(name)
    except MlflowException:
        return  # released meanwhile
    tags = lock.tags  # may not be readable yet a moment after creation: the store's own timestamp counts
    since = float(tags.get("sdd.lock.since") or (lock.creation_timestamp or 0) / 1000 or time.time())
    pid, host = int(tags.get("sdd.lock.pid", "0") or 0), tags.get("sdd.lock.host")
    dead = host == socket.gethostname() and pid > 0 and not tracking.pid_alive(pid)
    if dead or time.time() - since > LOCK_STALE_S:
        log.warning("breaking the lock %s left by process %s on %s", name, pid, host)
        with contextlib.suppress(MlflowException):
            client.delete_registered_model(name)
