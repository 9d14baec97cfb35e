"""`mlflow run . -e <entry point> --env-manager local` end to end against a real sqlite store."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.entities import ViewType

from conftest import ROOT, WAIT_S
from sdd import tracking

pytestmark = pytest.mark.slow

TINY = ["-P", "width=16", "-P", "epochs=30", "-P", "train_size=300", "-P", "test_size=100", "-P", "val_size=50",
        "-P", "lr=0.01"]


def mlflow_run(entry: str, *params: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_RUN_ID", None)
    return subprocess.run([sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", entry, "--env-manager", "local",
                           *params], cwd=cwd, env=env, capture_output=True, text=True, timeout=WAIT_S)


def _runs(client, view=ViewType.ACTIVE_ONLY):
    return client.search_runs([e.experiment_id for e in client.search_experiments()], run_view_type=view)


def test_train_prune_distill_entry_points(store, tmp_path):
    client = tracking.get_client()
    train = mlflow_run("train", *TINY, cwd=tmp_path)
    assert train.returncode == 0, train.stderr[-3000:]
    (dense,) = _runs(client)
    assert dense.info.status == "FINISHED" and dense.data.tags["sdd.step"] == "train"
    assert dense.data.params["width"] == "16" and "test_acc" in dense.data.metrics

    prune = mlflow_run("prune", "-P", f"parent={dense.info.run_id}", "-P", "levels=2", "-P", "epochs=10",
                       cwd=tmp_path)
    assert prune.returncode == 0, prune.stderr[-3000:]
    chains = [r for r in _runs(client) if r.data.tags.get("sdd.step") == "prune"]
    assert len(chains) == 1 and chains[0].info.status == "FINISHED"
    assert chains[0].data.tags["mlflow.parentRunId"] == dense.info.run_id

    distill = mlflow_run("distill", "-P", f"parent={dense.info.run_id}", "-P",
                         "teacher=models:/sdd-mnist1d-mlp@best-sparse", "-P", "levels=2", "-P", "epochs=10",
                         cwd=tmp_path)
    assert distill.returncode == 0, distill.stderr[-3000:]
    (chain,) = [r for r in _runs(client) if r.data.tags.get("sdd.step") == "distill"]
    assert chain.info.status == "FINISHED" and chain.data.tags["sdd.teacher_uri"] == "models:/sdd-mnist1d-mlp@best-sparse"
    level_ids = {r.info.run_id for r in _runs(client) if r.data.tags.get("sdd.step") == "level"}
    assert chain.data.tags["sdd.teacher_run_id"] in level_ids  # the best-sparse level of the prune chain
    assert chain.data.tags["mlflow.parentRunId"] == dense.info.run_id


def test_non_numeric_parameter_leaves_no_run(store, tmp_path):
    client = tracking.get_client()
    bad = mlflow_run("train", "-P", "width=abc", cwd=tmp_path)
    assert bad.returncode != 0
    assert "sdd: error: sdd train: argument --width: expected an integer, got 'abc'" in bad.stderr
    assert "Traceback" not in bad.stderr
    deadline = time.time() + WAIT_S  # the reaper deletes the launcher's run once it is marked failed
    while time.time() < deadline and _runs(client):
        time.sleep(0.5)
    assert _runs(client) == []


def test_sweep_entry_point_dry_run(store, tmp_path):
    study = tmp_path / "tiny.yaml"
    study.write_text("name: tiny\nstages:\n  dense:\n    recipe: {train_size: 200, test_size: 100, val_size: 50, "
                     "epochs: 5}\n    grid: {width: [8, 16]}\n")
    result = mlflow_run("sweep", "-P", f"file={study}", "-P", "dry_run=true", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "width=8" in result.stdout and "width=16" in result.stdout
    client = tracking.get_client()
    deadline = time.time() + WAIT_S  # a dry run logs nothing: the launcher's own run is reaped
    while time.time() < deadline and _runs(client):
        time.sleep(0.5)
    assert _runs(client) == []
