"""The `train` step against a real sqlite MLflow store."""

import json
import math
import signal

import mlflow
import pytest
import torch

from conftest import WAIT_S, run_cli, tiny_train
from sdd import faults, models, tracking
from sdd.checkpoints import load_state
from sdd.cli import main
from sdd.dense import run_train
from sdd.measures import predict


def _all_runs(uri):
    client = tracking.get_client(uri)
    exps = client.search_experiments()
    return client.search_runs([e.experiment_id for e in exps]) if exps else []


def test_train_logs_the_full_record(store, tmp_path):
    cfg = tiny_train(save_epochs=(10,), rewind_step=5)
    result = run_train(cfg)
    client = tracking.get_client()
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and not result.reused
    assert run.data.tags["sdd.step"] == "train" and len(run.data.tags["sdd.config_hash"]) == 16
    assert run.data.params["width"] == "16" and run.data.params["noise_kind"] == "symmetric"
    model = mlflow.pytorch.load_model(f"runs:/{result.run_id}/model")
    assert int(run.data.params["num_params"]) == models.count_params(model) == 40 * 16 + 16 + 16 * 10 + 10
    history = client.get_metric_history(result.run_id, "test_acc")
    # Epoch 0 (init), then the default schedule (log-spaced, every epoch early on) to 40, once each.
    assert sorted(m.step for m in history) == [0, *sorted(cfg.eval_epochs())]
    assert {1, 2, 3, 40} <= cfg.eval_epochs() and len(cfg.eval_epochs()) < 40
    for key in ("train_acc_clean", "train_acc_noisy", "val_acc", "learning_distance", "entropy", "nonzero_params"):
        assert key in run.data.metrics
    assert any(k.startswith("entropy/") for k in run.data.metrics)
    assert run.data.metrics["wrong_label_rate"] == pytest.approx(0.2)
    arts = {a.path for a in client.list_artifacts(result.run_id, "checkpoints")}
    assert arts == {"checkpoints/init.pt", "checkpoints/final.pt", "checkpoints/epoch_10.pt", "checkpoints/step_5.pt"}
    noise = load_state(client.download_artifacts(result.run_id, "noise/noisy_idx.pt", str(tmp_path)))
    assert len(noise["noisy_idx"]) == 80  # exactly round(0.2 * 400) symmetric flips
    # The logged model is the final model: its test accuracy measured again equals the logged one.
    from sdd.problem import load_problem
    problem = load_problem(cfg.data, torch.device("cpu"), run_seed=cfg.optim.seed)
    acc = (predict(model, problem.splits.x_test).argmax(1) == problem.splits.y_test).float().mean().item()
    assert acc == pytest.approx(run.data.metrics["test_acc"])


def test_same_config_reuses_finished_run_and_force_retrains(store):
    first = run_train(tiny_train(epochs=5))
    again = run_train(tiny_train(epochs=5))
    assert again.reused and again.run_id == first.run_id
    forced = run_train(tiny_train(epochs=5, force=True))
    assert not forced.reused and forced.run_id != first.run_id


def test_training_is_deterministic(store):
    a = run_train(tiny_train(epochs=8), experiment="a")
    b = run_train(tiny_train(epochs=8), experiment="b")
    client = tracking.get_client()
    for key in ("test_acc", "train_loss", "learning_distance"):
        ha = [(m.step, m.value) for m in client.get_metric_history(a.run_id, key)]
        hb = [(m.step, m.value) for m in client.get_metric_history(b.run_id, key)]
        assert sorted(ha) == sorted(hb)


@pytest.mark.parametrize("args,needle", [
    (["--dataset", "mnist2d"], "invalid choice"),
    (["--model", "transformer"], "invalid choice"),
    (["--width", "0"], "--width must be > 0"),
    (["--width", "abc"], "expected an integer"),
    (["--noise", "1.0"], "--noise must be in [0, 1)"),
    (["--noise", "-0.2"], "--noise must be in [0, 1)"),
    (["--noise", "lots"], "expected a number"),
    (["--epochs", "0"], "--epochs must be > 0"),
    (["--dataset", "cifar10", "--data-dir", "/nonexistent/cifar"], "cifar"),
    (["--dataset", "cifar10"], "data"),
    (["--noise-kind", "gaussian"], "invalid choice"),
    (["--save-epochs", "1,x"], "expected an integer"),
])
def test_bad_input_exits_2_with_one_line_and_no_run(store, capsys, args, needle):
    assert main(["train", "--train-size", "100", "--epochs", "2", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sdd: error:") and "\n" not in err and needle in err
    assert _all_runs(store) == []


def test_cli_subprocess_exit_status(store, tmp_path):
    bad = run_cli("train", "--width", "-3", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "Traceback" not in bad.stderr
    ok = run_cli("train", "--train-size", "200", "--test-size", "100", "--val-size", "50", "--width", "8",
                 "--epochs", "3", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "mlflow ui" in ok.stdout
    runs = _all_runs(store)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert math.isfinite(runs[0].data.metrics["test_acc"])


def test_diverging_training_fails_the_run_with_the_reason(store, capsys):
    args = ["train", "--train-size", "200", "--test-size", "100", "--val-size", "50", "--width", "8",
            "--epochs", "5", "--optimizer", "sgd", "--lr", "1e12"]
    assert main(args) == 1
    (run,) = _all_runs(store)
    assert run.info.status == "FAILED"
    assert run.data.tags["sdd.error"].startswith("TrainingDiverged: loss became")


def test_run_killed_with_a_damaged_resume_checkpoint_is_trained_again_in_place(store, caplog):
    # A kill while MLflow copies the resume checkpoint into the store leaves a truncated file; the
    # next run of the config continues the same run from the start instead of failing on it.
    from pathlib import Path

    cfg = tiny_train(epochs=30, eval_every=5)
    reference = run_train(cfg, experiment="uninterrupted")
    killed = run_train(cfg, experiment="killed")
    client = tracking.get_client()
    client.set_terminated(killed.run_id, "KILLED")
    damaged = Path(client.get_run(killed.run_id).info.artifact_uri) / "checkpoints" / "resume.pt"
    damaged.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    again = run_train(cfg, experiment="killed")
    assert again.run_id == killed.run_id and not again.reused
    run = client.get_run(killed.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["sdd.restarts"] == "1"
    assert "training again from the start" in caplog.text and "resume.pt" in caplog.text
    assert "checkpoints/resume.pt" not in tracking.list_artifacts(client, killed.run_id, "checkpoints")
    for key in ("test_acc", "train_loss"):
        a = [(m.step, m.value) for m in client.get_metric_history(killed.run_id, key)]
        b = [(m.step, m.value) for m in client.get_metric_history(reference.run_id, key)]
        assert sorted(a) == sorted(b), key  # every step once, the same values


@pytest.mark.slow
def test_minibatch_run_killed_mid_way_is_continued_bit_for_bit(store, tmp_path):
    # Minibatches come in an order drawn from the run's generator, so a resume that restored the
    # weights and the optimizer but not the generator would train on other batches from there on.
    args = ["train", "--train-size", "400", "--test-size", "200", "--val-size", "100", "--width", "16",
            "--epochs", "30", "--batch-size", "64", "--lr", "0.01", "--eval-every", "5", "--resume-every", "0"]
    fault_env = {faults.FAULT_VAR: "train-saved-20:1:kill", faults.DIR_VAR: str(tmp_path / "faults"),
                 faults.SNAPSHOT_VAR: "10"}
    killed = run_cli(*args, "--experiment", "killed", env=fault_env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run_id = json.loads((tmp_path / "faults" / "train-saved-20.json").read_text())["run_id"]
    # Both the continued and the reference run in a fresh process, with the same torch threads.
    for experiment in ("killed", "uninterrupted"):
        done = run_cli(*args, "--experiment", experiment)
        assert done.returncode == 0, done.stderr[-2000:]
    client = tracking.get_client()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert (run.data.tags["sdd.restarts"], run.data.tags["sdd.resumed_from_epoch"]) == ("1", "20")
    (reference,) = [r for r in _all_runs(store) if r.info.run_id != run_id]
    for key in ("test_acc", "train_loss", "val_acc", "learning_distance"):
        got = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        want = sorted((m.step, m.value) for m in client.get_metric_history(reference.info.run_id, key))
        assert got == want, key
    final, expected = (tracking.load_state_artifact(client, r, "checkpoints/final.pt")
                       for r in (run_id, reference.info.run_id))
    assert all(final[name].equal(expected[name]) for name in expected)


def test_experiment_opens_on_the_runs_table_and_runs_log_their_splits(store):
    # MLflow 3.17's UI opens an experiment without the kind tag on its GenAI overview.
    first = run_train(tiny_train(epochs=5, noise_seed=1), experiment="datasets")
    second = run_train(tiny_train(epochs=5, noise_seed=2), experiment="datasets")
    client = tracking.get_client()
    exp = client.get_experiment_by_name("datasets")
    assert exp.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    inputs = {}
    for result in (first, second):
        logged = client.get_run(result.run_id).inputs.dataset_inputs
        inputs[result.run_id] = {i.tags[0].value: i.dataset for i in logged}
        assert sorted(inputs[result.run_id]) == ["test", "training", "validation"]
        train = inputs[result.run_id]["training"]
        assert train.source_type == "code" and '"generator": "mnist1d.transform, one stream' in train.source
        assert json.loads(train.profile)["num_rows"] == 400
    a, b = inputs[first.run_id], inputs[second.run_id]
    assert client.get_run(second.run_id).data.tags["sdd.noise_seed"] == "2"  # the seed drawn from
    # Two noise draws of the same data: different training datasets, the same clean evaluation splits.
    assert a["training"].digest != b["training"].digest and a["training"].name != b["training"].name
    assert (a["test"].digest, a["validation"].digest) == (b["test"].digest, b["validation"].digest)
    link = tracking.ui_link("http://127.0.0.1:5077", exp.experiment_id, first.run_id)
    assert link == f"http://127.0.0.1:5077/#/experiments/{exp.experiment_id}/runs/{first.run_id}?workflowType=machine_learning"


@pytest.mark.slow
def test_progress_is_a_bar_on_a_terminal_and_log_lines_elsewhere(store, tmp_path):
    import os
    import pty
    import subprocess
    import sys

    args = [sys.executable, "-m", "sdd", "train", "--train-size", "200", "--test-size", "100", "--val-size", "50",
            "--width", "8", "--epochs", "100", "--eval-every", "50"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}
    piped = subprocess.run(args + ["--seed", "1"], env=env, capture_output=True, text=True, timeout=WAIT_S)
    assert piped.returncode == 0, piped.stderr[-2000:]
    lines = [line for line in piped.stderr.splitlines() if "sdd.progress" in line]
    # One line per 5% of the epochs, with the loss and an ETA; no bar drawn into a log.
    assert len(lines) == 20 and "epoch 50/100 (50%)" in piped.stderr and "ETA" in lines[0]
    assert "\r" not in piped.stderr
    leader, follower = pty.openpty()
    proc = subprocess.Popen(args + ["--seed", "2"], env=env, stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closed: the process has exited
            break
        if not chunk:
            break
        seen += chunk
    assert proc.wait(WAIT_S) == 0
    text = seen.decode(errors="replace")
    assert "epoch/s" in text or "s/epoch" in text, text[-2000:]  # tqdm's bar: rate, counts and ETA
    assert "/100 [" in text and "sdd.progress" not in text
