"""The bad-input catalogue: every command and study-file field, wrong names, types and ranges.

Each case must exit with status 2 and one line on stderr, before any work, leaving the tracking
store exactly as it was.
"""

import textwrap

import pytest
from mlflow.entities import ViewType

from conftest import enter_store, shared_store, tiny_train
from sdd import tracking
from sdd.cli import main
from sdd.dense import run_train

DENSE_OK = """\
name: bad
stages:
  dense:
    recipe: {train_size: 200, test_size: 100, val_size: 50, epochs: 5}
    grid: {width: [8, 16]}
"""

# (case id, command line, expected fragment of the message). {parent} and {file} are filled in.
CLI_CASES = [
    ("train-dataset", ["train", "--dataset", "imagenet"], "invalid choice"),
    ("train-model", ["train", "--model", "transformer"], "invalid choice"),
    ("train-width-zero", ["train", "--width", "0"], "--width must be > 0"),
    ("train-width-type", ["train", "--width", "wide"], "expected an integer"),
    ("train-depth", ["train", "--depth", "-1"], "--depth must be > 0"),
    ("train-noise-high", ["train", "--noise", "1"], "--noise must be in [0, 1)"),
    ("train-noise-type", ["train", "--noise", "some"], "expected a number"),
    ("train-noise-kind", ["train", "--noise-kind", "gaussian"], "invalid choice"),
    ("train-epochs", ["train", "--epochs", "0"], "--epochs must be > 0"),
    ("train-lr", ["train", "--lr", "-0.1"], "--lr must be > 0"),
    ("train-lr-nan", ["train", "--lr", "nan"], "finite"),
    ("train-optimizer", ["train", "--optimizer", "lion"], "invalid choice"),
    ("train-schedule", ["train", "--schedule", "onecycle"], "invalid choice"),
    ("train-milestones", ["train", "--milestones", "10,20"], "--milestones needs --schedule multistep"),
    ("train-batch", ["train", "--batch-size", "-5"], "--batch-size must be >= 0"),
    ("train-save-epochs", ["train", "--epochs", "10", "--save-epochs", "20"], "--save-epochs must lie in"),
    ("train-bool", ["train", "--augment", "perhaps"], "expected true or false"),
    ("train-unknown-option", ["train", "--widht", "8"], "unrecognized arguments"),
    ("train-no-data", ["train", "--dataset", "cifar10", "--data-dir", "/nonexistent"], "cifar"),
    ("train-device", ["train", "--device", "tpu"], "invalid choice"),
    ("train-val-noise-no-val", ["train", "--val-size", "0", "--val-noise"], "--val-noise needs a validation split"),
    ("prune-no-parent", ["prune"], "--parent is required"),
    ("prune-parent-missing", ["prune", "--parent", "0" * 32], "not found"),
    ("prune-rate", ["prune", "--parent", "{parent}", "--rate", "1.2"], "--rate must be in (0, 1)"),
    ("prune-target", ["prune", "--parent", "{parent}", "--target-sparsity", "1"], "--target-sparsity"),
    ("prune-both", ["prune", "--parent", "{parent}", "--levels", "3", "--target-sparsity", "0.9"], "not both"),
    ("prune-criterion", ["prune", "--parent", "{parent}", "--criterion", "hessian"], "invalid choice"),
    ("prune-scope", ["prune", "--parent", "{parent}", "--scope", "local"], "invalid choice"),
    ("prune-retrain", ["prune", "--parent", "{parent}", "--retrain", "anneal"], "invalid choice"),
    ("prune-start-epoch", ["prune", "--parent", "{parent}", "--start-epoch", "3"], "no saved epoch 3"),
    ("prune-rewind", ["prune", "--parent", "{parent}", "--retrain", "weight_rewind", "--rewind-step", "9"],
     "--rewind-step 9"),
    ("prune-levels-type", ["prune", "--parent", "{parent}", "--levels", "many"], "expected an integer"),
    # Model selection (best level, registration, entropy early stop) never falls back to the test set.
    ("prune-no-val", ["prune", "--parent", "{noval}"], "has no validation split"),
    ("prune-no-val-early-stop", ["prune", "--parent", "{noval}", "--early-stop", "entropy"],
     "has no validation split"),
    ("prune-no-val-unregistered", ["prune", "--parent", "{noval}", "--register", "false"], "has no validation split"),
    ("distill-no-val", ["distill", "--parent", "{noval}", "--teacher", "{parent}"], "has no validation split"),
    ("distill-alpha", ["distill", "--parent", "{parent}", "--teacher", "{parent}", "--alpha", "1.5"], "--alpha"),
    ("distill-temperature", ["distill", "--parent", "{parent}", "--teacher", "{parent}", "--temperature", "0"],
     "--temperature"),
    ("distill-teacher", ["distill", "--parent", "{parent}", "--teacher", "models:/none@x"], "no such registered"),
    ("analyze-missing", ["analyze", "--study", "no-such-study"], "no-such-study"),
    ("analyze-not-study", ["analyze", "--study", "{parent}"], "not a study"),
    ("sweep-missing-file", ["sweep", "/nonexistent/study.yaml"], "not found"),
    ("study-missing-file", ["study", "/nonexistent/study.yaml"], "not found"),
    ("unknown-command", ["shrink"], "invalid choice"),
]

# (case id, a study file that is wrong in one place, fragment of the message)
FILE_CASES = [
    ("file-yaml", "name: [unclosed\n", "line"),
    ("file-top-key", DENSE_OK + "colour: blue\n", "colour"),
    ("file-stage-name", DENSE_OK + "  shrink:\n    recipe: {}\n", "shrink"),
    ("file-recipe-key", DENSE_OK.replace("epochs: 5", "epochs: 5, epoks: 3"), "epoks"),
    ("file-recipe-type", DENSE_OK.replace("epochs: 5", "epochs: five"), "epochs"),
    ("file-grid-type", DENSE_OK.replace("[8, 16]", "[8, wide]"), "width"),
    ("file-grid-empty", DENSE_OK.replace("[8, 16]", "[]"), "empty"),
    ("file-grid-range", DENSE_OK.replace("{width: [8, 16]}", "{width: [8], noise: [1.5]}"), "noise"),
    ("file-model", DENSE_OK.replace("epochs: 5", "epochs: 5, model: transformer"), "model"),
    ("file-retries", DENSE_OK + "retries: -1\n", "retries"),
    ("file-resources", DENSE_OK + "    resources: {cpu: 64}\n", "cpu"),
    ("file-gpu", DENSE_OK + "    resources: {cpu: 1, gpu: 1}\n", "gpu"),
    ("file-start-width", DENSE_OK + "  prune:\n    start: [{width: 12}]\n    recipe: {levels: 2}\n", "12"),
    ("file-prune-key", DENSE_OK + "  prune:\n    recipe: {levels: 2, shrinkage: 3}\n", "shrinkage"),
    ("file-prune-rate", DENSE_OK + "  prune:\n    start: {select: [at]}\n    recipe: {levels: 2, rate: 1.5}\n", "rate"),
    ("file-select-role", DENSE_OK + "  prune:\n    start: {select: [middle]}\n    recipe: {levels: 2}\n", "middle"),
    ("file-chain-no-val", DENSE_OK.replace("val_size: 50", "val_size: 0")
     + "  prune:\n    start: {select: [at]}\n    recipe: {levels: 2}\n", "val_size 0"),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory, empty_store):
    with shared_store(tmp_path_factory.mktemp("bad"), empty_store) as world:
        # noval: a dense run trained with --val-size 0 (allowed), which no chain may start from.
        return {**world, "parent": run_train(tiny_train(epochs=3)).run_id,
                "noval": run_train(tiny_train(epochs=3, val_size=0)).run_id}


def _snapshot(client) -> tuple:
    exps = sorted((e.experiment_id, e.name, e.lifecycle_stage) for e in client.search_experiments(view_type=ViewType.ALL))
    runs = client.search_runs([e[0] for e in exps], run_view_type=ViewType.ALL)
    runs = sorted((r.info.run_id, r.info.status, r.info.lifecycle_stage, len(r.data.metrics), len(r.data.tags))
                  for r in runs)
    models = sorted(m.name for m in client.search_registered_models())
    return exps, runs, models


def _check(world, monkeypatch, capsys, argv, needle):
    enter_store(monkeypatch, world)
    client = tracking.get_client()
    before = _snapshot(client)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sdd: error:") and "\n" not in err, err
    assert needle in err, err
    assert _snapshot(client) == before


@pytest.mark.parametrize("argv,needle", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input(world, monkeypatch, capsys, argv, needle):
    argv = [a.format(parent=world["parent"], noval=world["noval"]) for a in argv]
    _check(world, monkeypatch, capsys, argv, needle)


@pytest.mark.parametrize("text,needle", [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES])
def test_study_file_bad_input(world, monkeypatch, capsys, tmp_path, text, needle):
    path = tmp_path / "study.yaml"
    path.write_text(textwrap.dedent(text))
    _check(world, monkeypatch, capsys, ["sweep", str(path)], needle)


def test_catalogue_is_large_enough():
    assert len(CLI_CASES) + len(FILE_CASES) >= 30
