"""Pruning masks, criteria, mask persistence through optimizers, and level schedules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sdd.config import pruning_levels as schedule
from sdd.errors import UsageError
from sdd.models import build_model, prunable_weights
from sdd.pruning import (
    apply_masks,
    as_float_masks,
    full_masks,
    gradient_scores,
    magnitude_scores,
    prune_masks,
    random_scores,
    sparsity_report,
)


def _mlp(seed: int = 0) -> tuple[nn.Sequential, dict[str, nn.Parameter]]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 10))
    return model, {"0.weight": model[0].weight, "2.weight": model[2].weight}


def _hand_weights() -> dict[str, nn.Parameter]:
    # Magnitudes: a = 0.1 0.5 / 0.3 0.05, b = 0.2 0.6 0.7 0.4
    return {
        "a.weight": nn.Parameter(torch.tensor([[0.1, -0.5], [0.3, 0.05]])),
        "b.weight": nn.Parameter(torch.tensor([[0.2, -0.6, 0.7, -0.4]])),
    }


def _remaining(masks: dict[str, torch.Tensor]) -> int:
    return sum(int(m.sum()) for m in masks.values())


# --- masks through optimizers -------------------------------------------------------------------

OPTIMIZERS = {
    "sgd_momentum_wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4),
    "adam_wd": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=5e-4),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-2),
}


def _train(optimizer_name: str, mask_after_step: bool, float_masks: bool) -> list[torch.Tensor]:
    """Prune half the weights, train a few steps; return the pruned entries after every step."""
    model, weights = _mlp()
    masks = prune_masks(magnitude_scores(weights), full_masks(weights), 0.5, "global")
    step_masks = as_float_masks(masks, like=weights) if float_masks else masks
    apply_masks(weights, step_masks)
    optimizer = OPTIMIZERS[optimizer_name](model.parameters())
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 20, generator=gen)
    y = torch.randint(0, 10, (64,), generator=gen)
    pruned_values = []
    for _ in range(5):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        if mask_after_step:
            apply_masks(weights, step_masks)
        pruned_values.append(torch.cat([w.detach()[~masks[n]] for n, w in weights.items()]))
    return pruned_values


@pytest.mark.parametrize("float_masks", [False, True], ids=["bool_masks", "float_masks"])
@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
def test_pruned_weights_stay_exactly_zero(optimizer_name: str, float_masks: bool) -> None:
    for values in _train(optimizer_name, mask_after_step=True, float_masks=float_masks):
        assert values.numel() > 0
        assert torch.count_nonzero(values) == 0


@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
def test_without_masking_after_the_step_pruned_weights_revive(optimizer_name: str) -> None:
    # Guards the test above: the optimizers really do move pruned weights.
    values = _train(optimizer_name, mask_after_step=False, float_masks=False)[-1]
    assert torch.count_nonzero(values) > values.numel() // 2


def test_kept_weights_still_train() -> None:
    model, weights = _mlp()
    masks = prune_masks(magnitude_scores(weights), full_masks(weights), 0.5, "global")
    apply_masks(weights, masks)
    before = {n: w.detach().clone() for n, w in weights.items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    nn.functional.cross_entropy(model(torch.randn(8, 20)), torch.randint(0, 10, (8,))).backward()
    optimizer.step()
    apply_masks(weights, masks)
    for n, w in weights.items():
        assert not torch.equal(w.detach()[masks[n]], before[n][masks[n]])


def test_float_and_bool_masks_give_the_same_weights() -> None:
    _, w1 = _mlp()
    _, w2 = _mlp()
    scores = random_scores(w1, torch.Generator().manual_seed(0))
    masks = prune_masks(scores, full_masks(w1), 0.7, "global")
    apply_masks(w1, masks)
    float_masks = as_float_masks(masks, like=w2)
    assert all(m.dtype == w2[n].dtype and m.device == w2[n].device for n, m in float_masks.items())
    apply_masks(w2, float_masks)
    for name in w1:
        assert torch.equal(w1[name], w2[name])


def test_full_masks_keep_everything() -> None:
    _, weights = _mlp()
    masks = full_masks(weights)
    for name, mask in masks.items():
        assert mask.dtype == torch.bool and mask.shape == weights[name].shape and mask.all()


# --- mask selection ----------------------------------------------------------------------------


def test_global_magnitude_removes_smallest_across_layers() -> None:
    weights = _hand_weights()
    masks = prune_masks(magnitude_scores(weights), full_masks(weights), 0.5, "global")
    # The 4 smallest of all 8 magnitudes: 0.05 (a), 0.1 (a), 0.2 (b), 0.3 (a).
    assert torch.equal(masks["a.weight"], torch.tensor([[False, True], [False, False]]))
    assert torch.equal(masks["b.weight"], torch.tensor([[False, True, True, True]]))


def test_layerwise_removes_rate_per_layer() -> None:
    weights = _hand_weights()
    masks = prune_masks(magnitude_scores(weights), full_masks(weights), 0.5, "layerwise")
    assert torch.equal(masks["a.weight"], torch.tensor([[False, True], [True, False]]))
    assert torch.equal(masks["b.weight"], torch.tensor([[False, True, True, False]]))


def test_exclude_keeps_a_layer_dense() -> None:
    weights = _hand_weights()
    scores = magnitude_scores(weights)
    masks = prune_masks(scores, full_masks(weights), 0.5, "global", exclude={"b.weight"})
    # Half of a's 4 remaining weights go; b keeps all, although 0.2 is smaller than a's 0.3.
    assert torch.equal(masks["a.weight"], torch.tensor([[False, True], [True, False]]))
    assert masks["b.weight"].all()


def test_pruned_weights_stay_pruned_and_do_not_count() -> None:
    weights = _hand_weights()
    masks = full_masks(weights)
    masks["b.weight"][0, 2] = False  # the largest weight (0.7) was pruned earlier
    new = prune_masks(magnitude_scores(weights), masks, 0.4, "global")
    # round(0.4 * 7 remaining) = 3 removed among the remaining: 0.05, 0.1, 0.2.
    assert torch.equal(new["a.weight"], torch.tensor([[False, True], [True, False]]))
    assert torch.equal(new["b.weight"], torch.tensor([[False, True, False, True]]))


def test_prune_masks_returns_new_masks() -> None:
    weights = _hand_weights()
    masks = full_masks(weights)
    new = prune_masks(magnitude_scores(weights), masks, 0.5, "global")
    assert all(m.all() for m in masks.values())
    assert all(new[n] is not masks[n] for n in masks)


@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_iterative_levels_remove_exact_counts(scope: str) -> None:
    _, weights = _mlp()
    masks = full_masks(weights)
    for _ in range(8):
        # Pruned weights score 0 here, the lowest of all: they must not be counted again.
        new = prune_masks(magnitude_scores(weights), masks, 0.2, scope)
        if scope == "global":
            assert _remaining(new) == _remaining(masks) - round(0.2 * _remaining(masks))
        else:
            for n in masks:
                kept = int(masks[n].sum())
                assert int(new[n].sum()) == kept - round(0.2 * kept)
        for n in masks:
            assert not (new[n] & ~masks[n]).any()  # nothing pruned comes back
        masks = new
        apply_masks(weights, masks)
    assert sparsity_report(weights)["nonzero"] == _remaining(masks)


def test_ties_remove_exact_count_deterministically() -> None:
    scores = {"a": torch.ones(2, 5), "b": torch.tensor([1.0, 1.0, 2.0, 2.0])}
    masks = {"a": torch.ones(2, 5, dtype=torch.bool), "b": torch.ones(4, dtype=torch.bool)}
    new = prune_masks(scores, masks, 0.5, "global")  # 7 removed from 14, 10 of them tied at 1.0
    assert _remaining(new) == 7
    # Ties go in layer order, then index order.
    assert torch.equal(new["a"].reshape(-1), torch.tensor([False] * 7 + [True] * 3))
    assert new["b"].all()
    assert all(torch.equal(new[n], prune_masks(scores, masks, 0.5, "global")[n]) for n in new)
    layerwise = prune_masks(scores, masks, 0.3, "layerwise")
    assert int(layerwise["a"].sum()) == 7 and int(layerwise["b"].sum()) == 3


def test_prune_masks_rejects_bad_input() -> None:
    weights = _hand_weights()
    scores, masks = magnitude_scores(weights), full_masks(weights)
    with pytest.raises(UsageError, match="scope"):
        prune_masks(scores, masks, 0.2, "per-neuron")
    with pytest.raises(UsageError, match="rate"):
        prune_masks(scores, masks, 1.5, "global")
    with pytest.raises(UsageError, match="c.weight"):
        prune_masks(scores, masks, 0.2, "global", exclude=["c.weight"])


# --- criteria ----------------------------------------------------------------------------------


def test_gradient_scores_match_hand_computation() -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.5, -1.0, 2.0], [0.0, 0.25, -0.75]]))
        model[0].bias.copy_(torch.tensor([0.1, -0.2]))
    weights = {"0.weight": model[0].weight}
    w0 = model[0].weight.detach().clone()
    gen = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(4, 3, generator=gen), torch.randn(4, 2, generator=gen)) for _ in range(2)
    ]

    expected = torch.zeros(2, 3)
    for x, t in batches:
        y = x @ w0.T + model[0].bias.detach()
        grad = 2.0 / y.numel() * (y - t).T @ x  # d mean((y - t)^2) / dW
        expected += (w0 * grad).abs()

    scores = gradient_scores(model, weights, batches, nn.functional.mse_loss)
    torch.testing.assert_close(scores["0.weight"], expected)
    assert torch.equal(model[0].weight, w0)
    assert model[0].weight.grad is None and model[0].bias.grad is None


def test_gradient_scores_work_under_no_grad_and_need_data() -> None:
    model, weights = _mlp()
    batches = [(torch.randn(8, 20), torch.randint(0, 10, (8,)))]
    with torch.no_grad():
        scores = gradient_scores(model, weights, batches, nn.functional.cross_entropy)
    assert all(s.shape == weights[n].shape and s.sum() > 0 for n, s in scores.items())
    with pytest.raises(UsageError, match="batch"):
        gradient_scores(model, weights, [], nn.functional.cross_entropy)


def test_gradient_scores_leave_the_model_state_untouched() -> None:
    # Scoring runs forward passes in train mode; on the model itself they would move its BatchNorm running
    # statistics (and count batches), so the model retrained and evaluated after pruning would not be the one
    # that was scored.
    torch.manual_seed(0)
    model = build_model("cnn5", width=2, input_shape=(3, 16, 16), num_classes=10).train()
    weights = prunable_weights(model)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert any(k.endswith("num_batches_tracked") for k in before)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 16, 16, generator=gen), torch.randint(0, 10, (8,), generator=gen))
               for _ in range(2)]
    scores = gradient_scores(model, weights, batches, nn.functional.cross_entropy)
    assert all(s.shape == weights[n].shape and s.sum() > 0 for n, s in scores.items())
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, changed
    assert model.training and all(p.grad is None for p in model.parameters())


def test_random_scores_are_deterministic_with_a_seeded_generator() -> None:
    _, weights = _mlp()
    a = random_scores(weights, torch.Generator().manual_seed(3))
    b = random_scores(weights, torch.Generator().manual_seed(3))
    c = random_scores(weights, torch.Generator().manual_seed(4))
    for n, w in weights.items():
        assert a[n].shape == w.shape
        assert torch.equal(a[n], b[n])
        assert not torch.equal(a[n], c[n])


# --- reports and schedules ---------------------------------------------------------------------


def test_sparsity_report_counts_zeros_in_the_weights() -> None:
    weights = {
        "a.weight": nn.Parameter(torch.tensor([[0.0, 1.0], [2.0, 0.0]])),
        "b.weight": nn.Parameter(torch.tensor([[0.0, -0.0, 0.0, 3.0, 4.0, 5.0]])),
    }
    report = sparsity_report(weights)
    assert report["nonzero"] == 5 and report["total"] == 10
    assert report["sparsity"] == pytest.approx(0.5)
    assert report["per_layer"] == {"a.weight": pytest.approx(0.5), "b.weight": pytest.approx(0.5)}


def test_schedule_levels_for_target_sparsity() -> None:
    assert schedule(0.2, None, 0.99) == 21
    assert 0.8**21 <= 0.01 < 0.8**20
    assert 1 - 0.8**30 == pytest.approx(0.99876, abs=1e-5)  # He et al.: 30 levels
    assert schedule(0.2, 30, None) == 30
    assert schedule(0.5, None, 0.75) == 2  # exactly on the boundary
    assert schedule(0.2, None, 0.1) == 1


@pytest.mark.parametrize(
    ("rate", "levels", "target", "message"),
    [
        (0.0, 5, None, "rate"),
        (1.0, 5, None, "rate"),
        (0.2, None, None, "exactly one"),
        (0.2, 5, 0.9, "exactly one"),
        (0.2, 0, None, "levels"),
        (0.2, None, 1.0, "target"),
        (0.2, None, 0.0, "target"),
    ],
)
def test_schedule_rejects_bad_input(
    rate: float, levels: int | None, target: float | None, message: str
) -> None:
    with pytest.raises(UsageError, match=message):
        schedule(rate, levels, target)


def test_a_chains_depth_is_not_part_of_its_identity() -> None:
    from sdd.config import PruneConfig, chain_hash

    def hash_of(**kw) -> str:
        return chain_hash(PruneConfig(parent="p", **kw), "p", None, None)

    assert hash_of(levels=14) == hash_of(levels=22) == hash_of(target_sparsity=0.99) == hash_of()
    assert hash_of(levels=14) != hash_of(levels=14, rate=0.3)
    assert [PruneConfig(levels=14).depth(), PruneConfig(target_sparsity=0.99).depth(), PruneConfig().depth()] == \
        [14, 21, 20]
