"""Many writers at once into one sqlite store and into one `mlflow server`: nothing lost, nothing locked;
identical steps started at the same moment make one run."""

import multiprocessing as mp
import os
import re
import subprocess
import sys
import time

import pytest

from conftest import WAIT_S, free_port, start_mlflow_server, stop_group, wait_for_port

from sdd import lifecycle, registry, tracking

pytestmark = pytest.mark.slow

WRITERS = 8
STEPS = 30
KEYS = ("train_acc", "test_acc", "entropy")


def _race(uri: str, index: int, barrier) -> None:
    client = tracking.get_client(uri)
    barrier.wait()  # all writers race from here: experiment creation, runs, metrics, registry
    exp_id = tracking.experiment_id(client, "race")
    run_id = tracking.start_run(client, exp_id, name=f"writer-{index}", tags={"sdd.step": "train"},
                                adopt_project_run=False)
    # Every run of a study logs the same validation and test sets: the store inserts each dataset once,
    # and writers that race to insert it must all end up linked to it.
    import torch
    tracking.log_datasets(client, run_id, "code", {"generator": "race"}, [
        ("race-train", "training", torch.arange(10) % 3), ("race-test", "test", torch.arange(20) % 5)])
    logger = tracking.MetricLogger(client, run_id, interval=0.0)  # flush on every call: most contention
    for step in range(STEPS):
        logger.log({k: index + step / 1000 for k in KEYS}, step)
    logger.flush()
    tracking.terminate(client, run_id)
    registry._ensure_registered_model(client, "sdd-race-mlp")
    client.create_model_version("sdd-race-mlp", f"runs:/{run_id}/model", run_id=run_id)
    # Every writer asks for the run of one and the same config at the same moment: one creates it,
    # the others wait for it and reuse it.
    barrier.wait()
    one = tracking.experiment_id(client, "race-one")
    lease = lifecycle.acquire(client, one, lifecycle.RunSpec(
        "train", "one-config", "shared", {"sdd.step": "train", "sdd.config_hash": "one-config"},
        adopt_project_run=False))
    if not lease.reused:
        with lease.running():
            time.sleep(0.5)


def _writer(uris: list[str], index: int, barrier, server_up, errors) -> None:
    """One writer process: races the others into each store in turn (imports are paid once)."""
    for uri in uris:
        try:
            if uri.startswith("http") and not server_up.wait(WAIT_S):
                raise TimeoutError("the tracking server did not come up")
            _race(uri, index, barrier)
        except BaseException as err:  # reported to the parent: a child's traceback alone would be lost
            errors.put(f"writer {index} into {uri}: {type(err).__name__}: {err}")
            barrier.abort()  # the others must not wait at the next store's start for this one
            return


def _check(uri: str) -> None:
    client = tracking.get_client(uri)
    exps = [e for e in client.search_experiments() if e.name == "race"]
    assert len(exps) == 1
    runs = client.search_runs([exps[0].experiment_id])
    assert len(runs) == WRITERS and all(r.info.status == "FINISHED" for r in runs)
    for run in runs:
        index = int(run.info.run_name.split("-")[1])
        assert sorted(i.dataset.name for i in run.inputs.dataset_inputs) == ["race-test", "race-train"]
        for key in KEYS:
            history = client.get_metric_history(run.info.run_id, key)
            assert sorted(m.step for m in history) == list(range(STEPS))
            assert all(m.value == pytest.approx(index + m.step / 1000) for m in history)
    assert len(client.search_registered_models("name = 'sdd-race-mlp'")) == 1
    assert len(client.search_model_versions("name = 'sdd-race-mlp'")) == WRITERS
    (one,) = [e for e in client.search_experiments() if e.name == "race-one"]
    assert [r.info.status for r in client.search_runs([one.experiment_id])] == ["FINISHED"]
    assert not client.search_registered_models(f"name LIKE '{lifecycle.LOCK_PREFIX}%'")  # every lock released


def test_concurrent_writers_into_sqlite_and_into_a_tracking_server(tmp_path):
    port = free_port()
    server = start_mlflow_server(f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "artifacts", port, workers=2)
    try:
        # The writers import while the server starts; they race into sqlite first, the server second.
        uris = [f"sqlite:///{tmp_path / 'mlflow.db'}", f"http://127.0.0.1:{port}"]
        # Fresh processes forked from one server that has imported torch and mlflow once (5 s each).
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["tests.test_concurrency"])
        barrier, server_up, errors = ctx.Barrier(WRITERS), ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=_writer, args=(uris, i, barrier, server_up, errors)) for i in range(WRITERS)]
        for p in procs:
            p.start()
        wait_for_port(server, port)
        server_up.set()
        for p in procs:
            p.join(WAIT_S)
        failures = []
        while not errors.empty():
            failures.append(errors.get())
        assert not failures, failures
        assert all(p.exitcode == 0 for p in procs)
        for uri in uris:
            _check(uri)
    finally:
        stop_group(server)


TINY_TRAIN = ["train", "--train-size", "300", "--test-size", "100", "--val-size", "50", "--width", "16",
              "--epochs", "200", "--eval-every", "50", "--experiment", "twins"]


def _twins(uri: str, args: list[str]) -> list[str]:
    """The same `sdd` command twice at the same moment; the run id each one printed."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    env.pop("MLFLOW_RUN_ID", None)
    procs = [subprocess.Popen([sys.executable, "-m", "sdd", *args], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=WAIT_S) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    # (Against a tracking server MLflow itself also prints a "View run ... at" line.)
    return [re.search(r"^(?:reused finished )?run ([0-9a-f]{32}):", out, re.MULTILINE).group(1) for out, _ in outputs]


def _runs_by_step(client) -> dict[str, list]:
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    out: dict[str, list] = {}
    for run in runs:
        out.setdefault(run.data.tags.get("sdd.step"), []).append(run)
    return out


def test_identical_steps_started_at_once_make_one_run(tmp_path):
    port = free_port()
    server = start_mlflow_server(f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "artifacts", port, workers=2)
    try:
        sqlite = f"sqlite:///{tmp_path / 'mlflow.db'}"
        tracking.get_client(sqlite)  # the schema exists before the twins race to use it
        wait_for_port(server, port)
        for uri in (sqlite, f"http://127.0.0.1:{port}"):
            client = tracking.get_client(uri)
            dense_ids = _twins(uri, TINY_TRAIN)
            chain_ids = _twins(uri, ["prune", "--parent", dense_ids[0], "--levels", "2", "--epochs", "50",
                                     "--register", "false"])
            runs = _runs_by_step(client)
            assert dense_ids[0] == dense_ids[1] and chain_ids[0] == chain_ids[1], (uri, dense_ids, chain_ids)
            assert [r.info.run_id for r in runs["train"]] == [dense_ids[0]], uri
            assert [r.info.run_id for r in runs["prune"]] == [chain_ids[0]], uri
            assert sorted(r.data.tags["sdd.level"] for r in runs["level"]) == ["1", "2"], uri
            assert all(r.info.status == "FINISHED" for group in runs.values() for r in group), uri
    finally:
        stop_group(server)


def test_a_store_known_to_be_ready_skips_the_migration_lock(tmp_path, empty_store):
    """A sweep's workers open a store its driver made: they must not queue on the lock that serialises a new
    store's migration (one client set-up at a time), while a process that knows nothing still takes it."""
    import fcntl
    import shutil
    import threading

    shutil.copy(empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    got: dict[str, object] = {}

    def open_client(key: str, **kwargs) -> None:
        got[key] = tracking.get_client(uri, **kwargs)

    with open(tmp_path / "mlflow.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as another process setting the store up would
        unknown = threading.Thread(target=open_client, args=("unknown",), daemon=True)
        unknown.start()
        unknown.join(1.0)
        assert "unknown" not in got  # waits for the lock
        ready = threading.Thread(target=open_client, args=("ready",), kwargs={"schema_ready": True}, daemon=True)
        ready.start()
        ready.join(10.0)
        assert "ready" in got
        got["ready"].search_experiments(max_results=1)
    unknown.join(10.0)
    assert "unknown" in got
