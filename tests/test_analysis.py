"""`sdd analyze` on synthetic studies written straight into a temporary MLflow store (no training).

The main study has a known IT along width (64 at 20% noise, 32 at 10%), known phases along a
pruning chain, a dense run reused from an earlier study, a distilled chain, failed trials, a chain
whose phase tag is wrong, and a registered best-sparse model. A second study is minimal (one noise
level, one seed, no IT, no chains) to check that every figure is still produced.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import time

import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from analysis.figures import FIGURES
from analysis.report import SUMMARY, VERDICTS, analyze_study
from analysis.summary import dd_peak
from sdd import tracking
from sdd.cli import ANALYZE as analysis_cli
from sdd.config import PruneConfig, TrainConfig, from_flat_dict, to_flat_dict
from sdd.errors import UsageError

WIDTHS = (8, 16, 32, 64, 128, 256)
# Mean noisy-subset train accuracy per noise and width: the IT is the first width reaching 0.99.
NOISY_FIT = {0.2: {8: 0.30, 16: 0.60, 32: 0.90, 64: 0.995, 128: 1.0, 256: 1.0},
             0.1: {8: 0.50, 16: 0.80, 32: 0.995, 64: 1.0, 128: 1.0, 256: 1.0}}
TEST_ACC = {0.2: {8: 0.55, 16: 0.62, 32: 0.60, 64: 0.52, 128: 0.60, 256: 0.66},
            0.1: {8: 0.60, 16: 0.66, 32: 0.58, 64: 0.64, 128: 0.68, 256: 0.70}}
EXPECTED_IT = {0.2: 64, 0.1: 32}

# Expected phases are written out by hand from sdd.phases' rules (IT: first level whose noisy-subset
# accuracy is below 0.99; tolerance 0.01), never computed with the code under test.
# The vanilla chains from width 64 (20% noise): noisy labels lost at level 4, dip there, peak at 6.
# Level 3 (0.66) is the first more than 0.01 below the dense 0.70; after the peak 0.73, level 7
# (0.725) is within 0.01 of it and level 8 (0.70) is not. Best val_acc (test - 0.01): level 6.
VANILLA_TEST = [0.70, 0.70, 0.695, 0.66, 0.62, 0.68, 0.73, 0.725, 0.70, 0.60, 0.50]
VANILLA_NOISY = [1.0, 1.0, 1.0, 1.0, 0.97, 0.80, 0.60, 0.50, 0.40, 0.30, 0.20]
VANILLA_ENTROPY = [0.5, 0.5, 0.49, 0.48, 0.40, 0.38, 0.36, 0.34, 0.30, 0.25, 0.20]
VANILLA_PHASES = ["dense", "light", "light", "critical", "sweet", "sweet", "sweet", "sweet", "collapsed",
                  "collapsed", "collapsed"]
# A chain from width 256 that never loses the noisy labels (no IT) and only declines. Level 3 sits
# exactly 0.01 below the dense model, still light: critical means *more* than the tolerance below.
WIDE_TEST = [0.66, 0.66, 0.655, 0.65, 0.64, 0.63, 0.62, 0.61, 0.60, 0.58, 0.55]
WIDE_PHASES = ["dense", "light", "light", "light", "critical", "critical", "critical", "critical", "critical",
               "critical", "critical"]
# It logs no best_* metrics, so the analysis picks its best level itself. Its val_acc disagrees with
# test_acc (whose best is level 1) and ties at levels 3 and 5: the best level is 5, the sparser.
WIDE_VAL = [0.65, 0.63, 0.64, 0.66, 0.64, 0.66, 0.62, 0.61, 0.60, 0.58, 0.55]
# Distillation from the same parent: the noisy labels are dropped early and the curve is monotonic.
DISTILL_TEST = [0.70, 0.705, 0.70, 0.70, 0.695, 0.69, 0.685, 0.68, 0.66, 0.62, 0.55]
DISTILL_NOISY = [1.0, 0.9, 0.7, 0.6, 0.5, 0.45, 0.4, 0.35, 0.3, 0.25, 0.2]
# IT at level 1, which is also the peak (0.705); level 4 (0.695) is exactly 0.01 below it, still sweet.
DISTILL_PHASES = ["dense", "sweet", "sweet", "sweet", "sweet", "collapsed", "collapsed", "collapsed", "collapsed",
                  "collapsed", "collapsed"]
LEVELS = 10
EPOCHS = 100
TEST_SIZE = 1000  # the main study's dense runs record it as a param; the tiny study's as a test dataset input
TINY_TEST_SIZE = 500


def _params(width: int) -> tuple[int, int]:
    """(prunable weights, other parameters) of the 1-hidden-layer MNIST-1D MLP."""
    return 40 * width + width * 10, width + 10


class Store:
    """Writes runs the way the sdd steps do, without training anything."""

    def __init__(self, client: MlflowClient, exp_id: str) -> None:
        self.client, self.exp_id = client, exp_id

    def run(self, name: str, tags: dict[str, str], parent: str | None = None, params: dict | None = None,
            metrics: dict[int, dict[str, float]] | None = None, status: str = "FINISHED") -> str:
        tags = {**tags, **({tracking.PARENT_TAG: parent} if parent else {})}
        run_id = self.client.create_run(self.exp_id, run_name=name, tags=tags).info.run_id
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for step, values in (metrics or {}).items() for k, v in values.items()]
        items = [Param(k, "" if v is None else ",".join(map(str, v)) if isinstance(v, tuple) else str(v))
                 for k, v in (params or {}).items()]
        if batch or items:
            self.client.log_batch(run_id, metrics=batch, params=items)
        self.client.set_terminated(run_id, status)
        return run_id

    def study(self, name: str) -> str:
        return self.run(name, {"sdd.step": "study", "sdd.study_file": f"sweeps/{name}.yaml"}, status="RUNNING")

    def stage(self, study: str, stage: str, trials: list[dict]) -> str:
        run_id = self.run(f"sweep {stage}", {"sdd.step": "sweep", "sdd.stage": stage, "sdd.study_run_id": study},
                          parent=study)
        self.client.log_text(run_id, json.dumps(trials), "trials.json")
        return run_id

    def dense(self, study: str, stage: str, width: int, noise: float, seed: int, noisy: float, test: float,
              test_size: int | None = TEST_SIZE) -> str:
        flat = {"width": width, "noise": noise, "seed": seed, "epochs": EPOCHS, "test_size": test_size}
        cfg = from_flat_dict(TrainConfig, flat)
        prunable, other = _params(width)
        clean = min(1.0, noisy + 0.3)
        final = {"test_acc": test, "val_acc": test + 0.01, "train_acc_noisy": noisy, "train_acc_clean": clean,
                 "train_acc": (1 - noise) * clean + noise * noisy, "num_params": prunable + other,
                 "nonzero_params": prunable + other, "sparsity": 0.0, "entropy": 0.5}
        start = {"test_acc": 0.1, "val_acc": 0.1, "train_acc": 0.1, "train_acc_noisy": 0.1,
                 "num_params": prunable + other}
        run_id = self.run(f"mnist1d-mlp-w{width}-n{noise:g}-s{seed}",
                          {"sdd.step": "train", "sdd.config_hash": f"h{width}-{noise}-{seed}",
                           "sdd.study_run_id": study},
                          parent=stage, params={**to_flat_dict(cfg), "num_params": prunable + other},
                          metrics={0: start, EPOCHS: final})
        if test_size is None:  # the dataset's default size: only the logged test split tells it
            tracking.log_datasets(self.client, run_id, "code", {}, [
                ("mnist1d-test", "test", torch.zeros(TINY_TEST_SIZE, dtype=torch.int64))])
        return run_id

    def chain(self, study: str, dense_id: str, width: int, test: list[float], noisy: list[float],
              entropy: list[float], *, phases: list[str], it_level: int | None, best_level: int | None,
              val: list[float] | None = None, distill: bool = False,
              level_runs: bool = False) -> tuple[str, dict[int, str]]:
        """A chain run with its per-level histories (and its level runs, if asked): (chain id, level ids).

        `phases` and `it_level` are its sdd.phases / sdd.it_level tags and `best_level` the best level it
        logs (None: no best_* metrics), all as given: the analysis must arrive at them on its own.
        `val` defaults to test_acc - 0.01.
        """
        prunable, other = _params(width)
        val = val or [t - 0.01 for t in test]
        history = {}
        for lv, (t, v, n, e) in enumerate(zip(test, val, noisy, entropy)):
            density = 0.8 ** lv
            history[lv] = {"test_acc": t, "val_acc": v, "train_acc_noisy": n, "train_acc": 0.9,
                           "sparsity": 1 - density, "nonzero_params": round(prunable * density) + other,
                           "entropy": e, "learning_distance": 10 + lv, "learning_distance_level": 2 + 0.1 * lv}
        history[LEVELS].update({"epochs_spent": LEVELS * EPOCHS, "epochs_full": LEVELS * EPOCHS, "levels_run": LEVELS,
                                "train_flops_spent": 1e9, "train_flops_full": 1e9})
        if best_level is not None:
            history[LEVELS].update({"best_level": best_level, "best_val_acc": val[best_level],
                                    "best_test_acc": test[best_level],
                                    "best_sparsity": history[best_level]["sparsity"]})
        step = "distill" if distill else "prune"
        chain_tags = {"sdd.step": step, "sdd.dense_run_id": dense_id, "sdd.study_run_id": study,
                      "sdd.config_hash": f"c-{dense_id}-{step}", "sdd.phases": ",".join(phases),
                      "sdd.it_level": "none" if it_level is None else str(it_level)}
        params = {**to_flat_dict(PruneConfig(parent=dense_id, levels=LEVELS)), "dense_model": "mlp",
                  "dense_width": width, "dense_depth": 1, "dataset": "mnist1d", "noise": 0.2}
        if distill:
            params.update({"teacher": f"runs:/{dense_id}/model", "alpha": 0.8, "temperature": 10.0})
            chain_tags["sdd.teacher_uri"] = f"runs:/{dense_id}/model"
        chain_id = self.run(f"{step} magnitude/lr_rewind w{width} final", chain_tags, parent=dense_id, params=params,
                            metrics=history)
        level_ids = {lv: self.run(f"level {lv}", {"sdd.step": "level", "sdd.level": str(lv),
                                                  "sdd.chain_run_id": chain_id, "sdd.dense_run_id": dense_id},
                                  parent=chain_id, metrics={lv: history[lv]})
                     for lv in range(1, LEVELS + 1)} if level_runs else {}
        return chain_id, level_ids

    def register(self, tmp, chain_id: str, dense_id: str, level: int, level_id: str, metrics: dict) -> str:
        import mlflow.pytorch

        path = tmp / "model"
        mlflow.pytorch.save_model(torch.nn.Linear(40, 10), str(path), serialization_format="pickle",
                                  pip_requirements=[])
        self.client.log_artifacts(level_id, str(path), "model")
        name = "sdd-mnist1d-mlp"
        self.client.create_registered_model(name)
        version = self.client.create_model_version(
            name, f"runs:/{level_id}/model", run_id=level_id,
            tags={"run_id": level_id, "dense_run_id": dense_id, "chain_run_id": chain_id, "level": str(level),
                  "sparsity": f"{metrics['sparsity']:.6f}", "val_acc": f"{metrics['val_acc']:.6f}",
                  "test_acc": f"{metrics['test_acc']:.6f}"})
        self.client.set_registered_model_alias(name, "best-sparse", version.version)
        return version.version


def _trial(name: str, step: str, config: dict, run_id: str | None, status: str = "FINISHED", reused: bool = False,
           error: str | None = None, attempts: int = 1) -> dict:
    return {"trial": name, "step": step, "config": config, "run_id": run_id, "status": status, "reused": reused,
            "error": error, "attempts": attempts}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("analysis")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment("sdd", artifact_location=str(tmp / "artifacts"))
    s = Store(client, exp_id)

    # An earlier study trained the 10%-noise width-8 seed-0 model; the main study reuses it.
    earlier = s.study("earlier")
    earlier_stage = s.run("sweep dense", {"sdd.step": "sweep", "sdd.stage": "dense"}, parent=earlier)
    reused_id = s.dense(earlier, earlier_stage, 8, 0.1, 0, NOISY_FIT[0.1][8], TEST_ACC[0.1][8])

    study = s.study("synthetic")
    dense_stage = s.run("sweep dense", {"sdd.step": "sweep", "sdd.stage": "dense", "sdd.study_run_id": study},
                        parent=study)
    trials, dense_ids = [], {}
    for noise, seeds in ((0.1, (0,)), (0.2, (0, 1))):  # one seed at 10% noise: no spread there
        for width in WIDTHS:
            for seed in seeds:
                offset = 0.0 if len(seeds) == 1 else (-0.005 if seed == 0 else 0.005)
                config = {"width": width, "noise": noise, "seed": seed, "epochs": EPOCHS}
                if (width, noise, seed) == (8, 0.1, 0):
                    trials.append(_trial(f"w{width}-n{noise}-s{seed}", "train", config, reused_id, reused=True))
                    dense_ids[width, noise, seed] = reused_id
                    continue
                noisy = min(1.0, NOISY_FIT[noise][width] + offset)
                run_id = s.dense(study, dense_stage, width, noise, seed, noisy, TEST_ACC[noise][width] + offset)
                dense_ids[width, noise, seed] = run_id
                trials.append(_trial(f"w{width}-n{noise}-s{seed}", "train", config, run_id))
    failed_id = s.run("mnist1d-mlp-w64-n0.3-s0", {"sdd.step": "train", "sdd.study_run_id": study,
                                                  "sdd.error": "RuntimeError: CUDA out of memory"},
                      parent=dense_stage, status="FAILED")
    trials.append(_trial("w64-n0.3-s0", "train", {"width": 64, "noise": 0.3, "seed": 0, "epochs": EPOCHS}, failed_id,
                         status="FAILED", error="Traceback ...\nRuntimeError: CUDA out of memory", attempts=2))
    trials.append(_trial("w512-n0.2-s1", "train", {"width": 512, "noise": 0.2, "seed": 1, "epochs": EPOCHS}, None,
                         status="ERROR", error="ray worker died", attempts=3))
    client.log_text(dense_stage, json.dumps(trials), "trials.json")

    vanilla0, level_ids = s.chain(study, dense_ids[64, 0.2, 0], 64, VANILLA_TEST, VANILLA_NOISY, VANILLA_ENTROPY,
                                  phases=VANILLA_PHASES, it_level=4, best_level=6, level_runs=True)
    # The same curve 0.005 higher: the same phases and best level.
    vanilla1, _ = s.chain(study, dense_ids[64, 0.2, 1], 64, [t + 0.005 for t in VANILLA_TEST], VANILLA_NOISY,
                          VANILLA_ENTROPY, phases=VANILLA_PHASES, it_level=4, best_level=6)
    # Wrong tags (an IT at level 5, all sweet) that the analysis must report, not believe.
    wide, _ = s.chain(study, dense_ids[256, 0.2, 0], 256, WIDE_TEST, [1.0] * 11, [0.5] * 11,
                      phases=["dense"] + ["sweet"] * 10, it_level=5, best_level=None, val=WIDE_VAL)
    distilled, _ = s.chain(study, dense_ids[64, 0.2, 0], 64, DISTILL_TEST, DISTILL_NOISY,
                           [0.5 - 0.01 * lv for lv in range(11)], phases=DISTILL_PHASES, it_level=1, best_level=1,
                           distill=True)
    prune_trials = [_trial("w64-s0", "prune", {"parent": "w64-n0.2-s0"}, vanilla0),
                    _trial("w64-s1", "prune", {"parent": "w64-n0.2-s1"}, vanilla1),
                    _trial("w256-s0", "prune", {"parent": "w256-n0.2-s0"}, wide),
                    _trial("w128-s0", "prune", {"parent": "w128-n0.2-s0"}, None, status="FAILED",
                           error="RuntimeError: chain died", attempts=2)]
    s.stage(study, "prune", prune_trials)
    s.stage(study, "distill", [_trial("w64-s0-kd", "distill", {"parent": "w64-n0.2-s0", "alpha": 0.8}, distilled)])
    best = {"sparsity": 1 - 0.8 ** 6, "val_acc": VANILLA_TEST[6] - 0.01, "test_acc": VANILLA_TEST[6]}
    version = s.register(tmp, vanilla0, dense_ids[64, 0.2, 0], 6, level_ids[6], best)
    client.set_terminated(study, "FINISHED")

    # A study name used twice: the newest run of that name must be the one analysed.
    dead = s.study("tiny")
    s.stage(dead, "dense", [_trial("w8-n0.2-s0", "train", {"width": 8}, None, status="FAILED", error="boom")])
    tiny = s.study("tiny")
    tiny_stage = s.run("sweep dense", {"sdd.step": "sweep", "sdd.stage": "dense", "sdd.study_run_id": tiny},
                       parent=tiny)
    tiny_trials = [_trial(f"w{w}", "train", {"width": w, "noise": 0.2, "seed": 3},
                          s.dense(tiny, tiny_stage, w, 0.2, 3, NOISY_FIT[0.2][w], TEST_ACC[0.2][w], test_size=None))
                   for w in (8, 16)]
    client.log_text(tiny_stage, json.dumps(tiny_trials), "trials.json")

    out = tmp / "report"
    report = analyze_study(client, study, out)
    return {"client": client, "uri": uri, "tmp": tmp, "study": study, "out": out, "report": report,
            "vanilla0": vanilla0, "vanilla1": vanilla1, "wide": wide, "distilled": distilled, "version": version,
            "reused": reused_id, "dense_64": dense_ids[64, 0.2, 0], "dead": dead, "tiny": tiny}


@pytest.fixture(scope="module")
def summary(world) -> pd.DataFrame:
    return pd.read_csv(world["out"] / SUMMARY)


def _chain_row(summary: pd.DataFrame, chain_id: str) -> pd.Series:
    rows = summary[(summary["kind"] == "chain") & (summary["chain_run_id"] == chain_id)]
    assert len(rows) == 1
    return rows.iloc[0]


def test_finds_the_interpolation_threshold_per_noise(summary):
    dd = summary[summary["kind"] == "dd"].set_index("noise")
    assert sorted(dd.index) == [0.1, 0.2]
    for noise, width in EXPECTED_IT.items():
        assert dd.loc[noise, "it_width"] == width
        prunable, other = _params(width)
        assert dd.loc[noise, "it_num_params"] == prunable + other
    assert dd.loc[0.2, "peak_err_width"] == 64


def test_finds_the_phases_of_the_chain(world, summary):
    row = _chain_row(summary, world["vanilla0"])
    assert row["it_level"] == 4
    bounds = {p: (row[f"{p}_first"], row[f"{p}_last"]) for p in ("light", "critical", "sweet", "collapsed")}
    assert bounds == {"light": (1, 2), "critical": (3, 3), "sweet": (4, 7), "collapsed": (8, 10)}
    assert bool(row["phases_match"])
    levels = pd.read_csv(world["out"] / "chain_levels.csv")
    phases = levels[levels["chain_run_id"] == world["vanilla0"]].sort_values("level")["phase"].tolist()
    assert phases == VANILLA_PHASES
    for key, expected, it_level in (("vanilla1", VANILLA_PHASES, 4), ("distilled", DISTILL_PHASES, 1),
                                    ("wide", WIDE_PHASES, None)):
        phases = levels[levels["chain_run_id"] == world[key]].sort_values("level")["phase"].tolist()
        assert phases == expected, key
        row = _chain_row(summary, world[key])
        assert pd.isna(row["it_level"]) if it_level is None else row["it_level"] == it_level, key
    for key in ("vanilla1", "distilled"):
        assert bool(_chain_row(summary, world[key])["phases_match"]), key
    row = _chain_row(summary, world["distilled"])
    assert (row["sweet_first"], row["sweet_last"], row["collapsed_first"], row["collapsed_last"]) == (1, 4, 5, 10)
    assert pd.isna(row["light_first"]) and pd.isna(row["critical_first"])
    row = _chain_row(summary, world["wide"])
    assert (row["light_first"], row["light_last"], row["critical_first"], row["critical_last"]) == (1, 3, 4, 10)


def test_chain_without_it_and_a_wrong_tag(world, summary):
    row = _chain_row(summary, world["wide"])
    assert pd.isna(row["it_level"]) and pd.isna(row["sweet_first"])
    assert not bool(row["phases_match"])
    report = world["report"].read_text()
    assert f"`{world['wide'][:8]}`): tag IT level 5" in report


def test_best_level_and_early_stop(world, summary):
    row = _chain_row(summary, world["vanilla0"])
    assert (row["best_level"], row["best_test_acc"]) == (6, pytest.approx(0.73))
    assert row["best_sparsity"] == pytest.approx(1 - 0.8 ** 6)
    assert row["early_stop_level"] == 4
    # Best val_acc up to the stop (levels 1-4: 0.69, 0.685, 0.65, 0.61), picked by the analysis itself.
    assert (row["early_stop_best_level"], row["early_stop_best_test_acc"]) == (1, pytest.approx(0.70))
    assert row["early_stop_epochs_saved"] == pytest.approx(0.6)
    density = [0.8 ** lv for lv in range(1, LEVELS + 1)]
    assert row["early_stop_flops_saved"] == pytest.approx(1 - sum(density[:4]) / sum(density), abs=1e-5)
    wide = _chain_row(summary, world["wide"])
    assert pd.isna(wide["early_stop_level"])
    # No logged best level: the analysis' own pick, by val_acc (not test_acc), the tie to the sparser level.
    assert (wide["best_level"], wide["best_test_acc"]) == (5, pytest.approx(WIDE_TEST[5]))
    assert wide["best_sparsity"] == pytest.approx(1 - 0.8 ** 5)


def test_every_figure_is_written_and_logged(world):
    for name in FIGURES:
        data = (world["out"] / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000, name
    logged = {a.path for a in world["client"].list_artifacts(world["study"], "report")}
    expected = {f"report/{n}" for n in [*FIGURES, "report.md", "report.html", SUMMARY, VERDICTS,
                                        "dense_runs.csv", "chain_levels.csv"]}
    assert expected <= logged


def test_report_html_is_self_contained_and_shows_every_figure(world):
    # MLflow's artifact viewer shows report.html on its own: each figure must be inside the page.
    page = world["client"].download_artifacts(world["study"], "report/report.html", str(world["out"] / "dl"))
    text = open(page, encoding="utf-8").read()
    assert text.startswith("<!DOCTYPE html>") and "<table>" in text and "<h2>Headline answers</h2>" in text
    embedded = re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(embedded) == len(FIGURES)
    for (_alt, data), name in zip(embedded, FIGURES):
        assert base64.b64decode(data) == (world["out"] / name).read_bytes(), name


def test_registered_model_is_named(world, summary):
    reg = summary[summary["kind"] == "registered_model"]
    assert len(reg) == 1
    row = reg.iloc[0]
    assert (row["name"], int(row["version"]), row["chain_run_id"], int(row["level"])) == \
        ("sdd-mnist1d-mlp", int(world["version"]), world["vanilla0"], 6)
    assert bool(row["from_study"])
    report = world["report"].read_text()
    assert "models:/sdd-mnist1d-mlp@best-sparse` = version 1" in report
    assert "**from this study**, chain w64 s0 prune magnitude/lr_rewind" in report


def test_reused_and_missing_runs(world):
    dense = pd.read_csv(world["out"] / "dense_runs.csv")
    assert len(dense) == 18
    assert dense.loc[dense["run_id"] == world["reused"], "reused"].item()
    report = world["report"].read_text()
    assert "| train (dense models) | 18 | 1 |" in report
    assert "| level (one per pruning level) | 10 |  |" in report
    missing = report.split("## What is missing")[1]
    for text in ("w64-n0.3-s0", "RuntimeError: CUDA out of memory", "w512-n0.2-s1", "ray worker died", "ERROR",
                 "w128-s0", "RuntimeError: chain died", "3 trial(s)"):
        assert text in missing, text


def test_headline_answers(world):
    report = world["report"].read_text()
    assert "**IT at width 64**" in report and "**IT at width 32**" in report
    # 2 seeds 0.01 apart, 1000 test samples: the SDD dip (0.70 -> 0.62) and recovery (-> 0.73) are many SEs
    sdd = "**w64, noise 20%**, prune magnitude/lr_rewind (2 seeds): **dip 0.080 ["
    assert sdd in report
    line = report.split(sdd)[1].split("\n")[0]
    assert "then recovery 0.110 [" in line and "p < 0.001, 2 seeds (points 0 -> 4 -> 6)" in line
    assert "0.623 at level 4 (sparsity 59%)" in line and "0.732 at level 6 (sparsity 73.8%)" in line
    assert "**w256, noise 20%**, prune magnitude/lr_rewind (1 seed): **one seed: not tested** (dip 0.005 [–, –]" \
        in report
    # the DD curve with 2 seeds is tested; with one seed (10% noise) it is not
    assert "along width: **dip 0.100 [" in report and "p < 0.001, 2 seeds (points 1 -> 3 -> 5)" in report
    assert "along width: **one seed: not tested** (dip 0.080 [–, –], recovery 0.120 [–, –], p –, 1 seed)" in report
    # the pruned w64 curve sits far above the dense models of its size (0.73 vs ~0.55 at level 6)
    assert "**w64, noise 20%**, prune magnitude/lr_rewind (2 seeds): **does not retrace: gap" in report
    # one distilled seed: nothing to pair it with
    assert ("distill magnitude/lr_rewind a0.8 T10 vs prune magnitude/lr_rewind (1 common seed): "
            "**one seed: not tested** (recovery reduction – [–, –], p –, 1 seed)") in report
    assert "would stop at **level 4**" in report
    assert "study file `sweeps/synthetic.yaml`" in report
    for name in FIGURES:
        assert f"]({name})" in report


def test_verdicts_are_logged_one_per_curve(world, summary):
    logged = world["client"].download_artifacts(world["study"], f"report/{VERDICTS}", str(world["out"] / "dlv"))
    records = json.load(open(logged, encoding="utf-8"))
    kinds = [r["kind"] for r in records]
    # one DD curve per noise level; per chain group (w64 prune, w64 distill, w256 prune) sdd + retrace;
    # one distilled group with its vanilla group
    assert sorted(kinds) == ["dd"] * 2 + ["distill"] + ["retrace"] * 3 + ["sdd"] * 3
    for r in records:
        assert r["n_test"] == TEST_SIZE
        assert {"effect", "p_value", "seeds", "verdict"} <= set(r["result"]) or \
            {"difference", "p_value", "seeds", "verdict"} <= set(r["result"]) or \
            {"recovery_ci", "p_value", "seeds", "verdict"} <= set(r["result"]), r
        assert r["verdict"] == r["result"]["verdict"]
    dd = {r["noise"]: r for r in records if r["kind"] == "dd"}
    assert dd[0.1]["result"]["verdict"] == "one seed: not tested" and dd[0.1]["result"]["seeds"] == 1
    assert dd[0.2]["result"]["significant"] and dd[0.2]["result"]["seeds"] == 2
    assert dd[0.2]["widths"] == list(WIDTHS) and dd[0.2]["result"]["dip_index"] == WIDTHS.index(64)
    sdd = {(r["width"], r["step"]): r for r in records if r["kind"] == "sdd"}
    vanilla = sdd[64, "prune"]
    assert sorted(vanilla["chain_run_ids"]) == sorted([world["vanilla0"], world["vanilla1"]])
    assert vanilla["dense_seeds"] == [0, 1] and vanilla["result"]["significant"]
    assert (vanilla["result"]["dip_index"], vanilla["result"]["recovery_index"]) == (4, 6)
    assert vanilla["result"]["p_value"] < 0.001
    for key in ((256, "prune"), (64, "distill")):
        assert sdd[key]["result"]["verdict"] == "one seed: not tested", key
        assert not sdd[key]["result"]["significant"] and sdd[key]["result"]["p_value"] is None, key
    retrace = {(r["width"], r["step"]): r["result"] for r in records if r["kind"] == "retrace"}
    assert retrace[64, "prune"]["departs"] and not retrace[64, "prune"]["retraces"]
    distill = next(r for r in records if r["kind"] == "distill")
    assert distill["chain_run_ids"] == [world["distilled"]] and distill["vanilla_chain_run_ids"] == [world["vanilla0"]]
    assert distill["result"]["verdict"] == "one seed: not tested"
    # summary.csv carries the same verdicts with effect, CI, p-value and seeds
    rows = summary[summary["kind"].isin(["dd", "sdd", "retrace", "distill"])]
    assert len(rows) == len(records)
    for column in ("effect", "ci_low", "ci_high", "p_value", "seeds", "verdict"):
        assert column in rows.columns
    row = rows[(rows["kind"] == "sdd") & (rows["width"] == 64) & (rows["setting"] == "prune magnitude/lr_rewind")]
    assert len(row) == 1 and bool(row["claim"].iloc[0]) and row["seeds"].iloc[0] == 2
    assert row["effect"].iloc[0] == pytest.approx(0.11) and row["ci_low"].iloc[0] < 0.11 < row["ci_high"].iloc[0]


def test_minimal_study_still_draws_everything(world, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", world["uri"])
    monkeypatch.chdir(tmp_path)
    parser = argparse.ArgumentParser()
    analysis_cli.configure_parser(parser)
    assert analysis_cli.command(parser.parse_args(["--study", "tiny"])) == 0
    report = tmp_path / "reports" / f"tiny-{world['tiny'][:8]}" / "report.md"
    assert capsys.readouterr().out.strip() == str(report)
    for name in FIGURES:
        assert (report.parent / name).stat().st_size > 5_000, name
    text = report.read_text()
    (dd,) = json.loads((report.parent / VERDICTS).read_text())
    # n_test from the logged test split (no test_size param); two widths are too few for a dip and recovery
    assert (dd["kind"], dd["n_test"], dd["result"]["verdict"]) == \
        ("dd", TINY_TEST_SIZE, "2 points: no dip and recovery to test")
    assert "**no IT in the sweep**" in text
    assert "No finished pruning chains" in text and "No distillation chains in this study." in text
    assert "Nothing: every trial of the study gave a finished run." in text


@pytest.mark.parametrize("ref, message", [("no-such-study", "no study run"), ("0" * 32, "no study run"),
                                          ("dense", "is not a study run"), ("dead", "no finished")])
def test_bad_input_raises_usage_error(world, tmp_path, ref, message):
    ref = {"dense": world["dense_64"], "dead": world["dead"]}.get(ref, ref)
    with pytest.raises(UsageError, match=message):
        analyze_study(world["client"], ref, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_threshold_raises_usage_error(world, tmp_path):
    with pytest.raises(UsageError, match="it-threshold"):
        analyze_study(world["client"], world["study"], tmp_path, it_threshold=1.5)


def test_curve_shapes():
    assert dd_peak([0.45, 0.38, 0.40, 0.48, 0.40, 0.34]) == 3  # rises most above the best smaller model
    assert dd_peak([0.5, 0.4, 0.3]) is None  # error only falls with width
