"""`sdd study`: every stage of a tiny study under one study run, then the report."""

from __future__ import annotations

import csv
import math
import tempfile
from collections import defaultdict
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from analysis.runs import family_label
from sdd.cli import build_parser
from sdd.config import PruneConfig
from sdd.sweep import run as sweep_run
from sdd.sweep.study_file import load_study
from tests.test_sweep import ONE_SEED, TINY, all_runs, by_step, ray_local, sdd_main, write_study  # noqa: F401

TINY_STUDY = ONE_SEED + """
  distill:
    start: {select: [at], threshold: 0.9}
    seeds: [1]
    recipe: {levels: 2, epochs: 20, register: false, device: cpu, teacher: best_dense}
"""


@pytest.mark.slow
def test_tiny_study_end_to_end(ray_local, store, tmp_path, capsys):  # noqa: F811 - the fixture
    path = write_study(tmp_path, TINY_STUDY)
    assert sdd_main("study", str(path), "--storage-path", str(tmp_path / "ray")) == 0
    out = capsys.readouterr().out.splitlines()
    runs = all_runs(store)
    (study_run,) = by_step(runs, "study")
    assert {r.data.tags["sdd.stage"] for r in by_step(runs, "sweep")} == {"dense", "prune", "distill"}
    assert len(by_step(runs, "train")) == 4 and len(by_step(runs, "prune")) == 2
    (distilled,) = by_step(runs, "distill")
    (plain,) = [c for c in by_step(runs, "prune") if c.data.tags["sdd.start_role"] == "at"]
    assert distilled.data.tags["sdd.dense_run_id"] == plain.data.tags["sdd.dense_run_id"]
    assert distilled.data.tags["sdd.teacher_run_id"] in {r.info.run_id for r in by_step(runs, "train")}

    report = Path(next(line for line in out if line.startswith("study finished in")).split("report: ")[1])
    assert report.name == "report.md" and report.is_file()
    assert report.parent == tmp_path / "reports" / f"tiny-{study_run.info.run_id[:8]}"
    (browse,) = [line for line in out if line.startswith("browse the study: ")]
    assert f"http://127.0.0.1:5000/#/experiments/{study_run.info.experiment_id}/runs/{study_run.info.run_id}" \
        f"?workflowType=machine_learning" in browse and f"mlflow ui --backend-store-uri {store}" in browse
    assert "report/report.html" in browse
    client = MlflowClient(store)
    assert "report/report.md" in [a.path for a in client.list_artifacts(study_run.info.run_id, "report")]
    assert client.get_run(study_run.info.run_id).data.metrics["wall_time_s"] > 0
    assert study_run.data.tags["sdd.it_threshold"] == "0.9"  # `sdd analyze` reads it back
    check_report_against_runs(client, report.parent, study_run.info.run_id, load_study(path).it_threshold)


# --- the report's tables against what the steps logged ------------------------------------------------
# The analysis reads runs by tag, param and metric name; a name changed on the writing side (or the
# reading side) leaves a blank or stale column rather than an error, so every cell is checked against
# MLflow, read here with the client alone and the names of the design's contract.

REPORT_TABLES = ("dense_runs.csv", "chain_levels.csv", "summary.csv")
DENSE_PARAMS = ("dataset", "model", "depth", "width", "noise", "noise_kind", "seed", "epochs")
DENSE_METRICS = ("test_acc", "train_acc", "train_acc_noisy", "train_acc_clean", "val_acc", "num_params",
                 "nonzero_params", "entropy")
LEVEL_METRICS = ("test_acc", "val_acc", "train_acc", "train_acc_noisy", "sparsity", "nonzero_params", "entropy")
CHAIN_TAGS = ("sdd.dense_run_id", "sdd.it_level", "sdd.phases")


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _same(cell: str, value: float | str | None) -> bool:
    """A CSV cell (floats written with 6 significant digits, blanks for NaN) against a stored value;
    params and tags are strings, so numbers among them compare as numbers ("8" = "8.0")."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return cell == ""
    if isinstance(value, str):
        if cell == value:
            return True
        try:
            value = float(value)
        except ValueError:
            return False
    try:
        return float(cell) == pytest.approx(value, rel=1e-5, abs=1e-12)
    except ValueError:
        return False


def _runs_of_step(client: MlflowClient, step: str) -> dict[str, Run]:
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    return {r.info.run_id: r for r in client.search_runs(exp_ids, f"tags.`sdd.step` = '{step}'", max_results=1000)}


def _per_level(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    # A resumed chain may log a level twice; the later value is the one that stands.
    history = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    return {m.step: m.value for m in history}


def check_report_against_runs(client: MlflowClient, report_dir: Path, study_id: str, threshold: float) -> None:
    """Every row of dense_runs.csv, chain_levels.csv and summary.csv equals what MLflow holds for its run."""
    bad: list[str] = []

    def expect(where: str, column: str, cell: str, value: float | str | None, source: str) -> None:
        if not _same(cell, value):
            bad.append(f"{where}: {column} = {cell!r} in the report, MLflow {source} = {value!r}")

    # The report folder and the study run's report/ artifacts are the same tables.
    with tempfile.TemporaryDirectory() as tmp:
        for name in REPORT_TABLES:
            logged = Path(client.download_artifacts(study_id, f"report/{name}", tmp)).read_text()
            assert logged == (report_dir / name).read_text(), f"report/{name} logged to the study differs"

    dense = _runs_of_step(client, "train")
    rows = _rows(report_dir / "dense_runs.csv")
    assert sorted(r["run_id"] for r in rows) == sorted(dense), "dense_runs.csv rows vs the sdd.step=train runs"
    for row in rows:
        run, where = dense[row["run_id"]], f"dense_runs.csv run {row['run_id'][:8]}"
        params, metrics = run.data.params, run.data.metrics
        for key in DENSE_PARAMS:
            if key not in params:
                bad.append(f"{where}: the dense run logs no param {key!r}")
            else:
                expect(where, key, row[key], params[key], f"param {key}")
        for key in DENSE_METRICS:  # the final value: MLflow's latest metric is the last epoch's
            if key not in metrics:
                bad.append(f"{where}: the dense run logs no metric {key!r}")
            else:
                expect(where, key, row[key], metrics[key], f"final metric {key}")
        expect(where, "reused", row["reused"], str(run.data.tags.get("sdd.study_run_id") != study_id),
               "tag sdd.study_run_id is not this study's")

    chains = {**_runs_of_step(client, "prune"), **_runs_of_step(client, "distill")}
    levels: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in _rows(report_dir / "chain_levels.csv"):
        levels[row["chain_run_id"]].append(row)
    assert sorted(levels) == sorted(chains), "chain_levels.csv chains vs the sdd.step=prune|distill runs"
    history: dict[str, dict[str, dict[int, float]]] = {}
    for chain_id, chain_rows in levels.items():
        history[chain_id] = {key: _per_level(client, chain_id, key) for key in LEVEL_METRICS}
        steps = {m: sorted(h) for m, h in history[chain_id].items()}
        in_table = sorted(int(r["level"]) for r in chain_rows)
        for key, logged in steps.items():
            if logged != in_table:
                bad.append(f"chain_levels.csv chain {chain_id[:8]}: levels {in_table} in the report, MLflow "
                           f"history of {key!r} has steps {logged}" + (" (never logged)" if not logged else ""))
        for row in chain_rows:
            where, level = f"chain_levels.csv chain {chain_id[:8]} level {row['level']}", int(row["level"])
            for key in LEVEL_METRICS:
                if level in history[chain_id][key]:
                    expect(where, key, row[key], history[chain_id][key][level], f"{key} at step {level}")

    summary = _rows(report_dir / "summary.csv")
    # verdict rows (sdd, retrace per chain group; distill per distilled group) sit beside the tables' rows
    assert {r["kind"] for r in summary} - {"sdd", "retrace", "distill"} == {"dd", "chain", "registered_model"}, \
        "summary.csv row kinds"
    assert {"sdd", "retrace"} <= {r["kind"] for r in summary}, "summary.csv verdict rows"
    chain_rows = {r["chain_run_id"]: r for r in summary if r["kind"] == "chain"}
    assert sorted(chain_rows) == sorted(chains), "summary.csv chain rows vs the sdd.step=prune|distill runs"
    for chain_id, row in chain_rows.items():
        run, where = chains[chain_id], f"summary.csv chain {chain_id[:8]}"
        params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
        missing = [f"tag {k!r}" for k in CHAIN_TAGS if k not in tags] + \
            [f"param {k!r}" for k in ("dense_width", "noise", "it_threshold") if k not in params] + \
            [f"metric {k!r}" for k in ("best_level", "best_test_acc", "best_sparsity") if k not in metrics]
        if missing:
            bad.append(f"{where}: the chain run logs no " + ", ".join(missing))
            continue
        expect(where, "step", row["step"], tags["sdd.step"], "tag sdd.step")
        expect(where, "dense_run_id", row["dense_run_id"], tags["sdd.dense_run_id"], "tag sdd.dense_run_id")
        expect(where, "width", row["width"], params["dense_width"], "param dense_width")
        expect(where, "noise", row["noise"], params["noise"], "param noise")
        parent = dense.get(tags["sdd.dense_run_id"])
        expect(where, "dense_seed", row["dense_seed"], parent.data.params.get("seed") if parent else None,
               "param seed of the dense parent")
        expect(where, "tag_threshold", row["tag_threshold"], params["it_threshold"], "param it_threshold")
        expect(where, "it_level_tag", row["it_level_tag"], tags["sdd.it_level"], "tag sdd.it_level")
        for key in ("best_level", "best_test_acc", "best_sparsity"):
            expect(where, key, row[key], metrics[key], f"metric {key}")
        test, sparsity = history[chain_id]["test_acc"], history[chain_id]["sparsity"]
        if test and sparsity:
            expect(where, "levels", row["levels"], max(test), "last step of test_acc")
            expect(where, "dense_test_acc", row["dense_test_acc"], test.get(0), "test_acc at step 0")
            expect(where, "final_sparsity", row["final_sparsity"], sparsity[max(sparsity)], "last sparsity")
        # The report recomputes the phases at its own threshold (chain_levels.csv's phase column) and
        # says whether the chain's tags agree; that verdict must be about the tags the chain holds.
        phases = ",".join(r["phase"] for r in sorted(levels[chain_id], key=lambda r: int(r["level"])))
        agree = tags["sdd.phases"] == phases and tags["sdd.it_level"] == row["it_status"]  # level, none or never
        expect(where, "phases_match", row["phases_match"], str(agree),
               f"tags sdd.phases={tags['sdd.phases']!r}, sdd.it_level={tags['sdd.it_level']!r} vs recomputed "
               f"{phases!r}, IT {row['it_status']!r}; tags agree")

    # DD curve rows: seed means of the dense runs' final metrics, per family and noise level.
    groups: dict[tuple[str, float], list[Run]] = defaultdict(list)
    for run in dense.values():
        p = run.data.params
        if all(k in p for k in ("dataset", "model", "depth", "noise", "width")):  # a missing one is reported above
            groups[family_label(p["dataset"], p["model"], int(p["depth"])), float(p["noise"])].append(run)
    dd_rows = {(r["family"], float(r["noise"])): r for r in summary if r["kind"] == "dd"}
    if sorted(dd_rows) != sorted(groups):
        bad.append(f"summary.csv dd rows {sorted(dd_rows)}, MLflow's dense families x noise levels {sorted(groups)}")
    for key in sorted(dd_rows.keys() & groups.keys()):
        row, runs, where = dd_rows[key], groups[key], f"summary.csv dd {key}"
        by_width: dict[int, list[Run]] = defaultdict(list)
        for run in runs:
            by_width[int(run.data.params["width"])].append(run)
        fit = {w: sum(r.data.metrics.get("train_acc_noisy", math.nan) for r in rs) / len(rs)
               for w, rs in sorted(by_width.items())}
        it = next((w for w, f in fit.items() if f >= threshold), None)
        expect(where, "it_threshold", row["it_threshold"], threshold, "study file's start.threshold")
        expect(where, "n_widths", row["n_widths"], len(by_width), "number of widths")
        expect(where, "min_seeds", row["min_seeds"], min(map(len, by_width.values())), "fewest seeds of a width")
        expect(where, "max_seeds", row["max_seeds"], max(map(len, by_width.values())), "most seeds of a width")
        expect(where, "max_noisy_fit", row["max_noisy_fit"], max(fit.values()), "best seed-mean train_acc_noisy")
        expect(where, "it_width", row["it_width"], it, f"first width whose mean train_acc_noisy >= {threshold}")
        expect(where, "it_num_params", row["it_num_params"],
               by_width[it][0].data.metrics.get("num_params") if it is not None else None, "num_params at the IT")

    # One row per dataset x model family, with the version that holds the alias (none: register: false).
    names = {f"sdd-{r.data.params.get('dataset')}-{r.data.params.get('model')}" for r in dense.values()}
    registered = [r for r in summary if r["kind"] == "registered_model"]
    assert sorted(r["name"] for r in registered) == sorted(names), "summary.csv registered_model rows"
    for row in registered:
        try:
            best = client.get_model_version_by_alias(row["name"], "best-sparse").version
        except MlflowException:
            best = None
        expect(f"summary.csv registered {row['name']}", "version", row["version"], best, "version @best-sparse")

    if bad:  # every disagreement at once: a renamed name shows up in all the rows it blanks
        pytest.fail(f"{len(bad)} report cells disagree with the runs in MLflow:\n" + "\n".join(bad[:40]))


def test_study_threshold_follows_the_file(tmp_path):
    assert load_study(write_study(tmp_path, TINY_STUDY)).it_threshold == 0.9
    no_chains = write_study(tmp_path, TINY[:TINY.index("  prune:")], "dense.yaml")
    assert load_study(no_chains).it_threshold == PruneConfig().it_threshold
    # Without start selection, the chains' own threshold is the study's.
    named = TINY.replace("start: {select: [before, below, at, above, after], threshold: 0.9}",
                         "start: [{width: 8}]").replace("levels: 2,", "levels: 2, it_threshold: 0.8,")
    assert load_study(write_study(tmp_path, named, "named.yaml")).it_threshold == 0.8


def test_study_run_records_the_threshold(store, tmp_path):
    # `sdd analyze` reads the threshold back from the study run: the one that selected the starts.
    from sdd.sweep import lineage

    study = load_study(write_study(tmp_path, TINY_STUDY))
    run_id = lineage.open_study_run(lineage.open_store(study.experiment, create=True), study, lineage._ProjectRun())
    assert MlflowClient(store).get_run(run_id).data.tags["sdd.it_threshold"] == "0.9"


def test_default_file_and_bad_file(store, tmp_path, capsys):
    assert build_parser().parse_args(["study"]).file == sweep_run.DEFAULT_FILE
    assert sdd_main("study", str(tmp_path / "missing.yaml")) == 2
    assert "sdd: error: study file" in capsys.readouterr().err
    assert all_runs(store) == []
