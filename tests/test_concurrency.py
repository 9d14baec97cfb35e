"""Many writers at once into one sqlite store and into one `mlflow server`: nothing lost, nothing locked."""

import multiprocessing as mp
import os
import socket
import subprocess
import sys
import time

import pytest

from sdd import registry, tracking

pytestmark = pytest.mark.slow

WRITERS = 8
STEPS = 60
KEYS = ("train_acc", "test_acc", "entropy")


def _writer(uri: str, index: int, start, errors) -> None:
    try:
        client = tracking.get_client(uri)
        start.wait()  # all writers race from here: experiment creation, runs, metrics, registry
        exp_id = tracking.experiment_id(client, "race")
        run_id = tracking.start_run(client, exp_id, name=f"writer-{index}", tags={"sdd.step": "train"},
                                    adopt_project_run=False)
        logger = tracking.MetricLogger(client, run_id, interval=0.0)  # flush on every call: most contention
        for step in range(STEPS):
            logger.log({k: index + step / 1000 for k in KEYS}, step)
        logger.flush()
        tracking.terminate(client, run_id)
        registry._ensure_registered_model(client, "sdd-race-mlp")
        client.create_model_version("sdd-race-mlp", f"runs:/{run_id}/model", run_id=run_id)
    except BaseException as err:  # reported to the parent: a child's traceback alone would be lost
        errors.put(f"writer {index}: {type(err).__name__}: {err}")


def _hammer(uri: str) -> None:
    ctx = mp.get_context("spawn")
    start, errors = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(uri, i, start, errors)) for i in range(WRITERS)]
    for p in procs:
        p.start()
    time.sleep(8)  # let every child import mlflow before the race starts
    start.set()
    for p in procs:
        p.join(300)
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    assert not failures, failures
    assert all(p.exitcode == 0 for p in procs)
    client = tracking.get_client(uri)
    exps = [e for e in client.search_experiments() if e.name == "race"]
    assert len(exps) == 1
    runs = client.search_runs([exps[0].experiment_id])
    assert len(runs) == WRITERS and all(r.info.status == "FINISHED" for r in runs)
    for run in runs:
        index = int(run.info.run_name.split("-")[1])
        for key in KEYS:
            history = client.get_metric_history(run.info.run_id, key)
            assert sorted(m.step for m in history) == list(range(STEPS))
            assert all(m.value == pytest.approx(index + m.step / 1000) for m in history)
    assert len(client.search_registered_models("name = 'sdd-race-mlp'")) == 1
    assert len(client.search_model_versions("name = 'sdd-race-mlp'")) == WRITERS


def test_concurrent_writers_into_sqlite(tmp_path):
    _hammer(f"sqlite:///{tmp_path / 'mlflow.db'}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_concurrent_writers_into_a_tracking_server(tmp_path):
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                               "--default-artifact-root", str(tmp_path / "artifacts"), "--workers", "2"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not start")
        _hammer(f"http://127.0.0.1:{port}")
    finally:
        os.killpg(server.pid, 15)
        server.wait(30)
