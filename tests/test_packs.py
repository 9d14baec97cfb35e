"""Seed packs: K seeds trained as one batched model reproduce K separate trainings, seed for seed."""

import copy
import shutil
from dataclasses import replace

import pytest
import torch

from conftest import tiny_train
from sdd import models, tracking
from sdd.config import ModelConfig, OptimConfig
from sdd.dense import check_packable, run_train, run_train_pack
from sdd.errors import UsageError
from sdd.packs import fit_pack, pack_pays
from sdd.pruning import full_masks, magnitude_scores, prune_masks
from sdd.training import Recipe, TrainingDiverged, cross_entropy, fit

TOLERANCE = 1e-5


def _model(name: str, width: int, shape: tuple[int, ...], seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return models.build_model(name, width=width, input_shape=shape, num_classes=10)


def _data(n: int, shape: tuple[int, ...], seeds: range) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = torch.randn(n, *shape, generator=torch.Generator().manual_seed(0))
    return x, [torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(100 + s)) for s in seeds]


def _max_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.state_dict().values(), b.state_dict().values())
               if p.is_floating_point())


@pytest.mark.parametrize("name,width,shape,batch,optimizer,augment,pruned", [
    ("mlp", 16, (40,), None, "adam", False, False),  # full batch: one input batch shared by the members
    ("mlp", 16, (40,), 32, "adam", False, True),  # minibatches in each member's own order, masked
    ("cnn1d", 4, (40,), 32, "sgd", False, False),
    ("cnn5", 2, (3, 8, 8), 16, "sgd", True, True),  # BatchNorm running stats, pad-crop and flip per member
])
def test_a_pack_trains_each_seed_as_fit_trains_it_alone(name, width, shape, batch, optimizer, augment, pruned):
    seeds = range(3)
    x, ys = _data(64, shape, seeds)
    recipe = Recipe.from_optim(OptimConfig(optimizer=optimizer, lr=1e-2, momentum=0.9, weight_decay=5e-4,
                                           batch_size=batch, epochs=3), augment=augment)
    alone = [_model(name, width, shape, s) for s in seeds]
    packed = [copy.deepcopy(m) for m in alone]
    masks = [None] * 3
    if pruned:  # each seed its own global mask, from its own weights
        masks = [prune_masks(magnitude_scores(models.prunable_weights(m)), full_masks(models.prunable_weights(m)),
                             0.5, "global") for m in alone]
        masks = [{k: v.float() for k, v in mask.items()} for mask in masks]
    fill = torch.full((shape[0],), -1.0) if augment else None
    results = [fit(m, x, y, recipe, masks=mask, weights=models.prunable_weights(m) if mask else None,
                   generator=torch.Generator().manual_seed(s), pad_fill=fill)
               for s, m, y, mask in zip(seeds, alone, ys, masks)]
    steps = []
    pack_results = fit_pack(packed, x, ys, recipe, masks=masks, generators=[torch.Generator().manual_seed(s)
                                                                             for s in seeds],
                            on_steps=[steps.append, None, None], pad_fill=fill)
    for a, p, r, q, mask in zip(alone, packed, results, pack_results, masks):
        assert _max_difference(a, p) < TOLERANCE
        assert q.steps == r.steps == steps[-1] and q.epoch_losses == pytest.approx(r.epoch_losses, abs=TOLERANCE)
        for key, keep in (mask or {}).items():
            assert torch.all(p.state_dict()[key][keep == 0] == 0)
    # The members own their weights again: a pack leaves nothing shared behind.
    storages = {p.untyped_storage().data_ptr() for m in packed for p in m.parameters()}
    assert len(storages) == sum(1 for m in packed for _ in m.parameters())


def test_in_float64_a_pack_is_training_alone_up_to_rounding():
    """The float32 gaps above are summation order, not different arithmetic: in float64 they vanish."""
    torch.set_default_dtype(torch.float64)
    try:
        seeds = range(2)
        x, ys = _data(32, (3, 8, 8), seeds)
        recipe = Recipe.from_optim(OptimConfig(optimizer="sgd", lr=5e-2, momentum=0.9, batch_size=8, epochs=2),
                                   augment=True)
        alone = [_model("cnn5", 2, (3, 8, 8), s) for s in seeds]
        packed = [copy.deepcopy(m) for m in alone]
        for s, m, y in zip(seeds, alone, ys):
            fit(m, x, y, recipe, generator=torch.Generator().manual_seed(s))
        fit_pack(packed, x, ys, recipe, generators=[torch.Generator().manual_seed(s) for s in seeds])
        for a, p in zip(alone, packed):
            assert _max_difference(a, p) < 1e-12
    finally:
        torch.set_default_dtype(torch.float32)


def test_a_member_that_diverges_fails_alone_and_the_others_train_on():
    seeds = range(3)
    x, ys = _data(64, (40,), seeds)
    recipe = Recipe.from_optim(OptimConfig(optimizer="adam", lr=1e-2, batch_size=16, epochs=3))

    def blows_up(logits, y, inputs, idx):  # finite until the second epoch's first batch
        blows_up.calls += 1
        return torch.nn.functional.cross_entropy(logits, y) * (float("inf") if blows_up.calls > 4 else 1.0)
    blows_up.calls = 0
    alone = [_model("mlp", 16, (40,), s) for s in seeds]
    packed = [copy.deepcopy(m) for m in alone]
    results = [fit(m, x, y, recipe, generator=torch.Generator().manual_seed(s)) for s, m, y in zip(seeds, alone, ys)
               if s != 1]
    with pytest.raises(TrainingDiverged) as alone_error:
        fit(copy.deepcopy(packed[1]), x, ys[1], recipe, loss_fn=blows_up, generator=torch.Generator().manual_seed(1))
    blows_up.calls = 0
    epochs_seen = {m: [] for m in seeds}
    outcome = fit_pack(packed, x, ys, recipe, loss_fns=[cross_entropy, blows_up, cross_entropy],
                       generators=[torch.Generator().manual_seed(s) for s in seeds],
                       on_epochs=[lambda e, loss, m=m: epochs_seen[m].append(e) for m in seeds])
    assert isinstance(outcome[1], TrainingDiverged) and str(outcome[1]) == str(alone_error.value)
    assert epochs_seen == {0: [1, 2, 3], 1: [1], 2: [1, 2, 3]}  # the diverged member is no longer reported
    for m, result in zip((0, 2), results):
        assert _max_difference(alone[m], packed[m]) < TOLERANCE
        assert outcome[m].epoch_losses == pytest.approx(result.epoch_losses, abs=TOLERANCE)


def test_diverging_packed_runs_each_fail_with_their_own_reason(store):
    outcomes = run_train_pack([tiny_train(seed=s, epochs=3, optimizer="sgd", lr=1e12) for s in (0, 1)])
    client = tracking.get_client()
    assert all(isinstance(o, TrainingDiverged) for o in outcomes)
    assert len({o.sdd_run_id for o in outcomes}) == 2
    for outcome in outcomes:
        run = client.get_run(outcome.sdd_run_id)
        assert run.info.status == "FAILED" and run.data.tags["sdd.failure"] == "diverged"
        assert "loss became" in run.data.tags["sdd.error"]


def test_a_pack_member_continues_alone_from_its_pack_snapshot():
    seeds = range(2)
    x, ys = _data(64, (40,), seeds)
    recipe = Recipe.from_optim(OptimConfig(optimizer="adam", lr=1e-2, batch_size=16, epochs=4))
    alone = _model("mlp", 16, (40,), 0)
    packed = [_model("mlp", 16, (40,), s) for s in seeds]
    fit(alone, x, ys[0], recipe, generator=torch.Generator().manual_seed(0))
    saved = {0: [], 1: []}
    fit_pack(packed, x, ys, recipe, generators=[torch.Generator().manual_seed(s) for s in seeds],
             snapshots=[lambda state, m=m: saved[m].append(copy.deepcopy(state)) for m in seeds], snapshot_epochs=2)
    saved = [list(states) for states in zip(saved[0], saved[1])]  # per snapshot: every member's state
    assert [states[0]["epoch"] for states in saved] == [2]
    continued = _model("mlp", 16, (40,), 0)
    fit(continued, x, ys[0], recipe, generator=torch.Generator().manual_seed(123), resume=copy.deepcopy(saved[0][0]))  # the optimizer steps its state in place
    assert _max_difference(continued, alone) < TOLERANCE
    # ...and a pack continues from its members' states.
    again = [_model("mlp", 16, (40,), 7) for _ in seeds]
    fit_pack(again, x, ys, recipe, generators=[torch.Generator() for _ in seeds], resumes=saved[0])
    for a, b in zip(again, packed):
        assert _max_difference(a, b) < TOLERANCE


def test_packed_runs_are_the_runs_training_alone_makes(tmp_path, monkeypatch, empty_store):
    configs = [tiny_train(seed=s, epochs=8, batch_size=100) for s in (0, 1)]
    stores = {}
    for how in ("alone", "packed"):
        shutil.copy(empty_store, tmp_path / f"{how}.db")  # a migrated store: creating one costs seconds
        uri = f"sqlite:///{tmp_path / how}.db"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        results = [run_train(c) for c in configs] if how == "alone" else run_train_pack(configs)
        stores[how] = (tracking.get_client(uri), [r.run_id for r in results])
    (alone_client, alone_ids), (pack_client, pack_ids) = stores["alone"], stores["packed"]
    assert len(set(pack_ids)) == 2
    for alone_id, pack_id in zip(alone_ids, pack_ids):
        a, p = alone_client.get_run(alone_id), pack_client.get_run(pack_id)
        assert p.data.tags["sdd.config_hash"] == a.data.tags["sdd.config_hash"]
        assert p.data.tags["sdd.pack_size"] == "2" and p.data.tags["sdd.pack_runs"] == ",".join(pack_ids)
        assert p.data.params == a.data.params
        for key in ("test_acc", "train_acc_noisy", "val_loss", "train_loss", "learning_distance", "entropy"):
            history = {m.step: m.value for m in alone_client.get_metric_history(alone_id, key)}
            packed = {m.step: m.value for m in pack_client.get_metric_history(pack_id, key)}
            assert packed.keys() == history.keys()
            for step, value in history.items():
                assert packed[step] == pytest.approx(value, abs=TOLERANCE), (key, step)
    # The pack's runs are the config's runs: training alone reuses them.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'packed'}.db")
    assert run_train(configs[1]).reused and run_train(configs[1]).run_id == pack_ids[1]


def test_only_configs_that_differ_in_their_seed_share_a_pack():
    with pytest.raises(UsageError, match="differ only in seed; these differ in width"):
        check_packable([tiny_train(seed=0), tiny_train(seed=1, width=8)])
    with pytest.raises(UsageError, match="distinct seeds"):
        check_packable([tiny_train(seed=0), tiny_train(seed=0)])


def test_the_auto_rule_packs_only_where_the_benchmark_measured_a_gain():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    mlp, cnn5 = ModelConfig(model="mlp", width=64), ModelConfig(model="cnn5", width=8)
    full, minibatch = OptimConfig(batch_size=None), OptimConfig(batch_size=128)
    assert not pack_pays(mlp, full, 5_000, 2000, cpu)
    assert pack_pays(mlp, minibatch, 5_000, 2000, cpu)
    assert not pack_pays(cnn5, minibatch, 100_000, 2000, cpu)
    assert pack_pays(cnn5, minibatch, 100_000, 2000, cuda)
    assert not pack_pays(ModelConfig(model="resnet18", width=8), minibatch, 100_000, 2000, cuda)


def test_packed_chains_are_the_chains_pruned_alone(store):
    """Two chains (seed s pruning the dense parent of seed s) each alone, then again (forced) as one pack:
    the same level runs, masks and metrics, to 1e-5."""
    from sdd.chain import run_prune, run_prune_pack
    from sdd.config import PruneConfig

    dense = run_train_pack([tiny_train(seed=s, epochs=10, batch_size=100) for s in (0, 1)])
    cfgs = [PruneConfig(parent=d.run_id, seed=s, levels=2, epochs=4, rate=0.5, register=False)
            for s, d in zip((0, 1), dense)]
    alone_ids = [run_prune(c).run_id for c in cfgs]
    pack_ids = [r.run_id for r in run_prune_pack([replace(c, force=True) for c in cfgs])]
    assert not set(alone_ids) & set(pack_ids)
    alone_client = pack_client = tracking.get_client()

    def levels(client, chain_id):
        runs = tracking.search(client, tracking.get_run(client, chain_id).info.experiment_id,
                               tags={"sdd.step": "level"}, parent=chain_id)
        return sorted(runs, key=lambda r: int(r.data.tags["sdd.level"]))

    for alone_id, pack_id in zip(alone_ids, pack_ids):
        alone_levels, pack_levels = levels(alone_client, alone_id), levels(pack_client, pack_id)
        assert len(alone_levels) == len(pack_levels) == 2
        for a, p in zip(alone_levels, pack_levels):
            assert p.data.tags["sdd.pack_size"] == "2" and "sdd.pack_size" not in a.data.tags
            for key in ("test_acc", "val_acc", "train_acc_noisy", "sparsity", "learning_distance_level", "entropy"):
                assert p.data.metrics[key] == pytest.approx(a.data.metrics[key], abs=TOLERANCE), key
            _, alone_masks = tracking.load_sparse_artifact(alone_client, a.info.run_id, "level/weights.pt")
            _, pack_masks = tracking.load_sparse_artifact(pack_client, p.info.run_id, "level/weights.pt")
            assert all(torch.equal(alone_masks[k], pack_masks[k]) for k in alone_masks)
        for key in ("test_acc", "sparsity"):
            assert [m.value for m in pack_client.get_metric_history(pack_id, key)] == pytest.approx(
                [m.value for m in alone_client.get_metric_history(alone_id, key)], abs=TOLERANCE)
    with pytest.raises(UsageError, match="differ in levels"):
        run_prune_pack([PruneConfig(parent=pack_ids[0], seed=0, levels=2),
                        PruneConfig(parent=pack_ids[1], seed=1, levels=3)])


PACK_SCRIPT = """
import sys
from conftest import tiny_train
from sdd.dense import run_train_pack
configs = [tiny_train(seed=s, epochs=30, batch_size=64, eval_every=5, resume_every=0) for s in (0, 1)]
run_train_pack(configs, experiment=sys.argv[1])
"""


@pytest.mark.slow  # a process killed for real
def test_a_pack_killed_mid_way_continues_each_seed_from_its_own_checkpoint(store, tmp_path):
    """Killed when its first member saved epoch 20 (the other's last checkpoint is epoch 10): run again,
    each seed continues from its own checkpoint (apart: they stand at different epochs) and ends as an
    uninterrupted pack ends, to 1e-5."""
    import json
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from sdd import faults

    tests = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-c", PACK_SCRIPT]
    killed = subprocess.run([*command, "killed"], env={
        **env, faults.FAULT_VAR: "train-saved-20:1:kill", faults.DIR_VAR: str(tmp_path / "faults"),
        faults.SNAPSHOT_VAR: "10"}, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    first = json.loads((tmp_path / "faults" / "train-saved-20.json").read_text())["run_id"]
    for experiment in ("killed", "uninterrupted"):
        done = subprocess.run([*command, experiment], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    client = tracking.get_client()
    runs = {}
    for experiment in ("killed", "uninterrupted"):
        exp_id = client.get_experiment_by_name(experiment).experiment_id
        found = tracking.search(client, exp_id, tags={"sdd.step": "train"})
        assert len(found) == 2 and all(r.info.status == "FINISHED" for r in found)
        runs[experiment] = {r.data.params["seed"]: r for r in found}
    resumed = {seed: run.data.tags.get("sdd.resumed_from_epoch") for seed, run in runs["killed"].items()}
    assert resumed == {"0": "20", "1": "10"} and runs["killed"]["0"].info.run_id == first
    for seed in ("0", "1"):
        a, b = runs["killed"][seed].info.run_id, runs["uninterrupted"][seed].info.run_id
        for key in ("test_acc", "train_loss", "val_acc"):
            got = {m.step: m.value for m in client.get_metric_history(a, key)}
            want = {m.step: m.value for m in client.get_metric_history(b, key)}
            assert got.keys() == want.keys()
            assert all(got[step] == pytest.approx(want[step], abs=TOLERANCE) for step in want), (seed, key)
