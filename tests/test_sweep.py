"""`sdd sweep` on a real local Ray runtime and a real sqlite store: lineage, reuse, failures, bad input,
(a driver killed at every point of a study: tests/test_kill_resume.py)."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import WAIT_S, run_cli
from mlflow import MlflowClient

from sdd import cli
from sdd.config import PruneConfig
from sdd.errors import UsageError
from sdd.steps import STEPS
from sdd.sweep import lineage
from sdd.sweep import plan as sweep_plan
from sdd.sweep import run as sweep_run
from sdd.sweep.study_file import load_study

TRIAL_KEYS = {"trial", "step", "config", "run_id", "status", "reused", "error", "attempts"}

# 2 widths x 2 seeds. Width 128 fits the 20% noisy labels of 200 samples, width 8 does not: the
# interpolation threshold is 128, and the prune stage starts from 8 (below) and 128 (at).
TINY = """
name: tiny
stages:
  dense:
    recipe: {dataset: mnist1d, model: mlp, train_size: 200, test_size: 100, val_size: 50, noise: 0.2,
             epochs: 150, lr: 0.01, eval_every: 50, device: cpu}
    grid: {width: [8, 128], seed: [0, 1]}
  prune:
    start: {select: [before, below, at, above, after], threshold: 0.9}
    recipe: {levels: 2, epochs: 20, register: false, device: cpu}
"""

# The Ray tests run one chain seed, as many chains as a seed-0-only planner made: seed 1, so a chain
# started from dense seed 0 (the smallest seed) or one that kept seed 0 for itself would show.
ONE_SEED = TINY.replace("  prune:\n", "  prune:\n    seeds: [1]\n")

SDD = [sys.executable, "-m", "sdd"]


def sdd_main(*argv: str) -> int:
    """The `sdd` command line, in this process (so the sweep uses this module's Ray runtime)."""
    return cli.main(list(argv))


@pytest.fixture(scope="module")
def ray_local():
    import ray

    previous = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()
    if previous is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = previous


def write_study(tmp_path: Path, text: str = TINY, name: str = "tiny.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def all_runs(uri: str) -> list:
    client = MlflowClient(uri)
    return client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=5000)


def by_step(runs: list, step: str) -> list:
    return [r for r in runs if r.data.tags.get("sdd.step") == step]


def trials_json(uri: str, run_id: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        return json.loads(Path(MlflowClient(uri).download_artifacts(run_id, "trials.json", tmp)).read_text())


@pytest.mark.slow
def test_dense_grid_and_prune_stage_lineage_then_rerun_trains_nothing(ray_local, store, tmp_path, capsys):
    path = write_study(tmp_path, ONE_SEED)
    assert sdd_main("sweep", str(path), "--storage-path", str(tmp_path / "ray")) == 0
    runs = all_runs(store)
    ids = {r.info.run_id: r for r in runs}
    parent = {r.info.run_id: r.data.tags.get("mlflow.parentRunId") for r in runs}

    (study_run,) = by_step(runs, "study")
    assert study_run.info.status == "FINISHED" and parent[study_run.info.run_id] is None
    assert study_run.data.tags["sdd.study_file"] == "tiny.yaml" and study_run.info.run_name == "tiny"
    stages = {r.data.tags["sdd.stage"]: r for r in by_step(runs, "sweep")}
    assert set(stages) == {"dense", "prune"}
    for stage in stages.values():
        assert parent[stage.info.run_id] == study_run.info.run_id and stage.info.status == "FINISHED"
        assert stage.data.tags["sdd.study_run_id"] == study_run.info.run_id

    dense = by_step(runs, "train")
    assert len(dense) == 4
    for run in dense:
        assert parent[run.info.run_id] == stages["dense"].info.run_id and run.info.status == "FINISHED"
        assert run.data.tags["sdd.study_run_id"] == study_run.info.run_id
        assert run.data.tags["sdd.stage_run_id"] == stages["dense"].info.run_id

    records = trials_json(store, stages["dense"].info.run_id)
    assert all(set(r) == TRIAL_KEYS for r in records)
    assert sorted(r["trial"] for r in records) == sorted(f"width={w},seed={s}" for w in (8, 128) for s in (0, 1))
    assert {r["run_id"] for r in records} == {r.info.run_id for r in dense}
    assert all(r["status"] == "FINISHED" and r["step"] == "train" and r["attempts"] == 1 and not r["reused"]
               and r["error"] is None for r in records)
    assert records[0]["config"]["epochs"] == 150 and records[0]["config"]["noise"] == 0.2
    metrics = stages["dense"].data.metrics
    assert (metrics["trials_total"], metrics["trials_finished"], metrics["trials_failed"]) == (4, 4, 0)
    assert metrics["wall_time_s"] > 0

    # Starting checkpoints chosen around the threshold: below (width 8) and at it (width 128), seed 1.
    assert json.loads(stages["prune"].data.tags["sdd.it_widths"]) == {"all": 128}
    chains = by_step(runs, "prune")
    assert len(chains) == 2
    roles = {}
    for chain in chains:
        dense_parent = ids[parent[chain.info.run_id]]
        assert dense_parent.data.tags["sdd.step"] == "train"
        assert chain.data.tags["sdd.dense_run_id"] == dense_parent.info.run_id
        assert chain.data.tags["sdd.stage_run_id"] == stages["prune"].info.run_id
        assert chain.data.tags["sdd.study_run_id"] == study_run.info.run_id
        roles[chain.data.tags["sdd.start_role"]] = (dense_parent.data.params["width"], dense_parent.data.params["seed"],
                                                    chain.data.params["seed"])
    assert roles == {"below": ("8", "1", "1"), "at": ("128", "1", "1")}
    levels = by_step(runs, "level")
    assert len(levels) == 4 and {parent[lv.info.run_id] for lv in levels} == {c.info.run_id for c in chains}
    chain_records = trials_json(store, stages["prune"].info.run_id)
    assert {r["run_id"] for r in chain_records} == {c.info.run_id for c in chains}
    assert all(r["step"] == "prune" and r["config"]["levels"] == 2 for r in chain_records)
    assert len(runs) == 1 + 2 + 4 + 2 + 4

    # The same sweep again: nothing is trained, no run is added, every trial is the old run.
    assert sdd_main("sweep", str(path), "--storage-path", str(tmp_path / "ray")) == 0
    again = all_runs(store)
    assert len(again) == len(runs)
    records = trials_json(store, stages["dense"].info.run_id) + trials_json(store, stages["prune"].info.run_id)
    assert all(r["reused"] and r["status"] == "FINISHED" for r in records)
    assert {r["run_id"] for r in records} == {r.info.run_id for r in dense + chains}

    # One stage alone, inside the same study run; and the dry run sees every trial covered.
    assert sdd_main("sweep", str(path), "--stage", "prune") == 0
    assert len(all_runs(store)) == len(runs)
    capsys.readouterr()
    assert sdd_main("sweep", str(path), "--dry-run") == 0
    out = capsys.readouterr().out
    assert "stage dense: 4 trial(s), 0 to run, 4 covered by finished runs" in out
    assert "stage prune: 2 trial(s), 0 to run, 2 covered by finished runs" in out
    assert "interpolation threshold at width 128" in out


def test_starting_widths_around_the_threshold(tmp_path):
    grid = "[8, 16, 32, 64, 96, 128, 192, 256, 512]"
    study_file = write_study(tmp_path, TINY.replace("[8, 128]", grid).replace("threshold: 0.9", "threshold: 0.95"))
    fits = {8: 0.08, 16: 0.1, 32: 0.17, 64: 0.35, 96: 0.63, 128: 0.96, 192: 0.99, 256: 1.0, 512: 1.0}
    results = [sweep_plan.DenseResult(f"{w:04d}{s}".ljust(32, "0"), {"width": w, "seed": s},
                                      {"train_acc_noisy": fits[w] + 0.01 * s}) for w in fits for s in (0, 1)]
    starts, plan = sweep_plan.select_starts(load_study(study_file), "prune", results)
    # The widths are chosen once, on the mean over seeds; then every seed starts from its own dense run.
    assert [(s.role, s.result.width, s.result.seed) for s in starts] == [
        (role, width, seed) for role, width in (("before", 32), ("below", 96), ("at", 128), ("above", 192),
                                                ("after", 512)) for seed in (0, 1)]
    assert [(s["role"], s["width"], s["seed"]) for s in plan.starts] == \
        [(s.role, s.result.width, s.result.seed) for s in starts]
    assert json.loads(plan.tags["sdd.it_widths"]) == {"all": 128}
    picked = write_study(tmp_path, study_file.read_text().replace("  prune:\n", "  prune:\n    seeds: [1]\n"), "one.yaml")
    starts, _ = sweep_plan.select_starts(load_study(picked), "prune", results)
    assert [(s.role, s.result.seed) for s in starts] == [(r, 1) for r in ("before", "below", "at", "above", "after")]
    fits[512] = fits[256] = fits[192] = fits[128] = 0.5
    with pytest.raises(UsageError, match=r"no dense width fits the noisy labels to 0.95 \(best: 0.630 at width 96"):
        sweep_plan.select_starts(load_study(study_file), "prune",
                                 [sweep_plan.DenseResult(r.run_id, r.config, {"train_acc_noisy": fits[r.width]})
                                  for r in results])


def hand_built_dense(widths: tuple[int, ...], seeds: tuple[int, ...], fit: dict[int, float],
                     save_epochs: tuple[int, ...] = ()) -> list[sweep_plan.DenseResult]:
    """Finished dense runs as the dense stage's trials.json would give them, run ids naming width and seed."""
    return [sweep_plan.DenseResult(f"{w:04d}{s}".ljust(32, "0"),
                                   {"dataset": "mnist1d", "noise": 0.2, "width": w, "seed": s,
                                    "save_epochs": list(save_epochs)},
                                   {"train_acc_noisy": fit[w], "val_acc": 0.5}) for w in widths for s in seeds]


def plan_of(study_file: Path, stage: str, results: list[sweep_plan.DenseResult], monkeypatch) -> sweep_plan.Plan:
    # The dense stage's results read from MLflow are replaced by hand-built ones: the planner alone.
    monkeypatch.setattr(sweep_plan, "dense_results", lambda *args: results)
    return sweep_plan.plan_chains(lineage.Store("sqlite:///unused", None, None, "sdd"), load_study(study_file), stage,
                                  "study")


def test_every_chain_seed_prunes_the_dense_parent_of_its_seed(tmp_path, monkeypatch):
    study_file = write_study(tmp_path, TINY.replace("seed: [0, 1]", "seed: [0, 1, 2]"))
    results = hand_built_dense((8, 128), (0, 1, 2), {8: 0.2, 128: 0.95})
    plan = plan_of(study_file, "prune", results, monkeypatch)
    by_run = {r.run_id: r for r in results}
    assert len(plan.trials) == 6  # below and at, three seeds each
    for trial in plan.trials:
        parent = by_run[trial.config["parent"]]
        assert trial.config["seed"] == parent.seed  # chain seed s prunes the dense run of seed s
        assert f"seed={parent.seed}" in trial.key and f"width={parent.width}" in trial.key
    assert sorted((t.tags["sdd.start_role"], t.config["seed"]) for t in plan.trials) == [
        (role, seed) for role in ("at", "below") for seed in (0, 1, 2)]
    assert len({t.key for t in plan.trials}) == 6
    assert sorted(t.key for t in plan.trials)[0] == "at width=128,seed=0"


def test_the_study_threshold_reaches_the_chains(tmp_path, monkeypatch):
    results = hand_built_dense((8, 128), (0, 1), {8: 0.2, 128: 0.95})
    plan = plan_of(write_study(tmp_path), "prune", results, monkeypatch)
    assert {t.config["it_threshold"] for t in plan.trials} == {0.9} and plan.tags["sdd.it_threshold"] == "0.9"
    # A chain recipe that sets its own threshold keeps it.
    own = write_study(tmp_path, TINY.replace("levels: 2,", "levels: 2, it_threshold: 0.7,"), "own.yaml")
    assert {t.config["it_threshold"] for t in plan_of(own, "prune", results, monkeypatch).trials} == {0.7}


EPOCHWISE = TINY.replace("epochs: 150,", "epochs: 150, save_epochs: [50, 100],").replace(
    "start: {select: [before, below, at, above, after], threshold: 0.9}", "start: {epochs: [50, 100], width: 128}")


def test_epoch_starts_plan_chains_from_saved_epochs(tmp_path, monkeypatch):
    results = hand_built_dense((8, 128), (0, 1), {8: 0.2, 128: 0.95}, save_epochs=(50, 100))
    plan = plan_of(write_study(tmp_path, EPOCHWISE), "prune", results, monkeypatch)
    by_run = {r.run_id: r for r in results}
    assert sorted((t.config["start_epoch"], t.config["seed"]) for t in plan.trials) == [
        (e, s) for e in (50, 100) for s in (0, 1)]
    assert all(by_run[t.config["parent"]].width == 128 and by_run[t.config["parent"]].seed == t.config["seed"]
               for t in plan.trials)
    assert "width=128,seed=1,epoch=50" in {t.key for t in plan.trials}
    assert sorted((s["epoch"], s["seed"]) for s in plan.starts) == [(50, 0), (50, 1), (100, 0), (100, 1)]
    missing = [r for r in results if (r.width, r.seed) != (128, 1)]
    with pytest.raises(UsageError, match=r"start \(width=128, epoch 50, seed 1\): the dense stage has no finished"):
        plan_of(write_study(tmp_path, EPOCHWISE), "prune", missing, monkeypatch)
    # No start selection: the chains keep their own default threshold, and the study reports that one.
    assert {t.config["it_threshold"] for t in plan.trials} == {PruneConfig().it_threshold}


def test_epoch_start_chains_prune_the_saved_epoch(store, tmp_path, monkeypatch):
    # End to end without Ray: the planned dense trials and chains run by their step functions.
    from sdd.chain import run_prune
    from sdd.dense import run_train

    text = """
stages:
  dense:
    recipe: {dataset: mnist1d, model: mlp, width: 16, train_size: 300, test_size: 100, val_size: 50, epochs: 30,
             lr: 0.01, eval_every: 10, save_epochs: [10], seed: 1, device: cpu}
  prune:
    start: {epochs: [10]}
    recipe: {levels: 1, epochs: 3, register: false, device: cpu}
"""
    study_file = write_study(tmp_path, text, "epochs.yaml")
    client = MlflowClient(store)
    results = []
    for trial in sweep_plan.plan_dense(lineage.Store(store, client, None, "sdd"), load_study(study_file)).trials:
        run_id = run_train(STEPS["train"].from_flat(trial.config)).run_id
        results.append(sweep_plan.DenseResult(run_id, trial.config, {}))
    (trial,) = plan_of(study_file, "prune", results, monkeypatch).trials
    chain = client.get_run(run_prune(STEPS["prune"].from_flat(trial.config)).run_id)
    dense_id = chain.data.tags["sdd.dense_run_id"]
    assert dense_id == results[0].run_id and chain.data.params["start_epoch"] == "10"
    assert chain.data.params["seed"] == client.get_run(dense_id).data.params["seed"] == "1"
    # Level 0 measures the weights the chain starts from: the dense run as it was at epoch 10.
    (start,) = [m.value for m in client.get_metric_history(chain.info.run_id, "test_loss") if m.step == 0]
    (at_10,) = [m.value for m in client.get_metric_history(dense_id, "test_loss") if m.step == 10]
    (final,) = [m.value for m in client.get_metric_history(dense_id, "test_loss") if m.step == 30]
    assert start == pytest.approx(at_10, abs=1e-6) and start != pytest.approx(final, abs=1e-4)


def test_best_dense_teacher_is_the_best_val_acc_on_the_chains_data():
    # At 20% noise width 64 has the best val_acc and width 128 the best test_acc; the 10%-noise runs
    # beat both on val_acc but learnt other labels, so they never teach a 20%-noise chain.
    # A seed-1 run (its own noise draw) never teaches a seed-0 chain, unless both name the same noise seed.
    def dense(name: str, noise: float, width: int, val_acc: float, test_acc: float, seed: int = 0,
              **data) -> sweep_plan.DenseResult:
        return sweep_plan.DenseResult(name * 32, {"dataset": "mnist1d", "noise": noise, "width": width, "seed": seed,
                                                  **data}, {"val_acc": val_acc, "test_acc": test_acc})

    results = [dense("a", 0.2, 16, 0.60, 0.58), dense("b", 0.2, 64, 0.80, 0.70), dense("c", 0.2, 128, 0.78, 0.75),
               dense("d", 0.1, 128, 0.90, 0.88), dense("e", 0.1, 16, 0.70, 0.92), dense("f", 0.2, 32, 0.95, 0.9, 1),
               dense("g", 0.2, 8, 0.5, 0.5, 2, noise_seed=7), dense("h", 0.2, 8, 0.99, 0.9, 3, noise_seed=7)]

    def teacher(selector: str, start: sweep_plan.DenseResult) -> str:
        return sweep_plan._teacher_ref(selector, sweep_plan.Start(start, None, "at", ()), results)

    assert teacher("best_dense", results[0]) == "b" * 32
    assert teacher("best_dense:width=128", results[0]) == "c" * 32  # the options narrow the same-data runs
    assert teacher("best_dense", results[4]) == "d" * 32
    assert teacher("best_dense", results[5]) == "f" * 32 and teacher("best_dense", results[6]) == "h" * 32


def test_relative_data_dir_is_the_sweeps(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    study_file = write_study(tmp_path, TINY.replace("dataset: mnist1d,", "dataset: mnist1d, data_dir: data,"))
    plan = sweep_plan.plan_dense(lineage.Store("sqlite:///unused", None, None, "sdd"), load_study(study_file))
    assert {t.config["data_dir"] for t in plan.trials} == {str(tmp_path / "data")}


def test_mlproject_style_empty_options_mean_defaults():
    args = cli.build_parser().parse_args(["sweep", "f.yaml", "--stage", "", "--address", "", "--storage-path", "",
                                          "--dry-run", "false"])
    assert (args.stage, args.address, args.storage_path, args.dry_run) == (None, None, None, False)
    args = cli.build_parser().parse_args(["sweep", "f.yaml", "--stage", "prune", "--dry-run"])
    assert (args.stage, args.dry_run) == ("prune", True)
    args = cli.build_parser().parse_args(["study", "", "--out", ""])
    assert (args.file, args.out) == (sweep_run.DEFAULT_FILE, None)


def test_dry_run_creates_nothing(store, tmp_path, capsys):
    path = write_study(tmp_path)
    assert sdd_main("sweep", str(path), "--dry-run") == 0
    out = capsys.readouterr().out
    assert "stage dense: 4 trial(s), 4 to run" in out
    assert "train   width=128,seed=1  [cpu 1, gpu 0]  to run" in out
    assert "stage prune: the dense stage has not run yet" in out
    client = MlflowClient(store)
    assert [e.name for e in client.search_experiments()] == ["Default"]
    assert all_runs(store) == []


SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"


@pytest.mark.parametrize("preset", sorted(p.name for p in SWEEPS.glob("*.yaml")))
def test_every_preset_dry_runs(store, preset, capsys):
    assert sdd_main("sweep", str(SWEEPS / preset), "--dry-run") == 0
    out = capsys.readouterr().out
    assert "to run" in out and "stage dense" in out
    assert all_runs(store) == []


def test_presets_are_found_by_name_from_any_directory(store, tmp_path):
    # A `pip install` user has no sweeps/ folder: the presets ship inside the package.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = run_cli("sweep", "cifar10_resnet18", "--dry-run", cwd=elsewhere)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "stage dense: 1 trial(s)" in done.stdout and "resnet18" in done.stdout
    listed = run_cli("presets", cwd=elsewhere)
    assert listed.returncode == 0, listed.stderr[-2000:]
    shipped = sorted(p.stem for p in SWEEPS.glob("*.yaml"))
    names = [line.split()[0] for line in listed.stdout.splitlines() if not line.startswith(" ")]
    assert names == shipped
    assert listed.stdout.count("cost: measured") + listed.stdout.count("cost: estimated") == len(shipped)
    missing = run_cli("study", "no_such_preset", cwd=elsewhere)
    assert missing.returncode == 2 and "a preset: " + ", ".join(shipped) in missing.stderr


FAILING = """
name: failing
retries: 1
stages:
  dense:
    recipe: {model: mlp, train_size: 200, test_size: 100, val_size: 50, epochs: 20, device: cpu}
    grid:
      - {dataset: [mnist1d], width: [8, 2000000000]}
      - {dataset: [mnist1d], width: [8], optimizer: [sgd], lr: [1.0e+12]}
      - {dataset: [cifar10], data_dir: [/nonexistent], width: [8]}
  prune:
    start: {select: [at]}
    recipe: {levels: 1, register: false}
"""


@pytest.mark.slow
def test_failed_trials_are_retried_and_reported(ray_local, store, tmp_path, capsys):
    # Weights that cannot be allocated (out of memory) and a loss that becomes NaN fail on every
    # attempt: retried in the same run, then reported. A dataset whose files are missing is bad input
    # (UsageError): not retried. The prune stage is not run.
    path = write_study(tmp_path, FAILING)
    assert sdd_main("sweep", str(path), "--storage-path", str(tmp_path / "ray")) == 1
    runs = all_runs(store)
    (stage,) = [r for r in by_step(runs, "sweep") if r.data.tags["sdd.stage"] == "dense"]
    assert stage.info.status == "FAILED" and stage.data.tags["sdd.trials_failed"] == "3"
    assert "dataset=mnist1d,width=2000000000" in stage.data.tags["sdd.failed_trials"]
    records = {r["trial"]: r for r in trials_json(store, stage.info.run_id)}
    assert records["dataset=mnist1d,width=8"]["status"] == "FINISHED"
    dense = {r.info.run_id: r for r in by_step(runs, "train")}
    for key, kind, reason in (("dataset=mnist1d,width=2000000000", "out_of_memory", "allocate"),
                              ("dataset=mnist1d,width=8,optimizer=sgd,lr=1e+12", "diverged",
                               "TrainingDiverged: loss became")):
        record = records[key]
        assert record["status"] == "FAILED" and record["attempts"] == 2 and reason in record["error"], record
        run = dense[record["run_id"]]  # one run per trial: the retry continued the failed run
        assert run.info.status == "FAILED" and run.data.tags["sdd.failure"] == kind
        assert reason in run.data.tags["sdd.error"] and reason in run.data.tags["sdd.previous_error"]
        assert run.data.tags["sdd.restarts"] == "1"
    assert len(dense) == 3
    bad = records["dataset=cifar10,data_dir=/nonexistent,width=8"]
    assert bad["status"] == "FAILED" and bad["attempts"] == 1 and bad["error"].startswith("UsageError")
    assert bad["run_id"] is None  # bad input fails before any run exists
    assert by_step(runs, "study")[0].info.status == "FAILED"
    # The prune stage would place the threshold on a width sweep with holes: it is recorded as not run,
    # with the reason, and the sweep ends.
    assert by_step(runs, "prune") == []
    (prune,) = [r for r in by_step(runs, "sweep") if r.data.tags["sdd.stage"] == "prune"]
    assert prune.info.status == "FAILED" and "3 dense trial(s) did not finish" in prune.data.tags["sdd.not_run"]
    out = capsys.readouterr().out
    assert "dense: 1/4 trials finished, 3 failed" in out and "prune: not run: prune stage" in out
    # The study's report lists what is missing and why.
    from analysis.report import analyze_study

    report = analyze_study(MlflowClient(store), by_step(runs, "study")[0].info.run_id, tmp_path / "report")
    missing = report.read_text().split("## What is missing")[1]
    assert "4 trial(s) did not give a finished run" in missing and "NOT RUN" in missing
    assert "can't allocate memory" in missing and "TrainingDiverged" in missing and "did not finish" in missing


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("change, expected", [
    (("resources", "    resources: {cpu: 64}\n"), "stages.dense.resources: no node can run a trial with cpu 64"),
    (("stage", "distill"), "--stage distill: tiny.yaml has no distill stage"),
    (("stage", "prune"), "prune stage: the dense stage of study tiny has not run yet"),
    (("tracking", None), "is unreachable"),
])
@pytest.mark.slow  # starts Ray: `make test-fast` starts none
def test_bad_input_exits_2_before_any_run(ray_local, store, tmp_path, monkeypatch, capsys, change, expected):
    text, args = TINY, []
    kind, value = change
    if kind == "resources":
        text = TINY.replace("    grid: {width: [8, 128], seed: [0, 1]}\n",
                            "    grid: {width: [8, 128], seed: [0, 1]}\n" + value)
    elif kind == "stage":
        args = ["--stage", value]
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    path = write_study(tmp_path, text)
    assert sdd_main("sweep", str(path), *args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
    if kind != "tracking":
        assert all_runs(store) == []


def test_unreachable_ray_address_exits_2(store, tmp_path):
    path = write_study(tmp_path)
    proc = subprocess.run(SDD + ["sweep", str(path), "--address", f"127.0.0.1:{free_port()}"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=WAIT_S, env={**os.environ, "MLFLOW_TRACKING_URI": store})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("sdd: error: Ray at 127.0.0.1:")
    assert all_runs(store) == []



PACKED = """
name: packed
stages:
  dense:
    recipe: {dataset: mnist1d, model: mlp, train_size: 200, test_size: 100, val_size: 50, noise: 0.2,
             epochs: 20, lr: 0.01, batch_size: 50, eval_every: 10, device: cpu}
    grid: {width: [8, 32], seed: [0, 1, 2]}
    pack_seeds: PACK
"""


@pytest.mark.parametrize("setting,sizes", [("true", [3, 3]), ("2", [2, 1, 2, 1]), ("false", [1] * 6),
                                           ("auto", [3, 3])])  # auto: minibatches of a small MLP on a CPU
def test_seed_packs_group_the_seeds_of_each_point(tmp_path, setting, sizes):
    study = load_study(write_study(tmp_path, PACKED.replace("PACK", setting)))
    plan = sweep_plan.plan_dense(None, study)
    launches = sweep_plan.seed_packs(plan.trials, study.stages["dense"])
    assert [len(members) for members in launches] == sizes
    for members in launches:
        assert len({t.config["width"] for t in members}) == 1
        assert [t.config["seed"] for t in members] == sorted(t.config["seed"] for t in members)
    full_batch = load_study(write_study(tmp_path, PACKED.replace("PACK", "auto").replace("batch_size: 50, ", ""),
                                        "full.yaml"))
    plan = sweep_plan.plan_dense(None, full_batch)
    assert [len(m) for m in sweep_plan.seed_packs(plan.trials, full_batch.stages["dense"])] == [1] * 6


@pytest.mark.slow
def test_a_sweep_trains_seed_packs_as_one_run_per_seed(ray_local, store, tmp_path, capsys):
    path = write_study(tmp_path, PACKED.replace("PACK", "true"))
    assert sdd_main("sweep", str(path), "--dry-run") == 0
    assert capsys.readouterr().out.count("to run in a seed pack of 3") == 6
    assert sdd_main("sweep", str(path), "--storage-path", str(tmp_path / "ray")) == 0
    runs = all_runs(store)
    (stage,) = by_step(runs, "sweep")
    dense = by_step(runs, "train")
    assert len(dense) == 6 and all(r.info.status == "FINISHED" for r in dense)
    packs = {r.data.tags["sdd.pack_runs"] for r in dense}
    assert len(packs) == 2 and all(r.data.tags["sdd.pack_size"] == "3" for r in dense)
    for pack in packs:
        members = [r for r in dense if r.data.tags["sdd.pack_runs"] == pack]
        assert sorted(r.data.params["seed"] for r in members) == ["0", "1", "2"]
        assert len({r.data.params["width"] for r in members}) == 1
        assert {r.info.run_id for r in members} == set(pack.split(","))
    for run in dense:
        assert run.data.tags["mlflow.parentRunId"] == stage.info.run_id
        assert run.data.tags["sdd.stage_run_id"] == stage.info.run_id
    records = trials_json(store, stage.info.run_id)
    assert all(set(r) == TRIAL_KEYS and r["status"] == "FINISHED" and r["attempts"] == 1 for r in records)
    assert {r["run_id"] for r in records} == {r.info.run_id for r in dense}
    # Each seed's run is the one training it alone would make: unpacked, the sweep reuses all six.
    assert sdd_main("sweep", str(write_study(tmp_path, PACKED.replace("PACK", "false"), "alone.yaml"))) == 0
    assert len(by_step(all_runs(store), "train")) == 6


def test_a_model_that_cannot_be_packed_is_refused_on_load(tmp_path):
    text = PACKED.replace("PACK", "true").replace("model: mlp", "model: resnet18")
    with pytest.raises(UsageError, match="dense.pack_seeds: model 'resnet18' cannot be trained as a seed pack"):
        load_study(write_study(tmp_path, text, "rn.yaml"))
    assert load_study(write_study(tmp_path, text.replace("pack_seeds: true", "pack_seeds: auto"), "auto.yaml"))
