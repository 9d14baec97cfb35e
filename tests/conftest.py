"""Shared fixtures: an isolated MLflow sqlite store per test, and tiny step configs."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sdd.config import DataConfig, ModelConfig, OptimConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[1]

# Every local Ray runtime of the session runs without token auth (the product keeps it on): Ray keeps
# the auth mode of the first runtime in the process, so tests must not mix the two.
os.environ["RAY_AUTH_MODE"] = "disabled"
# As the CLI sets it (MLflow's download bars would land in the steps' captured stderr).
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# Generated MNIST-1D arrays are cached on disk (sdd.data): one temporary cache for the whole session, never
# the user's ~/.cache. Set in the environment, so xdist workers (they inherit the controller's), Ray workers
# and the CLI subprocesses the tests start all use it.
if not (os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get("SDD_CACHE_DIR")):
    os.environ["SDD_CACHE_DIR"] = tempfile.mkdtemp(prefix="sdd-test-cache-")
    atexit.register(shutil.rmtree, os.environ["SDD_CACHE_DIR"], ignore_errors=True)

# The longest an awaited event (a server up, a reaper done, a subprocess finished) may take on a machine
# five times slower than ours; every wait ends as soon as its event happens, so this only bounds a hang.
WAIT_S = 900.0

# Small MNIST-1D problem: generated in well under a second, trains in a fraction of one.
TINY_DATA = DataConfig(train_size=400, test_size=200, val_size=100, noise=0.2)


def tiny_train(**overrides) -> TrainConfig:
    data = {k: overrides.pop(k) for k in list(overrides) if k in DataConfig.__dataclass_fields__}
    model = {k: overrides.pop(k) for k in list(overrides) if k in ModelConfig.__dataclass_fields__}
    optim = {k: overrides.pop(k) for k in list(overrides) if k in OptimConfig.__dataclass_fields__}
    return TrainConfig(
        data=DataConfig(**{**TINY_DATA.__dict__, **data}),
        model=ModelConfig(**{"width": 16, **model}),
        optim=OptimConfig(**{"epochs": 40, "lr": 1e-2, **optim}),
        device="cpu",
        **overrides,
    )


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """An empty, migrated MLflow sqlite database: creating the schema costs seconds, copying it nothing."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(tmp_path, monkeypatch, empty_store) -> str:
    """A fresh sqlite tracking store as MLFLOW_TRACKING_URI, cwd in tmp_path."""
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    return uri


@contextlib.contextmanager
def shared_store(folder: Path, template: Path) -> Iterator[dict]:
    """A store for a whole test module (trained parents are reused by its tests): {"uri", "folder"}."""
    shutil.copy(template, folder / "mlflow.db")
    world = {"uri": f"sqlite:///{folder / 'mlflow.db'}", "folder": folder}
    with pytest.MonkeyPatch.context() as mp:
        enter_store(mp, world)
        yield world


def enter_store(monkeypatch: pytest.MonkeyPatch, world: dict) -> dict:
    """Point MLflow (and the cwd) at a shared store inside one test."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", world["uri"])
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(world["folder"])
    return world


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(backend_uri: str, artifacts: Path, port: int, workers: int = 1) -> subprocess.Popen:
    """A real `mlflow server` on 127.0.0.1, in its own session (stop it with `stop_group`)."""
    return subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", backend_uri, "--default-artifact-root", str(artifacts), "--workers", str(workers)],
        # Without the job executor's seven processes, which no test uses: it starts and stops much faster.
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def wait_for_port(server: subprocess.Popen, port: int) -> None:
    """Until the server accepts connections on `port`; fails at once if it exits."""
    deadline = time.time() + WAIT_S
    while time.time() < deadline:
        assert server.poll() is None, f"server exited ({server.returncode})"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.25)
    pytest.fail(f"nothing listened on port {port} within {WAIT_S:.0f}s")


def stop_group(proc: subprocess.Popen, grace_s: float = 60.0) -> None:
    """End a process started in its own session and everything it started: SIGTERM, then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(WAIT_S)


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = WAIT_S) -> subprocess.CompletedProcess:
    """`python -m sdd ...` in a subprocess (the real CLI, exit status and stderr)."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("MLFLOW_RUN_ID", None)
    return subprocess.run([sys.executable, "-m", "sdd", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


# The longest test files (seconds under `make test`), started first so that the two xdist workers
# (one file at a time each) finish together instead of one waiting on a long file started last.
LONGEST_FIRST = ("test_kill_resume.py", "test_concurrency.py", "test_cluster.py", "test_study.py", "test_sweep.py",
                 "test_train_step.py", "test_mlproject.py", "test_prune_step.py", "test_bench.py",
                 "test_browser.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
