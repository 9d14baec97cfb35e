"""The `distill` step: teacher resolution, lineage, bad teachers, and the entropy early stop."""

import pytest
from torch import nn

from conftest import enter_store, shared_store, tiny_train
from sdd import tracking
from sdd.chain import run_prune
from sdd.cli import main
from sdd.config import DistillConfig, PruneConfig
from sdd.dense import run_train
from sdd.distillation import resolve_teacher


@pytest.fixture(scope="module")
def world(tmp_path_factory, empty_store):
    """A dense student parent, a pruned teacher in the registry, and models that do not fit."""
    with shared_store(tmp_path_factory.mktemp("distill"), empty_store) as world:
        teacher = run_train(tiny_train(width=64, epochs=60))
        run_prune(PruneConfig(parent=teacher.run_id, levels=2, epochs=10))
        student = run_train(tiny_train(width=8, epochs=30))
        client = tracking.get_client()
        misfits = {}
        for name, module in {"classes": nn.Linear(40, 3), "shape": nn.Linear(7, 10)}.items():
            run = client.create_run(tracking.experiment_id(client), run_name=f"misfit-{name}")
            tracking.log_model(client, run.info.run_id, module)
            client.set_terminated(run.info.run_id)
            misfits[name] = run.info.run_id
        yield {**world, "teacher": teacher.run_id, "student": student.run_id, "misfits": misfits}


@pytest.fixture
def env(world, monkeypatch):
    return enter_store(monkeypatch, world)


def test_teacher_reference_forms(env):
    client = tracking.get_client()
    alias = resolve_teacher(client, "models:/sdd-mnist1d-mlp@best-sparse")
    version = client.get_model_version_by_alias("sdd-mnist1d-mlp", "best-sparse")
    assert alias.run_id == version.run_id
    assert resolve_teacher(client, f"models:/sdd-mnist1d-mlp/{version.version}").run_id == version.run_id
    by_uri = resolve_teacher(client, f"runs:/{env['teacher']}/model")
    assert by_uri.run_id == env["teacher"] and by_uri.artifact_uri == f"runs:/{env['teacher']}/model"
    assert resolve_teacher(client, env["teacher"]).artifact_uri == f"runs:/{env['teacher']}/model"


def test_distill_chain_lineage(env):
    cfg = PruneConfig(parent=env["student"], levels=2, epochs=10, register=False)
    teacher = "models:/sdd-mnist1d-mlp@best-sparse"
    result = run_prune(cfg, DistillConfig(teacher=teacher))
    vanilla = run_prune(cfg)
    client = tracking.get_client()
    tags = client.get_run(result.run_id).data.tags
    assert tags["sdd.step"] == "distill" and tags["sdd.teacher_uri"] == teacher
    assert tags["sdd.teacher_run_id"] == client.get_model_version_by_alias("sdd-mnist1d-mlp", "best-sparse").run_id
    assert tags["mlflow.parentRunId"] == env["student"] == tags["sdd.dense_run_id"]
    assert client.get_run(vanilla.run_id).data.tags["mlflow.parentRunId"] == env["student"]
    assert vanilla.run_id != result.run_id
    # The distilled chain trains differently from the vanilla one on the same parent.
    a = [m.value for m in sorted(client.get_metric_history(result.run_id, "train_loss"), key=lambda m: m.step)]
    b = [m.value for m in sorted(client.get_metric_history(vanilla.run_id, "train_loss"), key=lambda m: m.step)]
    assert a[0] == b[0] and a[1:] != b[1:]


def test_dense_training_with_a_teacher(env):
    result = run_train(tiny_train(width=8, epochs=10, distill=DistillConfig(teacher=f"runs:/{env['teacher']}/model")))
    tags = tracking.get_client().get_run(result.run_id).data.tags
    assert tags["sdd.teacher_run_id"] == env["teacher"]


def _count(client):
    return len(client.search_runs([e.experiment_id for e in client.search_experiments()]))


@pytest.mark.parametrize("make_args,needle", [
    (lambda w: ["--teacher", "models:/sdd-mnist1d-mlp@nope"], "no such registered model"),
    (lambda w: ["--teacher", "models:/unknown/3"], "no such registered model"),
    (lambda w: ["--teacher", "0123456789abcdef0123456789abcdef"], "not found"),
    (lambda w: ["--teacher", f"runs:/{w['student']}/missing"], "cannot load"),
    (lambda w: ["--teacher", w["misfits"]["classes"]], "3 classes"),
    (lambda w: ["--teacher", w["misfits"]["shape"]], "does not accept inputs"),
    (lambda w: ["--teacher", w["teacher"], "--alpha", "1.5"], "--alpha must be in [0, 1]"),
    (lambda w: ["--teacher", w["teacher"], "--temperature", "0"], "--temperature must be > 0"),
    (lambda w: ["--teacher", w["teacher"], "--temperature", "-2"], "--temperature must be > 0"),
    (lambda w: [], "--teacher is required"),
])
def test_bad_teacher_input(env, capsys, make_args, needle):
    client = tracking.get_client()
    before = _count(client)
    assert main(["distill", "--parent", env["student"], "--levels", "1", "--epochs", "2", *make_args(env)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sdd: error:") and "\n" not in err and needle in err, err
    assert _count(client) == before


def test_entropy_early_stop_records_where_and_what_it_saved(env):
    # A harsh rate collapses the student quickly; zero tolerance stops at the first val_acc drop
    # once the entropy has moved at all.
    result = run_prune(PruneConfig(parent=env["student"], levels=8, rate=0.6, epochs=10, register=False,
                                   early_stop="entropy", entropy_drop=0.001, acc_tolerance=0.0))
    run = tracking.get_client().get_run(result.run_id)
    stop = int(run.data.tags["sdd.early_stop_level"])
    assert 1 <= stop < 8 and "entropy" in run.data.tags["sdd.early_stop_reason"]
    assert run.data.metrics["levels_run"] == stop
    assert run.data.metrics["epochs_spent"] == 10 * stop and run.data.metrics["epochs_full"] == 80
    assert run.data.metrics["train_flops_spent"] < run.data.metrics["train_flops_full"]
