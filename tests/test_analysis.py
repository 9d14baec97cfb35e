"""`sdd analyze` on synthetic studies written straight into a temporary MLflow store (no training).

The main study has a known IT along width (64 at 20% noise, 32 at 10%), known phases along a
pruning chain, a dense run reused from an earlier study, a distilled chain, failed trials, a chain
whose phase tag is wrong, and a registered best-sparse model. A second study is minimal (one noise
level, one seed, no IT, no chains) to check that every figure is still produced.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import re
import time

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from analysis import figures
from analysis.figures import FIGURES
from analysis.report import SUMMARY, VERDICTS, analyze_study
from analysis.runs import load_study, resolve_study
from analysis.stats import seed_band
from analysis.summary import analyse, dd_peak
from analysis.verdicts import bad_start_verdicts
from sdd import tracking
from sdd.cli import ANALYZE as analysis_cli
from sdd.config import PruneConfig, TrainConfig, from_flat_dict, to_flat_dict
from sdd.errors import UsageError

WIDTHS = (8, 16, 32, 64, 128, 256)
# Mean noisy-subset train accuracy per noise and width: the IT is the first width reaching 0.95.
NOISY_FIT = {0.2: {8: 0.30, 16: 0.60, 32: 0.90, 64: 0.995, 128: 1.0, 256: 1.0},
             0.1: {8: 0.50, 16: 0.80, 32: 0.995, 64: 1.0, 128: 1.0, 256: 1.0}}
TEST_ACC = {0.2: {8: 0.55, 16: 0.62, 32: 0.60, 64: 0.52, 128: 0.60, 256: 0.66},
            0.1: {8: 0.60, 16: 0.66, 32: 0.58, 64: 0.64, 128: 0.68, 256: 0.70}}
EXPECTED_IT = {0.2: 64, 0.1: 32}

# Expected phases are written out by hand from sdd.phases' rules (IT: first level whose noisy-subset
# accuracy is below 0.95, for a dense parent at or above it; sweet from the first level from the IT on
# that rises more than 0.01 above the running minimum; tolerance 0.01), never computed with the code under test.
# The vanilla chains from width 64 (20% noise): noisy labels lost at level 4, the dip's bottom (critical),
# rise at 5, peak at 6. Level 3 (0.66) is the first more than 0.01 below the dense 0.70; after the peak
# 0.73, level 7 (0.725) is within 0.01 of it and level 8 (0.70) is not. Best val_acc (test - 0.01): level 6.
VANILLA_TEST = [0.70, 0.70, 0.695, 0.66, 0.62, 0.68, 0.73, 0.725, 0.70, 0.60, 0.50]
VANILLA_NOISY = [1.0, 1.0, 1.0, 1.0, 0.90, 0.80, 0.60, 0.50, 0.40, 0.30, 0.20]
VANILLA_ENTROPY = [0.5, 0.5, 0.49, 0.48, 0.40, 0.38, 0.36, 0.34, 0.30, 0.25, 0.20]
VANILLA_PHASES = ["dense", "light", "light", "critical", "critical", "sweet", "sweet", "sweet", "collapsed",
                  "collapsed", "collapsed"]
# Seed 0's level 4 (the dip) did not converge; seed 1's levels all did. Level 0 is the dense parent's
# record (its run's sdd.converged tag), which the chain does not log.
VANILLA0_CONVERGED = [None, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
# A chain from width 256 that never loses the noisy labels (no IT) and only declines. Level 3 sits
# exactly 0.01 below the dense model, still light: critical means *more* than the tolerance below.
WIDE_TEST = [0.66, 0.66, 0.655, 0.65, 0.64, 0.63, 0.62, 0.61, 0.60, 0.58, 0.55]
WIDE_PHASES = ["dense", "light", "light", "light", "critical", "critical", "critical", "critical", "critical",
               "critical", "critical"]
# It logs no best_* metrics, so the analysis picks its best level itself. Its val_acc disagrees with
# test_acc (whose best is level 1) and ties at levels 3 and 5: the best level is 5, the sparser.
WIDE_VAL = [0.65, 0.63, 0.64, 0.66, 0.64, 0.66, 0.62, 0.61, 0.60, 0.58, 0.55]
# Distillation from the same parent: the noisy labels are dropped early and the curve is monotonic.
DISTILL_TEST = [0.70, 0.705, 0.70, 0.70, 0.695, 0.692, 0.685, 0.68, 0.66, 0.62, 0.55]
DISTILL_NOISY = [1.0, 0.9, 0.7, 0.6, 0.5, 0.45, 0.4, 0.35, 0.3, 0.25, 0.2]
# IT at level 1; no level rises more than 0.01 above the running minimum, so nothing is sweet: light while
# within 0.01 of the dense 0.70 (levels 1-5), collapsed from level 6 (0.685): both fall.
DISTILL_PHASES = ["dense", "light", "light", "light", "light", "light", "collapsed", "collapsed", "collapsed",
                  "collapsed", "collapsed"]
# A chain from width 32, whose dense parent fits only 89.5% of its noisy labels (< 0.95): it never
# interpolated, so it has no IT (the old rule put one at level 1), and no sweet or collapsed phase.
NARROW_TEST = [0.60, 0.60, 0.58, 0.57, 0.55, 0.54, 0.52, 0.50, 0.48, 0.45, 0.40]
NARROW_NOISY = [0.895, 0.85, 0.80, 0.70, 0.60, 0.50, 0.40, 0.35, 0.30, 0.25, 0.20]
NARROW_PHASES = ["dense", "light"] + ["critical"] * 9
# The "strict" study: IT width 16 at its threshold 0.9, 32 at 0.95; its chain's IT level 3 at 0.9, 2 at 0.95.
STRICT_FIT = {8: 0.50, 16: 0.92, 32: 1.0}
STRICT_CURVES = ((1, "symmetric"), (2, "symmetric"), (1, "random"))
STRICT_CHAIN_NOISY = [1.0, 0.97, 0.93, 0.85, 0.70, 0.60, 0.50, 0.40, 0.30, 0.20, 0.10]
LEVELS = 10
EPOCHS = 100
TEST_SIZE = 1000  # the main study's dense runs record it as a param; the tiny study's as a test dataset input
TINY_TEST_SIZE = 500


def read_table(path) -> pd.DataFrame:
    """An analysis CSV with its run-id columns read as text. pandas 2.3.3's number parser segfaults on a
    token that starts with digits, 'e' and 13 or more digits (pandas-dev/pandas#63089), which a random hex
    run id sometimes is: parsed as numbers, ids would crash a test now and then."""
    columns = pd.read_csv(path, nrows=0).columns
    return pd.read_csv(path, dtype={c: str for c in columns if c.endswith("_id")})


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
              test_size: int | None = TEST_SIZE, *, converged: bool | None = None, drop: tuple[str, ...] = (),
              **options) -> str:
        """A dense run; `options` are more config values, `drop` params it lacks (as an older or
        hand-made run might), `converged` its sdd.converged tag (None: none)."""
        flat = {"width": width, "noise": noise, "seed": seed, "epochs": EPOCHS, "test_size": test_size, **options}
        cfg = from_flat_dict(TrainConfig, flat)
        prunable, other = _params(width)
        clean = min(1.0, noisy + 0.3)
        final = {"test_acc": test, "val_acc": test + 0.01, "train_acc_noisy": noisy, "train_acc_clean": clean,
                 "train_acc": (1 - noise) * clean + noise * noisy, "num_params": prunable + other,
                 "nonzero_params": prunable + other, "sparsity": 0.0, "entropy": 0.5}
        start = {"test_acc": 0.1, "val_acc": 0.1, "train_acc": 0.1, "train_acc_noisy": 0.1,
                 "num_params": prunable + other}
        params = {k: v for k, v in {**to_flat_dict(cfg), "num_params": prunable + other}.items() if k not in drop}
        tags = {"sdd.step": "train", "sdd.config_hash": f"h{width}-{noise}-{seed}-{sorted(options.items())}",
                "sdd.study_run_id": study, **({} if converged is None else {"sdd.converged": str(converged).lower()})}
        run_id = self.run(f"mnist1d-mlp-w{width}-n{noise:g}-s{seed}", tags, parent=stage, params=params,
                          metrics={0: start, EPOCHS: final})
        if test_size is None:  # the dataset's default size: only the logged test split tells it
            tracking.log_datasets(self.client, run_id, "code", {}, [
                ("mnist1d-test", "test", torch.zeros(TINY_TEST_SIZE, dtype=torch.int64))])
        return run_id

    def chain(self, study: str, dense_id: str, width: int, test: list[float], noisy: list[float],
              entropy: list[float], *, phases: list[str], it_level: int | None, best_level: int | None,
              val: list[float] | None = None, distill: bool = False, level_runs: bool = False,
              converged: list[float] | None = None, role: str | None = None) -> tuple[str, dict[int, str]]:
        """A chain run with its per-level histories (and its level runs, if asked): (chain id, level ids).

        `phases` and `it_level` are its sdd.phases / sdd.it_level tags and `best_level` the best level it
        logs (None: no best_* metrics), all as given: the analysis must arrive at them on its own.
        `val` defaults to test_acc - 0.01; `converged` is its per-level metric (None: not logged, as before
        levels recorded it); `role` its sdd.start_role tag (None: none, as for a start named by hand).
        """
        prunable, other = _params(width)
        val = val or [t - 0.01 for t in test]
        history = {}
        for lv, (t, v, n, e) in enumerate(zip(test, val, noisy, entropy)):
            density = 0.8 ** lv
            history[lv] = {"test_acc": t, "val_acc": v, "train_acc_noisy": n, "train_acc": 0.9,
                           "sparsity": 1 - density, "nonzero_params": round(prunable * density) + other,
                           "entropy": e, "learning_distance": 10 + lv, "learning_distance_level": 2 + 0.1 * lv,
                           **({"converged": converged[lv]} if converged and converged[lv] is not None else {})}
        history[LEVELS].update({"epochs_spent": LEVELS * EPOCHS, "epochs_full": LEVELS * EPOCHS, "levels_run": LEVELS,
                                "train_flops_spent": 1e9, "train_flops_full": 1e9})
        if best_level is not None:
            history[LEVELS].update({"best_level": best_level, "best_val_acc": val[best_level],
                                    "best_test_acc": test[best_level],
                                    "best_sparsity": history[best_level]["sparsity"]})
        step = "distill" if distill else "prune"
        chain_tags = {"sdd.step": step, "sdd.dense_run_id": dense_id, "sdd.study_run_id": study,
                      "sdd.config_hash": f"c-{dense_id}-{step}", "sdd.phases": ",".join(phases),
                      "sdd.it_level": "none" if it_level is None else str(it_level),
                      **({"sdd.start_role": role} if role else {})}
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
                # 20% noise records convergence (all but w64 seed 1 converged); 10% predates the record
                converged = None if noise == 0.1 else (width, seed) != (64, 1)
                run_id = s.dense(study, dense_stage, width, noise, seed, noisy, TEST_ACC[noise][width] + offset,
                                 converged=converged)
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
                                  phases=VANILLA_PHASES, it_level=4, best_level=6, level_runs=True,
                                  converged=VANILLA0_CONVERGED, role="at")
    # The same curve 0.005 higher: the same phases and best level.
    vanilla1, _ = s.chain(study, dense_ids[64, 0.2, 1], 64, [t + 0.005 for t in VANILLA_TEST], VANILLA_NOISY,
                          VANILLA_ENTROPY, phases=VANILLA_PHASES, it_level=4, best_level=6,
                          converged=[None] + [1.0] * 10, role="at")
    # Wrong tags (an IT at level 5, all sweet) that the analysis must report, not believe. It is the control
    # start after the IT (w256 = 4 x 64) for seed 0 only: the bad-start question has one common seed.
    wide, _ = s.chain(study, dense_ids[256, 0.2, 0], 256, WIDE_TEST, [1.0] * 11, [0.5] * 11,
                      phases=["dense"] + ["sweet"] * 10, it_level=5, best_level=None, val=WIDE_VAL, role="after")
    distilled, _ = s.chain(study, dense_ids[64, 0.2, 0], 64, DISTILL_TEST, DISTILL_NOISY,
                           [0.5 - 0.01 * lv for lv in range(11)], phases=DISTILL_PHASES, it_level=1, best_level=1,
                           distill=True)
    # tagged as the old rule had it: an IT at level 1 for a parent that never interpolated; the IT's
    # neighbour below it, not a control
    narrow, _ = s.chain(study, dense_ids[32, 0.2, 0], 32, NARROW_TEST, NARROW_NOISY, [0.5] * 11,
                        phases=["dense", "light", "critical"] + ["sweet"] * 8, it_level=1, best_level=1, role="below")
    prune_trials = [_trial("w64-s0", "prune", {"parent": "w64-n0.2-s0"}, vanilla0),
                    _trial("w32-s0", "prune", {"parent": "w32-n0.2-s0"}, narrow),
                    _trial("w64-s1", "prune", {"parent": "w64-n0.2-s1"}, vanilla1),
                    _trial("w256-s0", "prune", {"parent": "w256-n0.2-s0"}, wide),
                    _trial("w128-s0", "prune", {"parent": "w128-n0.2-s0"}, None, status="FAILED",
                           error="RuntimeError: chain died", attempts=2)]
    # The study selected its starts at 0.9; it is analysed at an explicit 0.95 (see test_an_explicit_threshold_...)
    client.set_tag(s.stage(study, "prune", prune_trials), "sdd.it_threshold", "0.9")
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

    # Threshold 0.9, recorded by its prune stage's start selection; three DD curves (depth 1 and 2, and at
    # depth 1 a second noise kind); one dense run lacks its width param.
    strict = s.study("strict")
    strict_stage = s.run("sweep dense", {"sdd.step": "sweep", "sdd.stage": "dense", "sdd.study_run_id": strict},
                         parent=strict)
    strict_trials, strict_parent = [], None
    for depth, kind in STRICT_CURVES:
        for width, fit in STRICT_FIT.items():
            for seed in (0, 1):
                run_id = s.dense(strict, strict_stage, width, 0.2, seed, fit, 0.60 + 0.01 * depth + 0.002 * seed,
                                 depth=depth, noise_kind=kind)
                strict_trials.append(_trial(f"d{depth}-{kind}-w{width}-s{seed}", "train", {"width": width}, run_id))
                if (depth, kind, width, seed) == (1, "symmetric", 32, 0):
                    strict_parent = run_id
    widthless = s.dense(strict, strict_stage, 64, 0.2, 0, 1.0, 0.6, drop=("width",))
    # and a depth with no width recorded at all: no DD curve (it would have its "IT" at a missing width)
    lone = s.dense(strict, strict_stage, 64, 0.2, 0, 1.0, 0.6, drop=("width",), depth=3)
    strict_trials += [_trial("no-width", "train", {}, widthless), _trial("no-width-d3", "train", {}, lone)]
    client.log_text(strict_stage, json.dumps(strict_trials), "trials.json")
    strict_chain, _ = s.chain(strict, strict_parent, 32, [0.62 - 0.01 * lv for lv in range(11)], STRICT_CHAIN_NOISY,
                              [0.5] * 11, phases=["dense"], it_level=3, best_level=1)
    prune_stage = s.stage(strict, "prune", [_trial("w32-s0", "prune", {}, strict_chain)])
    client.set_tag(prune_stage, "sdd.it_threshold", "0.9")

    out = tmp / "report"
    report = analyze_study(client, study, out, it_threshold=0.95)
    return {"client": client, "uri": uri, "tmp": tmp, "study": study, "out": out, "report": report,
            "vanilla0": vanilla0, "vanilla1": vanilla1, "wide": wide, "narrow": narrow, "distilled": distilled,
            "version": version,
            "reused": reused_id, "dense_64": dense_ids[64, 0.2, 0], "dead": dead, "tiny": tiny, "strict": strict,
            "strict_chain": strict_chain, "widthless": widthless}


@pytest.fixture(scope="module")
def summary(world) -> pd.DataFrame:
    return read_table(world["out"] / SUMMARY)


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
    assert bounds == {"light": (1, 2), "critical": (3, 4), "sweet": (5, 7), "collapsed": (8, 10)}
    assert bool(row["phases_match"])
    levels = read_table(world["out"] / "chain_levels.csv")
    phases = levels[levels["chain_run_id"] == world["vanilla0"]].sort_values("level")["phase"].tolist()
    assert phases == VANILLA_PHASES
    for key, expected, it_level in (("vanilla1", VANILLA_PHASES, 4), ("distilled", DISTILL_PHASES, 1),
                                    ("wide", WIDE_PHASES, None), ("narrow", NARROW_PHASES, None)):
        phases = levels[levels["chain_run_id"] == world[key]].sort_values("level")["phase"].tolist()
        assert phases == expected, key
        row = _chain_row(summary, world[key])
        assert pd.isna(row["it_level"]) if it_level is None else row["it_level"] == it_level, key
    for key in ("vanilla1", "distilled"):
        assert bool(_chain_row(summary, world[key])["phases_match"]), key
    row = _chain_row(summary, world["distilled"])
    # a monotone decline after the IT: no sweet phase
    assert (row["light_first"], row["light_last"], row["collapsed_first"], row["collapsed_last"]) == (1, 5, 6, 10)
    assert pd.isna(row["sweet_first"]) and pd.isna(row["critical_first"])
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
    # The entropy leaves its plateau at level 4 (0.40, 20% below dense); from there the best val_acc is
    # tracked (0.61, 0.67, 0.72, 0.715) and level 8 (0.69) is more than 0.02 below the best 0.72.
    assert row["early_stop_level"] == 8
    # Best val_acc up to the stop, picked by the analysis itself: level 6.
    assert (row["early_stop_best_level"], row["early_stop_best_test_acc"]) == (6, pytest.approx(0.73))
    assert row["early_stop_epochs_saved"] == pytest.approx(0.2)
    density = [0.8 ** lv for lv in range(1, LEVELS + 1)]
    assert row["early_stop_flops_saved"] == pytest.approx(1 - sum(density[:8]) / sum(density), abs=1e-5)
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
    dense = read_table(world["out"] / "dense_runs.csv")
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
    assert "would stop at **level 8**" in report
    assert "study file `sweeps/synthetic.yaml`" in report
    for name in FIGURES:
        assert f"]({name})" in report


def test_verdicts_are_logged_one_per_curve(world, summary):
    logged = world["client"].download_artifacts(world["study"], f"report/{VERDICTS}", str(world["out"] / "dlv"))
    records = json.load(open(logged, encoding="utf-8"))
    kinds = [r["kind"] for r in records]
    # one DD curve per noise level; per chain group (w64 prune, w64 distill, w256 prune, w32 prune) sdd + retrace;
    # one distilled group with its vanilla group; one IT start with a control (bad_start)
    assert sorted(kinds) == ["bad_start"] + ["dd"] * 2 + ["distill"] + ["retrace"] * 4 + ["sdd"] * 4
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
    rows = summary[summary["kind"].isin(["dd", "sdd", "retrace", "distill", "bad_start"])]
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


def test_no_it_when_the_dense_parent_never_interpolated(world, summary):
    # The w32 parent fits 89.5% of its noisy labels (< 0.95): its chain has no IT, whatever it loses later.
    row = _chain_row(summary, world["narrow"])
    assert row["it_status"] == "never interpolated" and pd.isna(row["it_level"])
    assert row["dense_noisy_fit"] == pytest.approx(0.895)
    assert pd.isna(row["sweet_first"]) and pd.isna(row["collapsed_first"])
    assert not bool(row["phases_match"])  # its tag (IT level 1) followed the old rule
    report = world["report"].read_text()
    assert f"`{world['narrow'][:8]}`): tag IT level 1" in report and "recomputed IT level never interpolated" in report
    vanilla = _chain_row(summary, world["vanilla0"])
    assert vanilla["it_status"] == "4"


def test_verdicts_say_which_unconverged_points_they_rest_on(world, summary):
    report = world["report"].read_text()
    # the 20% DD verdict rests on widths 16, 64 and 256; w64 seed 1 did not converge
    assert "p < 0.001, 2 seeds (points 1 -> 3 -> 5)**; **rests on 1 unconverged width (64)**" in report
    # 10% noise predates the record
    assert "along width: **one seed: not tested** (dip 0.080 [–, –], recovery 0.120 [–, –], p –, 1 seed); " \
        "convergence not recorded" in report
    # the SDD claim rests on levels 0 -> 4 -> 6: level 0 holds the unconverged w64 seed-1 parent, level 4 seed 0's dip
    sdd = report.split("**w64, noise 20%**, prune magnitude/lr_rewind (2 seeds): **dip 0.080 [")[1].split("\n")[0]
    assert "**rests on 2 unconverged levels (0, 4)**" in sdd
    rows = summary[(summary["kind"] == "sdd") & (summary["width"] == 64) & (summary["step"] == "prune")]
    assert rows["unconverged_levels"].iloc[0] == 2
    wide = summary[(summary["kind"] == "sdd") & (summary["width"] == 256)].iloc[0]
    # only the dense parent recorded it: nothing unconverged, ten levels unknown
    assert wide["unconverged_levels"] == 0 and "convergence not recorded at 10 levels" in wide["convergence"]
    records = json.loads((world["out"] / VERDICTS).read_text())
    dd = next(r for r in records if r["kind"] == "dd" and r["noise"] == 0.1)
    assert dd["unconverged_levels"] is None and dd["convergence"] == "convergence not recorded"
    chain = _chain_row(summary, world["vanilla0"])
    assert (chain["unconverged_levels"], chain["convergence_recorded_levels"]) == (1, 10)
    assert pd.isna(_chain_row(summary, world["wide"])["unconverged_levels"])
    assert "| 1 of 10 |" in report and "| not recorded |" in report


@pytest.fixture(scope="module")
def strict(world):
    """The strict study analysed at its own threshold (not passed): (summary, report text, folder)."""
    folder = world["tmp"] / "strict"
    report = analyze_study(world["client"], world["strict"], folder)
    return read_table(folder / SUMMARY), report.read_text(), folder


def test_the_study_threshold_is_used_without_passing_it(world, strict):
    summary, report, _ = strict
    dd = summary[summary["kind"] == "dd"]
    assert set(dd["it_width"]) == {16} and set(dd["it_threshold"]) == {0.9}  # 32 at 0.95
    assert _chain_row(summary, world["strict_chain"])["it_level"] == 3  # 2 at 0.95
    assert "crosses 0.9 (the study's start selection" in report


def test_an_explicit_threshold_overrides_the_studys(world, summary):
    # The main study recorded 0.9 (its prune stage's start selection) and was analysed at an explicit 0.95.
    client = world["client"]
    assert load_study(client, resolve_study(client, world["study"])).recorded_threshold()[0] == 0.9
    assert "crosses 0.95 (given with --it-threshold" in world["report"].read_text()
    dd = summary[summary["kind"] == "dd"].set_index("noise")
    assert dd.loc[0.2, "it_threshold"] == 0.95
    # at 0.9 the vanilla chain's IT would be level 5: its noisy-subset fit is 0.90 at level 4
    assert _chain_row(summary, world["vanilla0"])["it_level"] == 4


def test_dense_runs_pool_only_over_seeds(strict):
    # Depth 2 and the random noise kind are curves of their own; the seeds of each are pooled.
    summary, report, folder = strict
    dd = summary[summary["kind"] == "dd"]
    assert sorted(dd["family"]) == ["mnist1d mlp d2 noise_kind=symmetric", "mnist1d mlp noise_kind=random",
                                    "mnist1d mlp noise_kind=symmetric"]
    assert set(dd["n_widths"]) == {3} and set(dd["min_seeds"]) == {2} and set(dd["max_seeds"]) == {2}
    records = json.loads((folder / VERDICTS).read_text())
    assert sorted(r["family"] for r in records if r["kind"] == "dd") == sorted(dd["family"])


def test_a_dense_run_without_width_is_left_out_of_the_curve(world, strict):
    summary, report, folder = strict
    dense = read_table(folder / "dense_runs.csv")
    assert pd.isna(dense.loc[dense["run_id"] == world["widthless"], "width"]).all()
    assert (folder / "dd_curve.png").stat().st_size > 10_000
    assert "**IT at width 16**" in report
    dd = summary[summary["kind"] == "dd"]
    assert len(dd) == 3 and set(dd["n_widths"]) == {3}  # neither a "nan" width nor a curve of its own


def test_the_bad_start_verdict_is_reported(world, summary):
    # IT start w64 (seeds 0 and 1) against the control after it, w256 (seed 0 only): one common seed; the w32
    # chain is the IT's neighbour below, no control, and the distilled chain has no control of its own.
    records = json.loads((world["out"] / VERDICTS).read_text())
    (start,) = [r for r in records if r["kind"] == "bad_start"]
    assert (start["width"], start["control_starts"], start["dense_seeds"]) == (64, "after w256", [0])
    assert start["it_chain_run_ids"] == [world["vanilla0"]]
    assert start["control_chain_run_ids"] == {"after": [world["wide"]]}
    assert start["result"]["verdict"] == "one seed: not tested" and start["result"]["seeds"] == 1
    # best by val_acc: 0.73 at level 6 from the IT parent, 0.63 at level 5 from w256
    assert start["result"]["effect"] == pytest.approx(0.10) and start["result"]["p_value"] is None
    assert start["convergence"] == "rests on no unconverged best level; convergence not recorded at 1 best level"
    (row,) = summary[summary["kind"] == "bad_start"].to_dict("records")
    assert (row["setting"], row["seeds"], row["verdict"], row["dense_seeds"]) == \
        ("prune magnitude/lr_rewind", 1, "one seed: not tested", "0")
    report = world["report"].read_text()
    assert "### 3. Is the interpolation threshold a bad place to start pruning?" in report
    assert ("prune magnitude/lr_rewind: IT start w64 vs after w256 (1 common seed): **one seed: not tested** "
            "(best test accuracy, IT - controls 0.100 [–, –], p –, 1 seed)") in report


def _start_tables(best: dict[tuple[str, int], list[float]], *, setting: str = "prune magnitude/lr_rewind",
                  unconverged: tuple[str, int] | None = None) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Hand-built chains, levels and dense tables (the columns analysis.runs and summary give them): one
    chain per (start role, width) and seed with the given best test accuracy at its best level 5;
    `unconverged`: the (role, seed) whose best level did not converge."""
    chains, levels, dense = [], [], []
    for (role, width), accs in best.items():
        for seed, acc in enumerate(accs):
            if acc is None:
                continue
            dense_id, chain_id = f"d{width}s{seed}", f"{role}{width}s{seed}{setting}"
            dense.append({"run_id": dense_id, "test_size": 10_000})
            chains.append({"chain_run_id": chain_id, "dense_run_id": dense_id, "family": "mnist1d mlp", "noise": 0.2,
                           "start_epoch": None, "step": setting.split(" ")[0], "setting": setting, "scope": "global",
                           "rate": 0.2, "variant": "", "start_role": role, "width": width, "dense_seed": seed,
                           "best_level": 5, "best_test_acc": acc})
            levels.append({"chain_run_id": chain_id, "level": 5,
                           "converged": 0.0 if unconverged == (role, seed) else 1.0})
    return pd.DataFrame(chains), pd.DataFrame(levels), pd.DataFrame(dense).drop_duplicates("run_id")


def test_the_it_is_a_bad_start_only_when_clearly_worse_than_the_controls():
    # Three seeds, 10,000 test samples (binomial SE 0.005): the IT parent's best pruned accuracy is ~0.05
    # below both controls in every seed. Seed 3 has no control chain and the neighbour "below" is no control:
    # neither enters. A second setting has IT chains only: no verdict.
    chains, levels, dense = _start_tables({("at", 64): [0.60, 0.61, 0.60, 0.70], ("before", 16): [0.66, 0.655, 0.665],
                                           ("after", 256): [0.65, 0.66, 0.645], ("below", 32): [0.80, 0.80, 0.80]},
                                          unconverged=("after", 1))
    only_it = _start_tables({("at", 64): [0.6, 0.6, 0.6]}, setting="prune random/lr_rewind")
    rows, found = bad_start_verdicts(pd.concat([chains, only_it[0]]), pd.concat([levels, only_it[1]]), dense)
    (verdict,) = found
    assert verdict.kind == "bad_start" and verdict.key["dense_seeds"] == [0, 1, 2]
    assert verdict.key["control_starts"] == "before w16, after w256" and verdict.n_test == 10_000
    r = verdict.result
    # per seed: IT - mean(controls) = -0.055, -0.0475, -0.055
    assert r.bad_start and r.effect == pytest.approx(-0.0525) and r.p_value < 0.05 and r.ci[1] < 0
    assert r.verdict.startswith("the IT is a bad start: best pruned accuracy 0.053 [") and "3 seeds" in r.verdict
    assert verdict.convergence == "rests on 1 unconverged best level (after w256)" and verdict.unconverged == 1
    (row,) = rows.to_dict("records")
    assert bool(row["bad_start_claim"]) and row["n_seeds"] == 3 and row["bad_start_p_value"] == r.p_value

    # the same study with the IT parent as good as the controls: not significant
    chains, levels, dense = _start_tables({("at", 64): [0.650, 0.655, 0.648], ("before", 16): [0.652, 0.650, 0.651],
                                           ("after", 256): [0.649, 0.653, 0.650]})
    _, (verdict,) = bad_start_verdicts(chains, levels, dense)
    assert not verdict.result.bad_start and verdict.result.p_value > 0.2
    assert verdict.result.verdict.startswith("not significant: best pruned accuracy IT - controls 0.000 [")
    assert verdict.columns()["verdict"] == verdict.result.verdict and verdict.convergence == \
        "rests on no unconverged best level"


def test_the_distillation_figure_draws_seed_bands_per_start(world, tmp_path, monkeypatch):
    client = world["client"]
    a = analyse(client, load_study(client, resolve_study(client, world["study"])), 0.95)
    # a second distilled seed (the seed-0 chain 0.01 higher, from dense seed 1) pairs with both vanilla seeds
    (verdict,) = [v for v in a.verdicts if v.kind == "distill"]
    twin = a.levels[a.levels["chain_run_id"] == world["distilled"]].assign(chain_run_id="twin")
    twin["test_acc"] += 0.01
    chain = a.chains[a.chains["chain_run_id"] == world["distilled"]].assign(chain_run_id="twin", dense_seed=1)
    key = {**verdict.key, "chain_run_ids": [world["distilled"], "twin"],
           "vanilla_chain_run_ids": [world["vanilla0"], world["vanilla1"]]}
    a = dataclasses.replace(a, levels=pd.concat([a.levels, twin]), chains=pd.concat([a.chains, chain]),
                            verdicts=[dataclasses.replace(verdict, key=key)])
    drawn = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: drawn.append(fig) or path)
    figures.distill_figure(a, tmp_path / "distill.png")
    (fig,) = drawn
    test_axis = fig.axes[0]  # one start: one column, test accuracy above the noisy-subset fit
    assert len(fig.axes) == 2
    labels = [line.get_label() for line in test_axis.get_lines()]
    assert labels == ["vanilla: prune magnitude/lr_rewind (2 seeds)",
                      "distilled: distill magnitude/lr_rewind a0.8 T10 (2 seeds)"]
    # the dense parents' band (density 1): the 95% CI of the two seeds' mean over 1,000 test samples
    assert len(test_axis.collections) == 2
    for band, seeds in zip(test_axis.collections, ([VANILLA_TEST[0], VANILLA_TEST[0] + 0.005],
                                                   [DISTILL_TEST[0], DISTILL_TEST[0] + 0.01])):
        xy = band.get_paths()[0].vertices
        at_dense = xy[np.isclose(xy[:, 0], 1.0), 1]
        _, low, high = seed_band([[s] for s in seeds], TEST_SIZE)
        assert (at_dense.min(), at_dense.max()) == (pytest.approx(low[0]), pytest.approx(high[0]))


def test_run_ids_that_look_like_huge_numbers_are_read_as_text(tmp_path):
    # A hex run id of this shape segfaults pandas 2.3.3's number parser when read as a number.
    (tmp_path / "runs.csv").write_text("run_id,test_acc\n4e492493924924ab0123456789abcdef,0.5\n")
    table = read_table(tmp_path / "runs.csv")
    assert table["run_id"].item() == "4e492493924924ab0123456789abcdef" and table["test_acc"].item() == 0.5
