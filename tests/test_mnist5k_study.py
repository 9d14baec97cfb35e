"""The shipped `mnist5k_lenet` study, shrunk, end to end on the real MNIST digits: `sdd study` on Ray."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from tests.test_sweep import SWEEPS, all_runs, by_step, ray_local, sdd_main  # noqa: F401 - ray_local is a fixture


def tiny_mnist5k_lenet(tmp_path: Path) -> Path:
    """The preset's recipe (dataset, model, init, optimiser, pruning options) at a small width, one seed,
    a few epochs and two levels, on 600 of the digits (each Ray trial costs ~10 s of start-up alone)."""
    study = yaml.safe_load((SWEEPS / "mnist5k_lenet.yaml").read_text())
    study["name"] = "tiny_mnist5k"
    dense, prune = study["stages"]["dense"], study["stages"]["prune"]
    dense["recipe"].update(width=30, epochs=6, eval_every=3, train_size=600, val_size=100, test_size=300,
                           device="cpu")
    dense["grid"] = {"seed": [0]}
    prune["start"] = [{"width": 30}]
    prune["recipe"].update(levels=2, epochs=3, register=False, device="cpu")
    path = tmp_path / "tiny_mnist5k.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


@pytest.mark.slow
def test_tiny_mnist5k_lenet_study_end_to_end(ray_local, store, tmp_path):  # noqa: F811 - the fixture
    assert sdd_main("study", str(tiny_mnist5k_lenet(tmp_path)), "--storage-path", str(tmp_path / "ray")) == 0
    runs = all_runs(store)
    dense, chains, levels = by_step(runs, "train"), by_step(runs, "prune"), by_step(runs, "level")
    assert len(dense) == 1 and len(chains) == 1 and len(levels) == 2
    for run in dense:
        params, metrics = run.data.params, run.data.metrics
        assert (params["dataset"], params["model"], params["width"], params["init"]) == ("mnist5k", "lenet", "30",
                                                                                         "open_lth")
        # LeNet-30-10 on real digits: far above chance (0.1) after 6 epochs with 20% noisy labels (0.57 seen)
        assert metrics["test_acc"] > 0.4
        assert metrics["num_params"] == 784 * 30 + 30 + 30 * 10 + 10 + 10 * 10 + 10
    client = MlflowClient(store)
    for chain in chains:
        curve = client.get_metric_history(chain.info.run_id, "sparsity")
        assert [m.step for m in curve] == [0, 1, 2]
        # 20% of the hidden layers' weights per level; the output layer's 100 weights stay (keep_output_dense)
        hidden = 784 * 30 + 30 * 10
        assert curve[-1].value == pytest.approx(1 - (round(round(hidden * 0.8) * 0.8) + 100) / (hidden + 100),
                                                abs=2e-4)
        assert chain.data.params["keep_output_dense"] == "true" and chain.data.params["retrain"] == "lr_rewind"
