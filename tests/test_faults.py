"""The test-only fault points: parsed strictly, counted across processes, acting exactly once."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import torch

from sdd import faults
from sdd.config import OptimConfig
from sdd.training import Recipe, fit

REACH = "from sdd import faults; faults.reach('train-saved-5', 'run1'); print('passed')"


def test_rules_are_parsed_strictly():
    assert faults.rules("train-saved-5:1, level-2-done:3:pause") == {"train-saved-5": (1, "kill"),
                                                                    "level-2-done": (3, "pause")}
    for bad in ("train-saved-5", "level-2-done:0", "level-2-done:x", "stage-dense-done:1:explode"):
        with pytest.raises(ValueError, match="POINT:COUNT"):
            faults.rules(bad)


def test_unset_fault_points_do_nothing(monkeypatch):
    monkeypatch.delenv(faults.FAULT_VAR, raising=False)
    faults.reach("train-saved-5")
    monkeypatch.setenv(faults.FAULT_VAR, "level-1-done:1")
    faults.reach("train-saved-5")  # another point: not counted, not acted on


def test_the_count_runs_across_processes_and_the_rule_fires_once(tmp_path):
    env = {faults.FAULT_VAR: "train-saved-5:2:kill", faults.DIR_VAR: str(tmp_path)}
    outcomes = [subprocess.run([sys.executable, "-c", REACH], env=env, capture_output=True, text=True)
                for _ in range(3)]
    # The second process is the second arrival: it is killed; the first and the third pass.
    assert [o.returncode for o in outcomes] == [0, -signal.SIGKILL, 0]
    assert [o.stdout.strip() for o in outcomes] == ["passed", "", "passed"]
    record = json.loads((tmp_path / "train-saved-5.json").read_text())
    assert record["point"] == "train-saved-5" and record["action"] == "kill" and record["run_id"] == "run1"


def test_a_paused_process_waits_and_gives_up_without_finishing(tmp_path):
    env = {faults.FAULT_VAR: "train-saved-5:1:pause", faults.DIR_VAR: str(tmp_path), faults.PAUSE_VAR: "0.5"}
    outcome = subprocess.run([sys.executable, "-c", REACH], env=env, capture_output=True, text=True, timeout=60)
    assert outcome.returncode == 99 and outcome.stdout == ""
    assert json.loads((tmp_path / "train-saved-5.json").read_text())["action"] == "pause"


def test_snapshots_forced_by_epoch_count():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    seen: list[int] = []
    fit(model, x, y, Recipe.from_optim(OptimConfig(epochs=10)), snapshot=lambda s: seen.append(s["epoch"]),
        snapshot_epochs=3)
    assert seen == [3, 6, 9]
