"""The `prune` step: chains of level runs under a dense parent, in a real sqlite MLflow store."""

import csv
import json
import signal

import mlflow
import pytest
import torch

from conftest import enter_store, run_cli, shared_store, tiny_train
from sdd import faults, models, pruning, retraining, tracking
from sdd.checkpoints import load_sparse, load_state
from sdd.chain import run_prune
from sdd.cli import main
from sdd.config import DENSE_SEED_LIMIT, PruneConfig, to_flat_dict
from sdd.dense import run_train
from sdd.errors import UsageError
from sdd.measures import predict
from sdd.problem import build_model, load_problem
from sdd.sweep.lineage import Store
from sdd.sweep.plan import Trial, finished_run
from sdd.training import Recipe, fit


@pytest.fixture(scope="module")
def parent(tmp_path_factory, empty_store):
    """A store holding one tiny dense run with a saved epoch and a rewind step."""
    with shared_store(tmp_path_factory.mktemp("prune"), empty_store) as world:
        cfg = tiny_train(width=32, epochs=60, save_epochs=(20,), rewind_step=3)
        yield {**world, "run_id": run_train(cfg).run_id, "cfg": cfg}


@pytest.fixture(scope="module")
def scheduled_parent(parent):
    """A dense run in the same store whose lr drops 10x at epoch 30 of 60: under this schedule finetune (the
    parent's final lr, held) and lr_rewind (the parent's schedule again) retrain differently."""
    cfg = tiny_train(width=32, epochs=60, schedule="multistep", milestones=(30,), gamma=0.1)
    return {"run_id": run_train(cfg).run_id, "cfg": cfg}


@pytest.fixture
def env(parent, monkeypatch):
    return enter_store(monkeypatch, parent)


def _levels(client, chain_id):
    runs = tracking.search(client, tracking.get_run(client, chain_id).info.experiment_id,
                           tags={"sdd.step": "level"}, parent=chain_id)
    return sorted(runs, key=lambda r: int(r.data.tags["sdd.level"]))


def test_chain_lineage_measures_and_phases(env, tmp_path):
    # The tiny parent fits 70-80% of its noisy labels, so a threshold there puts the IT inside the chain
    # (it depends on the curve) rather than at level 1 whatever the curve.
    cfg = PruneConfig(parent=env["run_id"], levels=3, epochs=10, it_threshold=0.75, register=False)
    result = run_prune(cfg)
    client = tracking.get_client()
    chain = client.get_run(result.run_id)
    tags = chain.data.tags
    assert chain.info.status == "FINISHED"
    assert tags["sdd.step"] == "prune" and tags["mlflow.parentRunId"] == env["run_id"]
    assert tags["sdd.dense_run_id"] == env["run_id"] and "sdd.config_hash" in tags
    assert len(tags["sdd.phases"].split(",")) == 4 and tags["sdd.phases"].startswith("dense,")
    assert "sdd.it_level" in tags
    levels = _levels(client, result.run_id)
    assert [r.data.tags["sdd.level"] for r in levels] == ["1", "2", "3"]
    for level, run in enumerate(levels, start=1):
        assert run.data.tags["mlflow.parentRunId"] == result.run_id
        assert run.data.tags["sdd.dense_run_id"] == env["run_id"]
        # sparsity is counted from the weights: 20% of the remaining weights per level
        assert run.data.metrics["sparsity"] == pytest.approx(1 - 0.8 ** level, abs=2e-3)
        for key in ("pruned_test_acc", "train_acc_noisy", "train_acc_clean", "val_acc", "entropy",
                    "learning_distance", "learning_distance_level", "nonzero_params"):
            assert key in run.data.metrics
        assert any(k.startswith("sparsity/") for k in run.data.metrics)
    steps = sorted(m.step for m in client.get_metric_history(result.run_id, "test_acc"))
    assert steps == [0, 1, 2, 3]
    # A level artifact holds that level's weights and mask, and the mask matches the zeros.
    state, masks = load_sparse(client.download_artifacts(levels[-1].info.run_id, "level/weights.pt", str(tmp_path)))
    for name, mask in masks.items():
        assert torch.all(state[name][~mask] == 0)
    phases = client.download_artifacts(result.run_id, "phases.csv", str(tmp_path))
    assert open(phases).read().count("\n") == 5
    # Every row of phases.csv is the chain's logged point of that level (step = level).
    curves = {key: {m.step: m.value for m in client.get_metric_history(result.run_id, key)}
              for key in ("sparsity", "nonzero_params", "test_acc", "val_acc", "train_acc_noisy", "entropy")}
    with open(phases, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(row["level"]) for row in rows] == [0, 1, 2, 3]
    for row in rows:
        for key, curve in curves.items():
            assert float(row[key]) == curve[int(row["level"])], (row["level"], key)
    # The phases follow from those curves by the rule of sdd.phases.sdd_phases, restated here (tolerance 0.01).
    test, noisy = curves["test_acc"], curves["train_acc_noisy"]
    n = len(test)
    interpolated = noisy[0] >= cfg.it_threshold  # else the chain has no IT: "never interpolated"
    it = next((lv for lv in range(1, n) if noisy[lv] < cfg.it_threshold), None) if interpolated else None
    # sweet starts at the first level from the IT on that rises above the running minimum of test_acc
    sweet = next((lv for lv in range(it, n) if test[lv] > min(test[j] for j in range(lv + 1)) + 0.01), None) \
        if it is not None else None
    expected = ["dense"]
    for lv in range(1, n):
        fell = any(test[j] < test[0] - 0.01 for j in range(1, lv + 1))
        if sweet is None or lv < sweet:  # no rise yet: light until the test acc falls below dense
            expected.append("collapsed" if fell and it is not None and sweet is None and lv >= it
                            else "critical" if fell else "light")
        else:  # from the rise: sweet up to the best test acc after it, collapsed once it falls below that
            peak = max(range(sweet, n), key=lambda j: (test[j], -j))
            dropped = any(test[j] < test[peak] - 0.01 for j in range(peak + 1, lv + 1))
            expected.append("collapsed" if dropped else "sweet")
    assert [row["phase"] for row in rows] == expected
    assert tags["sdd.phases"] == ",".join(expected)
    assert tags["sdd.it_level"] == (str(it) if it is not None else "none" if interpolated else "never interpolated")
    assert tags["sdd.it_threshold"] == f"{cfg.it_threshold:g}"
    assert result.metrics["it_level"] == (it if it is not None else -1)
    for name in ("light", "critical", "sweet", "collapsed"):
        at = [lv for lv, phase in enumerate(expected) if phase == name]
        assert tags.get(f"sdd.phase.{name}") == (f"{at[0]}-{at[-1]}" if at else None), name
    again = run_prune(cfg)
    assert again.reused and again.run_id == result.run_id


@pytest.mark.parametrize("mode", ["finetune", "lr_rewind", "weight_rewind", "reinit"])
def test_retrain_mode_starts_from_the_weights_it_claims(env, tmp_path, mode):
    # A vanishing lr leaves the weights where retraining started, so the level's saved weights show it.
    extra = {"rewind_step": 3} if mode == "weight_rewind" else {}
    result = run_prune(PruneConfig(parent=env["run_id"], levels=1, epochs=1, lr=1e-12, retrain=mode,
                                   register=False, **extra))
    client = tracking.get_client()
    (level,) = _levels(client, result.run_id)
    state, masks = load_sparse(client.download_artifacts(level.info.run_id, "level/weights.pt", str(tmp_path)))
    final = load_state(client.download_artifacts(env["run_id"], "checkpoints/final.pt", str(tmp_path)))
    init = load_state(client.download_artifacts(env["run_id"], "checkpoints/init.pt", str(tmp_path)))
    step3 = load_state(client.download_artifacts(env["run_id"], "checkpoints/step_3.pt", str(tmp_path)))
    expected = {"finetune": final, "lr_rewind": final, "weight_rewind": step3}.get(mode)
    for name, mask in masks.items():
        w = state[name]
        if expected is not None:
            assert torch.allclose(w, expected[name] * mask, atol=1e-6), name
        else:  # reinit: a fresh draw, neither the original init nor the trained weights
            assert not torch.allclose(w, init[name] * mask, atol=1e-3)
            assert not torch.allclose(w, final[name] * mask, atol=1e-3)
            assert torch.all(w[~mask] == 0)


@pytest.mark.parametrize("schedule", ["constant", "multistep"])
def test_finetune_and_lr_rewind_retrain_at_the_lr_they_claim(env, scheduled_parent, tmp_path, schedule):
    # Finetune holds a tenth of the parent's final lr (He et al.): constant parent 1e-3, multistep parent 1e-4 (1e-2
    # after its x0.1 drop, /10); lr_rewind runs the parent's schedule again, stretched to the 10 retraining epochs
    # (1e-2; multistep: x0.1 from epoch 5). Under a constant schedule the two modes differ by the lr alone.
    parent = scheduled_parent if schedule == "multistep" else env
    cfg = parent["cfg"]
    final_lr = cfg.optim.lr * (cfg.optim.gamma if schedule == "multistep" else 1.0)
    recipes = {"finetune": Recipe(cfg.optim, epochs=10, lr=final_lr / 10, schedule="constant"),
               "lr_rewind": Recipe(cfg.optim, epochs=10, lr=cfg.optim.lr, schedule=schedule)}
    client = tracking.get_client()
    final = load_state(client.download_artifacts(parent["run_id"], "checkpoints/final.pt", str(tmp_path)))
    problem = load_problem(cfg.data, torch.device("cpu"), run_seed=cfg.optim.seed)
    for mode in recipes:
        result = run_prune(PruneConfig(parent=parent["run_id"], levels=1, epochs=10, retrain=mode, register=False))
        (level,) = _levels(client, result.run_id)
        state, masks = load_sparse(client.download_artifacts(level.info.run_id, "level/weights.pt",
                                                             str(tmp_path / mode)))
        # The level retrained by hand from the parent's final weights times the level's mask, once per
        # recipe; full batch without augmentation draws nothing random, so CPU training repeats bit for bit.
        by_hand = {}
        for name, recipe in recipes.items():
            model = build_model(cfg.model, problem, cfg.optim.seed)
            model.load_state_dict(final)
            weights = models.prunable_weights(model)
            float_masks = pruning.as_float_masks(masks, weights)
            pruning.apply_masks(weights, float_masks)
            fit(model, problem.splits.x_train, problem.splits.y_train, recipe, masks=float_masks, weights=weights)
            by_hand[name] = model.state_dict()
        assert all(torch.equal(state[k], by_hand[mode][k]) for k in state), f"{mode} did not retrain as claimed"
        other = next(name for name in recipes if name != mode)
        assert not all(torch.equal(state[k], by_hand[other][k]) for k in state), f"{mode} retrained as {other}"


def test_start_epoch_and_layerwise_gradient_criterion(env, tmp_path):
    result = run_prune(PruneConfig(parent=env["run_id"], start_epoch=20, levels=2, epochs=5, scope="layerwise",
                                   criterion="gradient", keep_output_dense=True, register=False))
    client = tracking.get_client()
    last = _levels(client, result.run_id)[-1]
    assert last.data.metrics["sparsity/fc.weight"] == 0.0
    assert last.data.metrics["sparsity/linear1.weight"] == pytest.approx(0.36, abs=1e-3)
    # The chain's level 0 measures the weights it starts from: the parent's epoch-20 checkpoint, not its final one.
    problem = load_problem(env["cfg"].data, torch.device("cpu"), run_seed=env["cfg"].optim.seed)

    def test_loss_of(checkpoint: str) -> float:
        model = build_model(env["cfg"].model, problem, env["cfg"].optim.seed)
        model.load_state_dict(load_state(client.download_artifacts(env["run_id"], checkpoint, str(tmp_path))))
        return torch.nn.functional.cross_entropy(predict(model, problem.splits.x_test), problem.splits.y_test).item()

    (start,) = [m.value for m in client.get_metric_history(result.run_id, "test_loss") if m.step == 0]
    assert start == pytest.approx(test_loss_of("checkpoints/epoch_20.pt"), abs=1e-6)
    assert start != pytest.approx(test_loss_of("checkpoints/final.pt"), abs=1e-3)


def test_registry_alias_round_trip(env):
    result = run_prune(PruneConfig(parent=env["run_id"], levels=3, epochs=10, criterion="random", seed=3))
    client = tracking.get_client()
    version = client.get_model_version_by_alias("sdd-mnist1d-mlp", "best-sparse")
    assert version.tags["dense_run_id"] == env["run_id"]
    model = mlflow.pytorch.load_model("models:/sdd-mnist1d-mlp@best-sparse")
    weights = models.prunable_weights(model)
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    total = sum(w.numel() for w in weights.values())
    assert zeros / total == pytest.approx(float(version.tags["sparsity"]), abs=1e-6)
    problem = load_problem(env["cfg"].data, torch.device("cpu"), run_seed=env["cfg"].optim.seed)
    acc = (predict(model, problem.splits.x_test).argmax(1) == problem.splits.y_test).float().mean().item()
    assert acc == pytest.approx(float(version.tags["test_acc"]), abs=1e-6)
    assert result.metrics["best_test_acc"] == pytest.approx(float(version.tags["test_acc"]))


@pytest.mark.slow
def test_kill_inside_a_level_is_continued_in_that_level_run(env, tmp_path):
    # The process SIGKILLs itself inside level 2, right after that level's resume checkpoint at epoch
    # 150 (an event, not a moment raced for): the run again continues the chain and that level's
    # own run from the checkpoint.
    opts = ["--levels", "2", "--epochs", "300", "--eval-every", "50", "--resume-every", "0", "--register", "false",
            "--seed", "7"]
    fault_env = {faults.FAULT_VAR: "level-2-saved-150:1:kill", faults.DIR_VAR: str(tmp_path),
                 faults.SNAPSHOT_VAR: "150"}
    proc = run_cli("prune", "--parent", env["run_id"], *opts, cwd=env["folder"], env=fault_env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    killed = json.loads((tmp_path / "level-2-saved-150.json").read_text())
    client = tracking.get_client()
    interrupted = client.get_run(killed["run_id"])
    assert interrupted.info.status == "RUNNING" and interrupted.data.tags["sdd.level"] == "2"
    chain_id = interrupted.data.tags["sdd.chain_run_id"]
    assert client.get_run(chain_id).info.status == "RUNNING"  # left behind by the kill
    assert main(["prune", "--parent", env["run_id"], *opts]) == 0
    chain = client.get_run(chain_id)
    assert chain.info.status == "FINISHED"
    levels = _levels(client, chain_id)
    assert [r.data.tags["sdd.level"] for r in levels] == ["1", "2"]
    assert all(r.info.status == "FINISHED" for r in levels)
    again = next(r for r in levels if r.info.run_id == interrupted.info.run_id)  # the same run, continued
    assert again.data.tags["sdd.restarts"] == "1" and "sdd.error" not in again.data.tags
    assert again.data.tags["sdd.resumed_from_epoch"] == "150"  # from its checkpoint, not from the start
    assert all(tracking.list_artifacts(client, r.info.run_id, "level") == ["level/weights.pt"] for r in levels)
    for run in levels:  # every evaluation of every level once: none lost, none twice
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_acc")) == \
            list(range(50, 301, 50))
    assert sorted(m.step for m in client.get_metric_history(chain_id, "test_acc")) == [0, 1, 2]
    # The continued chain equals an uninterrupted one with the same seeds, bit for bit on CPU.
    fresh = run_prune(PruneConfig(parent=env["run_id"], levels=2, epochs=300, eval_every=50, register=False,
                                  seed=7, force=True))
    for a, b in zip(levels, _levels(client, fresh.run_id)):
        for key in ("test_acc", "train_loss", "val_acc", "learning_distance"):
            assert sorted((m.step, m.value) for m in client.get_metric_history(a.info.run_id, key)) == \
                sorted((m.step, m.value) for m in client.get_metric_history(b.info.run_id, key)), key
    for key in ("test_acc", "sparsity", "entropy"):
        assert sorted((m.step, m.value) for m in client.get_metric_history(chain_id, key)) == \
            sorted((m.step, m.value) for m in client.get_metric_history(fresh.run_id, key)), key


def _count_runs(client):
    return len(client.search_runs([e.experiment_id for e in client.search_experiments()]))


@pytest.mark.parametrize("make_args,needle", [
    (lambda p: ["--parent", "0123456789abcdef0123456789abcdef"], "not found"),
    (lambda p: ["--parent", "not-a-run"], "not a run id"),
    (lambda p: ["--parent", p, "--start-epoch", "7"], "no saved epoch 7"),
    (lambda p: ["--parent", p, "--rate", "1.5"], "--rate must be in (0, 1)"),
    (lambda p: ["--parent", p, "--rate", "0"], "--rate must be in (0, 1)"),
    (lambda p: ["--parent", p, "--target-sparsity", "1.0"], "--target-sparsity"),
    (lambda p: ["--parent", p, "--criterion", "hessian"], "invalid choice"),
    (lambda p: ["--parent", p, "--retrain", "anneal"], "invalid choice"),
    (lambda p: ["--parent", p, "--retrain", "weight_rewind", "--rewind-step", "1000"], "--rewind-step 1000"),
    (lambda p: ["--parent", f"runs:/{p}", "--levels", "x"], "expected an integer"),
])
def test_bad_input_exits_2_and_logs_nothing(env, capsys, make_args, needle):
    client = tracking.get_client()
    before = _count_runs(client)
    assert main(["prune", *make_args(env["run_id"])]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sdd: error:") and "\n" not in err and needle in err, err
    assert _count_runs(client) == before


def test_parent_that_is_not_a_dense_run_is_refused(env, capsys):
    chain = run_prune(PruneConfig(parent=env["run_id"], levels=1, epochs=2, register=False, seed=11))
    assert main(["prune", "--parent", chain.run_id]) == 2
    assert "not a dense training run" in capsys.readouterr().err


def test_resume_refuses_a_level_file_that_does_not_fit(env):
    from pathlib import Path

    from sdd.checkpoints import save_sparse

    cfg = PruneConfig(parent=env["run_id"], levels=2, epochs=2, register=False, seed=21)
    client = tracking.get_client()
    done = run_prune(cfg)
    # Simulate a crash before level 2 and a level-1 file replaced by one of another model.
    (level1, level2) = _levels(client, done.run_id)
    client.delete_run(level2.info.run_id)
    client.set_terminated(done.run_id, "FAILED")
    path = Path(level1.info.artifact_uri) / "level" / "weights.pt"
    save_sparse({"linear1.weight": torch.zeros(3, 3)}, {"linear1.weight": torch.zeros(3, 3, dtype=torch.bool)}, path)
    with pytest.raises(UsageError, match="linear1.weight|does not fit"):
        run_prune(cfg)


@pytest.fixture(scope="module")
def seed1_parent(parent):
    """A dense run of seed 1 in the same store: a chain of seed 0 on it once drew its reinit weights from seed 1,
    the parent's own initialisation."""
    cfg = tiny_train(width=32, epochs=2, seed=1)
    return {"run_id": run_train(cfg).run_id, "cfg": cfg}


@pytest.mark.parametrize("chain_seed", [0, 1])
def test_reinit_never_redraws_a_dense_initialisation(env, seed1_parent, tmp_path, chain_seed):
    # A vanishing lr leaves the level at its reinit draw times the mask.
    result = run_prune(PruneConfig(parent=seed1_parent["run_id"], levels=1, epochs=1, lr=1e-12, retrain="reinit",
                                   seed=chain_seed, register=False))
    client = tracking.get_client()
    (level,) = _levels(client, result.run_id)
    state, masks = load_sparse(client.download_artifacts(level.info.run_id, "level/weights.pt", str(tmp_path)))
    cfg = seed1_parent["cfg"]
    problem = load_problem(cfg.data, torch.device("cpu"), run_seed=cfg.optim.seed)
    for dense_seed in range(3):  # the parent's own init (seed 1) and those of its seed-0 and seed-2 siblings
        init = build_model(cfg.model, problem, dense_seed).state_dict()
        for name, mask in masks.items():
            assert not torch.allclose(state[name], init[name] * mask, atol=1e-3), (dense_seed, name)
    # The draw is the one the seed rule names: same inputs, same weights.
    expected = build_model(cfg.model, problem, retraining.reinit_seed(1, chain_seed, 1)).state_dict()
    for name, mask in masks.items():
        assert torch.allclose(state[name], expected[name] * mask, atol=1e-6), name


def test_reinit_seeds_are_distinct_and_outside_the_dense_seeds():
    seeds = {retraining.reinit_seed(p, c, lv) for p in range(4) for c in range(4) for lv in range(1, 31)}
    assert len(seeds) == 4 * 4 * 30
    assert min(seeds) >= DENSE_SEED_LIMIT and max(seeds) < 2 ** 64  # torch.manual_seed's range
    assert retraining.reinit_seed(1, 0, 1) == retraining.reinit_seed(1, 0, 1)
    with pytest.raises(UsageError, match="--seed"):
        tiny_train(seed=DENSE_SEED_LIMIT).validate()


def test_a_finetune_chain_that_retrains_as_lr_rewind_says_so(env, caplog):
    # An explicit --lr on a constant-schedule parent makes finetune and lr_rewind the same recipe.
    with caplog.at_level("WARNING", logger="sdd.chain"):
        run_prune(PruneConfig(parent=env["run_id"], levels=1, epochs=1, retrain="finetune", lr=1e-2, seed=31,
                              register=False))
    assert any("lr_rewind" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records), caplog.text


def test_levels_and_dense_runs_record_whether_they_converged(env):
    client = tracking.get_client()
    dense = client.get_run(env["run_id"])
    assert dense.data.tags["sdd.converged"] == ("true" if dense.data.metrics["converged"] == 1.0 else "false")
    result = run_prune(PruneConfig(parent=env["run_id"], levels=2, epochs=3, seed=41, register=False))
    chain_curve = {m.step: m.value for m in client.get_metric_history(result.run_id, "converged")}
    assert set(chain_curve) == {1, 2}  # one point per level, on the chain's SDD chart
    for run in _levels(client, result.run_id):
        value = run.data.metrics["converged"]
        assert value in (0.0, 1.0) and chain_curve[int(run.data.tags["sdd.level"])] == value
        assert run.data.tags["sdd.converged"] == ("true" if value == 1.0 else "false")
    # 3 epochs of a fresh level cannot settle the loss to 1% (nor fit the noisy labels)
    assert chain_curve[1] == 0.0


def test_a_finished_chain_is_deepened_not_recomputed(env):
    client = tracking.get_client()
    shallow = PruneConfig(parent=env["run_id"], levels=2, epochs=2, seed=51, register=False)
    first = run_prune(shallow)
    before = {r.data.tags["sdd.level"]: r.info.run_id for r in _levels(client, first.run_id)}
    # The sweep planner sees that the finished 2-level chain does not cover a 3-level trial, and does cover 2.
    store = Store(tracking.tracking_uri(), client, client.get_run(first.run_id).info.experiment_id, "x")

    def trial(cfg: PruneConfig) -> Trial:
        return Trial("k", "prune", to_flat_dict(cfg), 1.0, 0.0)

    deeper = PruneConfig(parent=env["run_id"], levels=3, epochs=2, seed=51, register=False)
    assert finished_run(store, trial(shallow)) == first.run_id and finished_run(store, trial(deeper)) is None
    second = run_prune(deeper)
    assert second.run_id == first.run_id and not second.reused
    chain = client.get_run(first.run_id)
    assert chain.info.status == "FINISHED" and chain.data.tags["sdd.levels"] == "3"
    levels = _levels(client, first.run_id)
    assert [r.data.tags["sdd.level"] for r in levels] == ["1", "2", "3"]
    assert {lv: before[lv] for lv in ("1", "2")} == {r.data.tags["sdd.level"]: r.info.run_id for r in levels[:2]}
    assert sorted(m.step for m in client.get_metric_history(first.run_id, "test_acc")) == [0, 1, 2, 3]
    # Asked for fewer levels than it has, the chain is returned as it is.
    again = run_prune(shallow)
    assert again.reused and again.run_id == first.run_id and len(_levels(client, first.run_id)) == 3
    assert finished_run(store, trial(deeper)) == first.run_id
