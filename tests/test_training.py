import copy
import math

import pytest
import torch
from torch import nn

from sdd.config import OptimConfig
from sdd.pruning import as_float_masks, full_masks, magnitude_scores, prune_masks
from sdd.training import Recipe, TrainingDiverged, converged, fit, lr_factor


def _problem(n=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long()
    return x, y


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("batch_size", [0, 16])
def test_fit_keeps_pruned_weights_zero(optimizer, batch_size):
    x, y = _problem()
    model = _model()
    weights = {"0.weight": model[0].weight, "2.weight": model[2].weight}
    masks = prune_masks(magnitude_scores(weights), full_masks(weights), 0.7, "global")
    recipe = Recipe.from_optim(OptimConfig(optimizer=optimizer, lr=0.05, weight_decay=1e-3, epochs=5,
                                           batch_size=batch_size))
    fit(model, x, y, recipe, masks=as_float_masks(masks, weights), weights=weights)
    for name, w in weights.items():
        assert torch.all(w[~masks[name]] == 0)
        assert torch.count_nonzero(w[masks[name]]) > 0


def test_fit_is_deterministic_given_seeds():
    x, y = _problem()
    outs = []
    for _ in range(2):
        model = _model()
        fit(model, x, y, Recipe.from_optim(OptimConfig(epochs=3, batch_size=16)),
            generator=torch.Generator().manual_seed(1))
        outs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(outs[0], outs[1])


def test_fit_calls_hooks_and_counts_steps():
    x, y = _problem(64)
    steps, epochs = [], []
    n = fit(_model(), x, y, Recipe.from_optim(OptimConfig(epochs=3, batch_size=20)),
            on_step=steps.append, on_epoch=lambda e, loss: epochs.append(e)).steps
    assert n == 12 and steps == list(range(1, 13)) and epochs == [1, 2, 3]


def test_diverging_loss_raises():
    x, y = _problem()
    with pytest.raises(TrainingDiverged):
        fit(_model(), x * 1e30, y, Recipe.from_optim(OptimConfig(optimizer="sgd", lr=1e10, epochs=3)))


def test_schedules():
    assert lr_factor("constant", 50, 100, (), 0.1) == 1.0
    assert lr_factor("multistep", 79, 160, (80, 120), 0.1) == 1.0
    assert math.isclose(lr_factor("multistep", 120, 160, (80, 120), 0.1), 0.01)
    assert lr_factor("cosine", 0, 10, (), 0.1) == 1.0
    assert math.isclose(lr_factor("cosine", 5, 10, (), 0.1), 0.5)


def test_recipe_stretches_milestones_to_a_shorter_phase():
    optim = OptimConfig(optimizer="sgd", lr=0.1, schedule="multistep", milestones=(80, 120), epochs=160)
    assert Recipe.from_optim(optim, epochs=40).milestones() == (20, 30)
    assert math.isclose(Recipe.from_optim(optim).final_lr(), 0.001)


def test_fit_records_the_mean_loss_of_every_epoch_across_a_resume():
    x, y = _problem(64)
    seen: list[tuple[float, int]] = []

    def loss_fn(logits, targets, _x, _idx):
        loss = torch.nn.functional.cross_entropy(logits, targets)
        seen.append((loss.item(), len(targets)))
        return loss

    recipe = Recipe.from_optim(OptimConfig(epochs=4, batch_size=20))  # batches of 20, 20, 20 and 4
    states = []
    result = fit(_model(), x, y, recipe, loss_fn=loss_fn, generator=torch.Generator().manual_seed(0),
                 snapshot=lambda state: states.append(copy.deepcopy(state)), snapshot_epochs=2)
    batches = [seen[i:i + 4] for i in range(0, 16, 4)]
    expected = [sum(v * n for v, n in epoch) / 64 for epoch in batches]  # weighted by batch size
    assert result.epoch_losses == pytest.approx(expected, rel=1e-6)
    # A run continued from its epoch-2 state reports all four epochs, the first two from the state.
    (state,) = states
    resumed = fit(_model(), x, y, recipe, generator=torch.Generator(), resume=state)
    assert resumed.epoch_losses == pytest.approx(result.epoch_losses, rel=1e-6)


def test_converged_when_the_loss_plateaus_over_the_last_tenth():
    falling = [math.exp(-0.01 * e) for e in range(100)]  # still -0.8%/epoch at the end
    plateau = [1.0 + math.exp(-0.2 * e) for e in range(100)]
    assert not converged(falling, train_acc=0.9)
    assert converged(plateau, train_acc=0.9)
    # A loss still falling is accepted once the labels trained on are interpolated.
    assert converged(falling, train_acc=0.9995)
    # Minibatch noise around a plateau is smoothed over, not read as a 10% change between two epochs.
    noisy = [1.0 + 0.05 * (-1) ** e for e in range(100)]
    assert converged(noisy, train_acc=0.5)
    # No loss history (or one epoch): only the accuracy can tell.
    assert not converged([], train_acc=0.5) and converged([0.3], train_acc=1.0)
