"""One study, killed again and again: a trial's worker is SIGKILLed as the kernel's OOM killer would,
and the driver during a dense trial, between the stages, between two pruning levels and inside a
level; each time the same command is run again. The kill points are events the steps announce
(`sdd.faults`), not moments the test races the clock for, so the test means the same on any machine.
The finished study must hold every expected run once, FINISHED, with complete metrics; each killed
run must have been continued from the checkpoint written just before its kill; and the study must
equal bit for bit the same trials run once, uninterrupted."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from mlflow.entities import Run

from sdd import faults, tracking
from sdd.chain import run_prune
from sdd.config import PruneConfig, TrainConfig, from_flat_dict
from sdd.dense import run_train

# Two dense widths, one pruning chain of three levels from width 64. Resume checkpoints are written
# every 250 epochs (forced by epoch count), and every kill point sits right after one of them.
STUDY = """
name: killable
retries: 1
max_concurrent: 1
stages:
  dense:
    recipe: {dataset: mnist1d, model: mlp, train_size: 300, test_size: 100, val_size: 50, noise: 0.2,
             epochs: 2000, lr: 0.01, eval_every: 250, resume_every: 0, device: cpu}
    grid: {width: [16, 64], seed: [0]}
  prune:
    start: [{width: 64, seed: 0}]
    recipe: {levels: 3, epochs: 1500, eval_every: 250, resume_every: 0, register: false, device: cpu}
"""
SNAPSHOT_EPOCHS = 250

# Metrics that measure time, not results: they differ between any two runs.
TIMES = {"train_time_s", "level_time_s", "chain_time_s", "wall_time_s"}

# Generous: only a hang waits this long; every wait ends on an event.
EVENT_TIMEOUT_S = 1500


def runs_of(client: MlflowClient) -> list[Run]:
    return client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=5000)


def by_step(runs: list[Run], step: str, status: str | None = None) -> list[Run]:
    return [r for r in runs if r.data.tags.get("sdd.step") == step and status in (None, r.info.status)]


def artifacts(client: MlflowClient, run: Run, folder: str) -> list[str]:
    return tracking.list_artifacts(client, run.info.run_id, folder)


class Driver:
    """`sdd sweep` in its own process session, started again after every kill, with fault points."""

    def __init__(self, folder: Path, uri: str, study: Path) -> None:
        self.folder, self.study = folder, study
        self.faults = folder / "faults"
        # A new local Ray per driver, never a cluster some other process started on this machine.
        self.env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": "local",
                    faults.DIR_VAR: str(self.faults), faults.SNAPSHOT_VAR: str(SNAPSHOT_EPOCHS)}
        self.env.pop("MLFLOW_RUN_ID", None)
        self.proc: subprocess.Popen | None = None
        self.sessions: list[int] = []
        self.reached: dict[str, dict] = {}

    def start(self, fault: str | None) -> None:
        env = {k: v for k, v in self.env.items() if k != faults.FAULT_VAR}
        if fault:
            env[faults.FAULT_VAR] = fault
        log = open(self.folder / f"driver{len(self.sessions)}.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "sdd", "sweep", str(self.study), "--storage-path",
                                      str(self.folder / "ray")], cwd=self.folder, env=env, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.sessions.append(self.proc.pid)

    def log_tail(self) -> str:
        return (self.folder / f"driver{len(self.sessions) - 1}.log").read_text()[-3000:]

    def record(self, point: str) -> dict | None:
        path = self.faults / f"{point}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def kill_at(self, point: str) -> dict:
        """Wait until a process of this driver pauses at `point`, then SIGKILL the driver, everything in
        its session and the paused process: the whole machine's work stops exactly there."""
        deadline = time.monotonic() + EVENT_TIMEOUT_S
        while (found := self.record(point)) is None:
            assert self.proc.poll() is None, f"{point}: the driver exited ({self.proc.returncode}) before " \
                                             f"reaching it:\n{self.log_tail()}"
            assert time.monotonic() < deadline, f"{point}: not reached in {EVENT_TIMEOUT_S}s"
            time.sleep(0.05)
        for kill in (lambda: os.kill(found["pid"], signal.SIGKILL), lambda: os.killpg(self.proc.pid, signal.SIGKILL)):
            try:
                kill()
            except ProcessLookupError:
                pass
        self.proc.wait()
        self.reached[point] = found
        return found

    def finish(self) -> None:
        assert self.proc.wait(EVENT_TIMEOUT_S) == 0, self.log_tail()

    def clean_up(self) -> None:
        for session in self.sessions:  # whatever a killed driver's session left (Ray processes)
            try:
                os.killpg(session, signal.SIGKILL)
            except ProcessLookupError:
                pass


def histories(client: MlflowClient, run: Run) -> dict[str, list[tuple[int, float]]]:
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
            for key in run.data.metrics if key not in TIMES}


def record(client: MlflowClient) -> dict[tuple, dict]:
    """Every training of a store by what it is (not by run id): its metric histories and weights."""
    runs = runs_of(client)
    out: dict[tuple, dict] = {}
    for run in by_step(runs, "train"):
        p = run.data.params
        weights = tracking.load_state_artifact(client, run.info.run_id, "checkpoints/final.pt")
        out[("train", p["width"], p["seed"])] = {"metrics": histories(client, run), "weights": weights}
    for chain in by_step(runs, "prune"):
        out[("prune", chain.data.params["dense_width"])] = {"metrics": histories(client, chain)}
    for level in by_step(runs, "level"):
        state, masks = tracking.load_sparse_artifact(client, level.info.run_id, "level/weights.pt")
        out[("level", level.data.tags["sdd.level"])] = {"metrics": histories(client, level),
                                                         "weights": {**state, **masks}}
    return out


def trials_of(client: MlflowClient, stage: str) -> list[dict]:
    (run,) = [r for r in by_step(runs_of(client), "sweep") if r.data.tags["sdd.stage"] == stage]
    with tempfile.TemporaryDirectory() as tmp:
        return json.loads(Path(client.download_artifacts(run.info.run_id, "trials.json", tmp)).read_text())


def run_uninterrupted(client: MlflowClient, uri: str) -> None:
    """Every trial of the killed study (its trials.json), run once without interruption into the store
    at `uri`: the step functions a sweep's workers call, on one torch thread as they run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        parents = {}
        for trial in trials_of(client, "dense"):
            parents[trial["run_id"]] = run_train(from_flat_dict(TrainConfig, trial["config"]), tracking_uri=uri).run_id
        for trial in trials_of(client, "prune"):
            config = {**trial["config"], "parent": parents[trial["config"]["parent"]]}
            run_prune(from_flat_dict(PruneConfig, config), tracking_uri=uri)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_study_killed_at_every_point_equals_an_uninterrupted_one(tmp_path, empty_store):
    study = tmp_path / "killable.yaml"
    study.write_text(STUDY)
    killed_dir, clean_dir = tmp_path / "killed", tmp_path / "uninterrupted"
    for folder in (killed_dir, clean_dir):
        folder.mkdir()
        shutil.copy(empty_store, folder / "mlflow.db")
    uri, clean_uri = (f"sqlite:///{folder / 'mlflow.db'}" for folder in (killed_dir, clean_dir))
    client = MlflowClient(uri)
    driver = Driver(killed_dir, uri, study)
    try:
        # 1. The first dense trial's worker dies right after its checkpoint at epoch 500 (as under the
        #    OOM killer): Tune retries the trial, which continues the same run from epoch 500 and then
        #    passes epoch 1000 as the first arrival there.
        # 2. The driver dies while the second dense trial, the second arrival at epoch 1000, trains.
        driver.start("train-saved-500:1:kill,train-saved-1000:2:pause")
        dense = driver.kill_at("train-saved-1000")
        # 3. The driver dies right after the dense stage run is FINISHED, before the chain stage.
        driver.start("stage-dense-done:1:pause")
        driver.kill_at("stage-dense-done")
        # 4. The driver dies once level 1 has finished, before level 2 starts.
        driver.start("level-1-done:1:pause")
        driver.kill_at("level-1-done")
        # 5. The driver dies in the middle of level 2's retraining, after its checkpoint at epoch 750.
        driver.start("level-2-saved-750:1:pause")
        level = driver.kill_at("level-2-saved-750")
        driver.start(None)
        driver.finish()
    finally:
        driver.clean_up()
    oom = driver.record("train-saved-500")
    assert oom is not None and oom["action"] == "kill", "the worker kill point was never reached"
    assert oom["pid"] != dense["pid"] and oom["run_id"] != dense["run_id"]
    logging.getLogger(__name__).info("kill points reached: %s", ["train-saved-500", *driver.reached])

    runs = runs_of(client)
    # Every expected run exactly once, FINISHED; nothing left RUNNING, nothing KILLED or FAILED beside it.
    assert sorted((r.data.tags["sdd.step"], r.info.status) for r in runs) == sorted(
        [("study", "FINISHED"), ("sweep", "FINISHED"), ("sweep", "FINISHED"), ("train", "FINISHED"),
         ("train", "FINISHED"), ("prune", "FINISHED")] + [("level", "FINISHED")] * 3), \
        [(r.data.tags.get("sdd.step"), r.info.status, r.data.tags.get("sdd.error")) for r in runs]
    (chain,) = by_step(runs, "prune")
    levels = sorted(by_step(runs, "level"), key=lambda r: int(r.data.tags["sdd.level"]))
    assert [r.data.tags["sdd.level"] for r in levels] == ["1", "2", "3"]
    # The resume path ran: each run killed mid-training was continued in place, once, from the
    # checkpoint written just before its kill; the runs no kill touched were never restarted.
    continued = {oom["run_id"]: "500", dense["run_id"]: "1000", level["run_id"]: "750"}
    assert level["run_id"] == levels[1].info.run_id
    for run in by_step(runs, "train") + levels:
        tags = run.data.tags
        if run.info.run_id in continued:
            assert (tags.get("sdd.restarts"), tags.get("sdd.resumed_from_epoch")) == \
                ("1", continued[run.info.run_id]), (tags.get("mlflow.runName"), tags)
        else:
            assert "sdd.restarts" not in tags, tags.get("mlflow.runName")
    # The chain was continued after kills 4 and 5, not started again.
    assert chain.data.tags.get("sdd.restarts") == "2"
    # Metrics complete and in order: every evaluation once, every level once.
    for run in by_step(runs, "train"):
        assert [m.step for m in sorted(client.get_metric_history(run.info.run_id, "test_acc"),
                                       key=lambda m: m.step)] == list(range(0, 2001, 250))
    for run in levels:
        assert [m.step for m in sorted(client.get_metric_history(run.info.run_id, "val_acc"),
                                       key=lambda m: m.step)] == list(range(250, 1501, 250))
    assert sorted(m.step for m in client.get_metric_history(chain.info.run_id, "test_acc")) == [0, 1, 2, 3]
    # Resume checkpoints are removed once their run has finished.
    assert not any("resume.pt" in a for r in by_step(runs, "train") for a in artifacts(client, r, "checkpoints"))
    assert not any("resume.pt" in a for r in levels for a in artifacts(client, r, "level"))

    run_uninterrupted(client, clean_uri)
    got, want = record(client), record(MlflowClient(clean_uri))
    assert sorted(got) == sorted(want)
    for key in want:  # bit for bit: PyTorch on the CPU is deterministic here
        assert got[key]["metrics"] == want[key]["metrics"], key
        for name, tensor in want[key].get("weights", {}).items():
            assert tensor.equal(got[key]["weights"][name]), (key, name)
