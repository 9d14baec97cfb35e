"""`sdd bench`: every figure is produced at a tiny size (speeds are never asserted: design.md), and the
command's output modes."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace

import pytest
import torch

from sdd.bench import context, loops, measure, packs, runs, suite
from sdd.bench.report import Figure, Report
from sdd.cli import BENCH as bench
from sdd.errors import UsageError


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.configure_parser(parser)
    return parser.parse_args(list(argv))


@pytest.mark.slow
def test_tiny_bench_produces_every_figure(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "out" / "bench.json"
    out.parent.mkdir()

    assert bench.command(_args("--tiny", "--json", str(out))) == 0

    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    size = context.SIZES["tiny"]
    figures = report["figures"]
    by_item = {i: [f for f in figures if f["item"] == i] for i in range(1, 8)}
    image_models = len(size.image_models)
    assert len(by_item[1]) == 2 + image_models  # MLP full batch, minibatch, each image model
    assert len(by_item[2]) == 2 * 3  # project and baseline masking: both MLP cases and one image model
    assert len(by_item[3]) == 2  # logging + evaluation share, log_metric vs log_batch
    # short trials vs a sequential loop, the grid vs N plain processes: each with Ray up, and including its start
    assert len(by_item[4]) == 4
    grid = [f for f in by_item[4] if "plain processes" in f["measure"]]
    assert len(grid) == 2 and "test accuracy difference" in grid[0]["note"]
    assert len(by_item[5]) == len(size.artifact_models) * len(runs.ARTIFACT_SPARSITIES)
    assert len(by_item[7]) == 5 + 1  # MLP full batch, minibatch, cnn1d w16, w64, cnn5; the auto rule's record
    for f in figures:
        share = f["name"] == packs.AGREEMENT  # a share of cases: 0 where the auto rule chose the slower side in all
        for key in ("ratio", "a", "b"):
            assert math.isfinite(f[key]) and (f[key] >= 0 if share else f[key] > 0), f
        assert f["name"] in table and f["measure"] in table
    assert {f["target"] for f in figures} >= {">= 1.0", ">= 1.5", "<= 1.10", "<= 0.10", ">= 1.7", ">= 0.9", "<= 0.05",
                                                 ">= 1"}
    if torch.cuda.is_available():
        assert by_item[6]
    else:
        assert [s["item"] for s in report["skipped"]] == [6, 7]
        assert "item 6 skipped" in table and "item 7 skipped" in table
    # Every store, Ray Tune folder and checkpoint lived in a temporary folder, not in the working directory.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.slow
def test_cuda_section_runs_on_the_cpu_too(tmp_path):
    """Item 6 and item 7's 16-seed packs are measured on CUDA machines only; their code runs here (item 6
    with bf16 autocast on the CPU)."""
    size = replace(context.SIZES["tiny"], image_models=context.SIZES["tiny"].image_models[:1])
    ctx = context.make_context(size, torch.device("cpu"), 0, tmp_path)
    figures = loops.precision_and_layout(ctx)
    assert len(figures) == 3
    packed = packs.cuda_seed_packs(ctx)
    assert len(packed) == 2 and all(f.target == ">= 10" and f.name.endswith("16 seeds") for f in packed)
    for f in figures + packed:
        assert f.item in (6, 7) and math.isfinite(f.ratio) and f.ratio > 0 and f.a > 0 and f.b > 0


@pytest.mark.parametrize("auto,ratio,agrees,says", [
    (True, 1.8, True, "auto packs it"),  # a gain taken
    (True, 0.9, False, "the pack is NOT 1.2x faster (0.90x): auto picks no real gain"),
    (False, 0.8, True, "the pack is not 1.2x faster (0.80x)"),  # a loss avoided
    (False, 1.3, False, "the pack would have been 1.30x faster"),  # a gain left
    (True, 1.1, False, "the pack is NOT 1.2x faster (1.10x)"),  # within the noise: no gain worth a pack
    (False, 1.1, True, "the pack is not 1.2x faster (1.10x)"),
])
def test_item_7_says_whether_the_auto_rule_chose_the_faster_side(auto, ratio, agrees, says):
    agreed, note = packs.verdict(auto, ratio)
    assert agreed is agrees and says in note


def _report() -> Report:
    report = Report("tiny", "cpu", {"torch": "x", "cpus": 2, "threads": 2, "load_average_start": 1.0,
                                    "load_average_end": 1.0})
    report.figures.append(Figure(5, "a model", "bytes: save_sparse / save_state dense", 0.04, 4.0, 100.0,
                                 "bytes", target="<= 0.05"))
    report.skipped.append({"item": 6, "reason": "no CUDA device"})
    return report


def test_json_flag_alone_prints_only_json(monkeypatch, capsys):
    monkeypatch.setattr(suite, "run", lambda size, workers, threads: _report())
    assert bench.command(_args("--quick", "--json")) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["figures"][0]["met"] is True and data["skipped"][0]["item"] == 6


def test_json_path_writes_file_and_prints_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(suite, "run", lambda size, workers, threads: _report())
    path = tmp_path / "b.json"
    assert bench.command(_args("--json", str(path))) == 0
    table = capsys.readouterr().out
    assert "a model" in table and "yes" in table and "> 1 means the project is better" in table
    assert json.loads(path.read_text())["size"] == "tiny"


def test_sizes_are_chosen_by_flag(monkeypatch, capsys):
    chosen = []
    monkeypatch.setattr(suite, "run",
                        lambda size, workers, threads: chosen.append((size, workers, threads)) or _report())
    for argv in ([], ["--quick", "--threads", "2"], ["--tiny", "--loader-workers", "2"]):
        bench.command(_args(*argv))
    assert chosen == [("full", 0, 1), ("quick", 0, 2), ("tiny", 2, 1)]


@pytest.mark.parametrize("option", ["--loader-workers", "--threads"])
def test_out_of_range_counts_are_bad_input(option):
    with pytest.raises(UsageError, match=option):
        bench.command(_args(option, "-1"))


def test_plain_grid_script_trains_the_tools_models(tmp_path):
    """The plain side of the grid figure builds the models the sweep trains (same shapes, same initial weights
    from the seed) and trains them with full-batch Adam on the shared arrays."""
    import json

    from sdd import models
    from sdd.bench import baseline

    torch.manual_seed(3)
    tool = models.build_model("mlp", width=12, depth=2, input_shape=(40,), num_classes=10)
    torch.manual_seed(3)
    plain = baseline.mlp(40, 12, 2, 10)
    assert [p.shape for p in plain.parameters()] == [p.shape for p in tool.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), tool.parameters()))

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 40, generator=g), torch.randint(0, 10, (64,), generator=g)
    torch.save({"x_train": x, "x_test": x, "y_test": y, "y_train_seed1": y}, tmp_path / "data.pt")
    job = {"data": str(tmp_path / "data.pt"), "trials": [[16, 1]], "epochs": 150, "lr": 0.01, "depth": 2,
           "classes": 10, "out": str(tmp_path / "out.json")}
    (tmp_path / "job.json").write_text(json.dumps(job))
    with measure.torch_threads(torch.get_num_threads()):  # the script sets one thread, as its process would
        baseline.train_grid_share(str(tmp_path / "job.json"))
    (result,) = json.loads((tmp_path / "out.json").read_text())
    assert (result["width"], result["seed"]) == (16, 1)
    assert result["test_acc"] > 0.9  # 64 random points memorised: the loop really trains
    assert result["train_time_s"] > 0


def test_level_file_parts_account_for_every_byte(tmp_path):
    """Item 5's note: the bytes of a 99%-sparse MLP w96 level file, part by part (what limits a miss)."""
    from torch import nn

    from sdd import checkpoints, pruning

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 96), nn.ReLU(), nn.Linear(96, 10))
    weights = {"0.weight": model[0].weight, "2.weight": model[2].weight}
    masks = pruning.prune_masks(pruning.magnitude_scores(weights), pruning.full_masks(weights), 0.99, "global")
    pruning.apply_masks(weights, masks)
    path = tmp_path / "level.pt"
    checkpoints.save_sparse(model.state_dict(), masks, path)
    parts = runs.level_file_parts(path, model.state_dict(), masks)
    kept = sum(int(m.sum()) for m in masks.values())
    assert parts["whole tensors (biases, normalisation)"] == (96 + 10) * 4
    assert parts["kept weights + index"] == kept * (4 + 2)  # float32 values, uint16 positions (layers < 65,536)
    assert parts["names, dtypes, shapes"] > 0 and parts["torch's header"] > 0 and parts["tag + CRC"] > 0
    assert parts["saved by deflate"] < 0
    assert sum(parts.values()) == path.stat().st_size
