"""One study, killed again and again: the driver is SIGKILLed during a dense trial, between the stages,
between two pruning levels and inside a level, and a trial's worker is SIGKILLed as the kernel's OOM
killer would; each time the same command is run again. The finished study must hold every expected run
once, FINISHED, with complete metrics, and equal bit for bit the same trials run once, uninterrupted."""

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
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from mlflow.entities import Run

from sdd import tracking
from sdd.chain import run_prune
from sdd.config import PruneConfig, TrainConfig, from_flat_dict
from sdd.dense import run_train

# Two dense widths, one pruning chain of three levels from width 64; every training long enough
# (seconds) to be killed in the middle, with resume checkpoints every second.
STUDY = """
name: killable
retries: 1
max_concurrent: 1
stages:
  dense:
    recipe: {dataset: mnist1d, model: mlp, train_size: 300, test_size: 100, val_size: 50, noise: 0.2,
             epochs: 2000, lr: 0.01, eval_every: 250, resume_every: 1, device: cpu}
    grid: {width: [16, 64], seed: [0]}
  prune:
    start: [{width: 64, seed: 0}]
    recipe: {levels: 3, epochs: 1500, eval_every: 250, resume_every: 1, register: false, device: cpu}
"""

# Metrics that measure time, not results: they differ between any two runs.
TIMES = {"train_time_s", "level_time_s", "chain_time_s", "wall_time_s"}


def runs_of(client: MlflowClient) -> list[Run]:
    return client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=5000)


def by_step(runs: list[Run], step: str, status: str | None = None) -> list[Run]:
    return [r for r in runs if r.data.tags.get("sdd.step") == step and status in (None, r.info.status)]


def artifacts(client: MlflowClient, run: Run, folder: str) -> list[str]:
    return tracking.list_artifacts(client, run.info.run_id, folder)


class Driver:
    """`sdd sweep` in its own process session, started again after every kill."""

    def __init__(self, folder: Path, uri: str, study: Path) -> None:
        self.folder, self.study = folder, study
        # A new local Ray per driver, never a cluster some other process started on this machine.
        self.env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": "local"}
        self.env.pop("MLFLOW_RUN_ID", None)
        self.proc: subprocess.Popen | None = None
        self.sessions: list[int] = []
        self.kills: list[str] = []
        self.old_pids: set[str | None] = set()

    def start(self) -> None:
        # Processes of a killed driver (its Ray workers) may live on for a moment: what this driver's
        # processes do is told apart from what theirs did by the pid a run is tagged with.
        self.old_pids = {r.data.tags.get("sdd.pid") for r in runs_of(MlflowClient(self.env["MLFLOW_TRACKING_URI"]))}
        log = open(self.folder / f"driver{len(self.sessions)}.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "sdd", "sweep", str(self.study), "--storage-path",
                                      str(self.folder / "ray")], cwd=self.folder, env=self.env, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.sessions.append(self.proc.pid)

    def kill_when(self, point: str, ready: Callable[[], Run | bool | None], pid: Callable[[Run], int] | None = None,
                  timeout: float = 300) -> Run | bool:
        """Poll until `ready()` holds, then SIGKILL the driver (or the process `pid(found)` names)."""
        deadline = time.monotonic() + timeout
        while not (found := ready()):
            assert self.proc.poll() is None, f"{point}: the driver exited ({self.proc.returncode}) first; " \
                                             f"see {self.folder}/driver{len(self.sessions) - 1}.log"
            assert time.monotonic() < deadline, f"{point}: not reached in {timeout}s"
            time.sleep(0.05)
        os.kill(self.proc.pid if pid is None else pid(found), signal.SIGKILL)
        if pid is None:
            self.proc.wait()
        self.kills.append(point)
        return found

    def finish(self, timeout: float = 400) -> None:
        assert self.proc.wait(timeout) == 0, (self.folder / f"driver{len(self.sessions) - 1}.log").read_text()[-3000:]

    def clean_up(self) -> None:
        for session in self.sessions:  # whatever a killed driver's session left (Ray processes)
            try:
                os.killpg(session, signal.SIGKILL)
            except ProcessLookupError:
                pass


def resumable(driver: Driver, client: MlflowClient, step: str, folder: str,
              **tags: str) -> Callable[[], Run | None]:
    """A RUNNING run of `step` that the current driver's processes train and that has a resume
    checkpoint (so it is mid-training)."""
    def ready() -> Run | None:
        for run in by_step(runs_of(client), step, "RUNNING"):
            if run.data.tags.get("sdd.pid") not in driver.old_pids and all(run.data.tags.get(k) == v for k, v in tags.items()) and \
                    f"{folder}/resume.pt" in artifacts(client, run, folder):
                return run
        return None
    return ready


def stage_finished(client: MlflowClient, stage: str) -> Callable[[], bool]:
    return lambda: any(r.data.tags.get("sdd.stage") == stage for r in by_step(runs_of(client), "sweep", "FINISHED"))


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
def test_study_killed_at_every_point_equals_an_uninterrupted_one(tmp_path, empty_store, monkeypatch):
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
        driver.start()
        # 1. A trial's worker dies mid-training (as under the OOM killer): Tune retries the trial,
        #    which continues the same run; the driver carries on.
        oom = driver.kill_when("worker killed mid-training", resumable(driver, client, "train", "checkpoints"),
                               pid=lambda run: int(run.data.tags["sdd.pid"]))
        # 2. The driver dies while the other dense trial trains.
        dense = driver.kill_when("driver killed during a dense trial", resumable(
            driver, client, "train", "checkpoints", **{"mlflow.runName": next(
                n for n in ("mnist1d-mlp-w16-n0.2-s0", "mnist1d-mlp-w64-n0.2-s0")
                if n != oom.data.tags["mlflow.runName"])}))
        driver.start()
        # 3. The driver dies right after the dense stage finished, before or while the chain starts.
        driver.kill_when("driver killed between stages", stage_finished(client, "dense"))
        driver.start()
        # 4. The driver dies once the first level has finished, as the second one starts.
        driver.kill_when("driver killed between levels", lambda: any(
            r.data.tags["sdd.level"] == "1" for r in by_step(runs_of(client), "level", "FINISHED")))
        driver.start()
        # 5. The driver dies in the middle of a later level's retraining.
        level = driver.kill_when("driver killed inside a level", resumable(driver, client, "level", "level"))
        assert level.data.tags["sdd.level"] in ("2", "3")
        driver.start()
        driver.finish()
    finally:
        driver.clean_up()

    runs = runs_of(client)
    # Every expected run exactly once, FINISHED; nothing left RUNNING, nothing KILLED or FAILED beside it.
    assert sorted((r.data.tags["sdd.step"], r.info.status) for r in runs) == sorted(
        [("study", "FINISHED"), ("sweep", "FINISHED"), ("sweep", "FINISHED"), ("train", "FINISHED"),
         ("train", "FINISHED"), ("prune", "FINISHED")] + [("level", "FINISHED")] * 3), \
        [(r.data.tags.get("sdd.step"), r.info.status, r.data.tags.get("sdd.error")) for r in runs]
    (chain,) = by_step(runs, "prune")
    levels = sorted(by_step(runs, "level"), key=lambda r: int(r.data.tags["sdd.level"]))
    assert [r.data.tags["sdd.level"] for r in levels] == ["1", "2", "3"]
    # The runs that were killed mid-training were continued, not replaced. A killed driver's Ray worker
    # lives on for a moment and may still finish its run itself (then the run keeps that worker's pid).
    again = client.get_run(oom.info.run_id)
    assert again.info.status == "FINISHED" and int(again.data.tags["sdd.restarts"]) >= 1
    for killed in (dense, level):
        again = client.get_run(killed.info.run_id)
        assert again.info.status == "FINISHED" and (int(again.data.tags.get("sdd.restarts", 0)) >= 1 or
                                                    again.data.tags["sdd.pid"] == killed.data.tags["sdd.pid"])
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
    logging.getLogger(__name__).info("kills survived: %s", driver.kills)

    run_uninterrupted(client, clean_uri)
    got, want = record(client), record(MlflowClient(clean_uri))
    assert sorted(got) == sorted(want)
    for key in want:  # bit for bit: PyTorch on the CPU is deterministic here
        assert got[key]["metrics"] == want[key]["metrics"], key
        for name, tensor in want[key].get("weights", {}).items():
            assert tensor.equal(got[key]["weights"][name]), (key, name)
