"""`sdd study`: every stage of a tiny study under one study run, then the report."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from sdd import study
from sdd.cli import build_parser
from sdd.study_file import load_study
from tests.test_sweep import TINY, all_runs, by_step, ray_local, sdd_main, write_study  # noqa: F401 - fixture

TINY_STUDY = TINY + """
  distill:
    start: {select: [at], threshold: 0.9}
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
    assert f"browse the runs: mlflow ui --backend-store-uri {store}" in out
    client = MlflowClient(store)
    assert "report/report.md" in [a.path for a in client.list_artifacts(study_run.info.run_id, "report")]
    assert client.get_run(study_run.info.run_id).data.metrics["wall_time_s"] > 0


def test_study_threshold_follows_the_file(tmp_path):
    assert study.it_threshold(load_study(write_study(tmp_path, TINY_STUDY))) == 0.9
    no_chains = write_study(tmp_path, TINY[:TINY.index("  prune:")], "dense.yaml")
    assert study.it_threshold(load_study(no_chains)) == 0.99


def test_default_file_and_bad_file(store, tmp_path, capsys):
    assert build_parser().parse_args(["study"]).file == study.DEFAULT_FILE
    assert sdd_main("study", str(tmp_path / "missing.yaml")) == 2
    assert "sdd: error: study file" in capsys.readouterr().err
    assert all_runs(store) == []
