"""A sweep submitted to a real Ray cluster with `ray job submit`, logging to a real MLflow tracking server.

Both servers listen on 127.0.0.1 only, are started here and stopped here (in `finally`), whatever
happens. The Ray head runs with token authentication, as a real cluster should.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import WAIT_S
from mlflow import MlflowClient

from tests.test_sweep import TINY, by_step, write_study

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def wait_until_up(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    """Until `url` answers over HTTP (any status: Ray's dashboard answers 401 without the token)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"server exited ({proc.returncode}): {log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout}s: {log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    """Stop the process group this test started (the server and every process it spawned)."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
    # The group may outlive its leader for a moment (Ray drains its workers on SIGTERM).
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.slow
def test_sweep_submitted_with_ray_job_submit_logs_to_a_tracking_server(tmp_path):
    gcs, dashboard, tracking, client_server, agent = free_ports(5)
    ray_tmp = tempfile.mkdtemp(prefix="sddray", dir="/tmp")  # Ray's socket paths must stay short
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "RAY_ADDRESS", "RAY_AUTH_MODE"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the job's `python` is this environment's
    env["RAY_AUTH_MODE"] = "token"  # head and client: the token is ~/.ray/auth_token (`ray get-auth-token`)
    # Ray binds its servers to the node's IP and maps 127.0.0.1 to it; on Linux this switch keeps the node
    # (GCS, raylet, dashboard, agents) on the loopback interface.
    head_env = {**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    uri = f"http://127.0.0.1:{tracking}"
    server_log, head_log = tmp_path / "mlflow-server.log", tmp_path / "ray-head.log"
    with open(server_log, "w") as out:
        server = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(tracking), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
             "--artifacts-destination", str(tmp_path / "artifacts")],
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    head = None
    try:
        with open(head_log, "w") as out:
            head = subprocess.Popen(
                [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                 "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
                 "--ray-client-server-port", str(client_server), "--dashboard-agent-listen-port", str(agent),
                 "--num-cpus", "2", "--temp-dir", ray_tmp, "--disable-usage-stats"],
                cwd=tmp_path, env=head_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until_up(f"{uri}/health", server, WAIT_S, server_log)
        wait_until_up(f"http://127.0.0.1:{dashboard}/api/version", head, WAIT_S, head_log)

        study_file = write_study(tmp_path, TINY[:TINY.index("  prune:")].replace("seed: [0, 1]", "seed: [0]"))
        runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": uri}, "excludes": [".git"]}
        submit = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dashboard}",
             "--working-dir", str(ROOT), "--runtime-env-json", json.dumps(runtime_env), "--",
             "python", "-m", "sdd", "sweep", str(study_file), "--storage-path", str(tmp_path / "ray_results")],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=WAIT_S)
        assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-4000:]
        assert "dense: 2/2 trials finished, 0 failed" in submit.stdout

        client = MlflowClient(uri)
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=100)
        (study_run,) = by_step(runs, "study")
        (stage,) = by_step(runs, "sweep")
        dense = by_step(runs, "train")
        assert study_run.info.status == "FINISHED" and stage.info.status == "FINISHED"
        assert len(dense) == 2 and all(r.data.tags["mlflow.parentRunId"] == stage.info.run_id for r in dense)
        with tempfile.TemporaryDirectory() as tmp:
            records = json.loads(Path(client.download_artifacts(stage.info.run_id, "trials.json", tmp)).read_text())
        assert {r["run_id"] for r in records} == {r.info.run_id for r in dense}
        assert (tmp_path / "artifacts").is_dir()  # artifacts went through the server, not a shared folder
    finally:
        if head is not None:
            stop(head)
        stop(server)
        shutil.rmtree(ray_tmp, ignore_errors=True)
