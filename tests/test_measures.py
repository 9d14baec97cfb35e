import math

import torch
from torch import nn

from sdd.measures import activation_entropy, forward_flops, learning_distance, split_metrics


def _h(p):
    return 0.0 if p in (0, 1) else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def test_entropy_on_a_hand_made_layer_counts_every_input():
    lin = nn.Linear(1, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0], [0.0], [-1.0]]))
        lin.bias.copy_(torch.tensor([0.0, 1.0, 1.5]))
    model = nn.Sequential(lin, nn.ReLU())
    x = torch.tensor([[-1.0], [1.0], [2.0], [3.0]])
    # unit 0: x > 0 for 3/4; unit 1: always on; unit 2: 1.5 - x > 0 for 2/4.
    expected = (_h(0.75) + _h(1.0) + _h(0.5)) / 3
    out = activation_entropy(model, x, batch_size=3)  # two batches: counts must span both
    assert math.isclose(out["entropy/1"], expected, rel_tol=1e-9)
    assert math.isclose(out["entropy"], expected, rel_tol=1e-9)


def test_entropy_counts_conv_units_per_channel_and_position():
    conv = nn.Conv1d(1, 1, kernel_size=1, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    model = nn.Sequential(conv, nn.ReLU())
    x = torch.tensor([[[1.0, -1.0]], [[1.0, 1.0]]])  # position 0 always on, position 1 half the time
    assert math.isclose(activation_entropy(model, x)["entropy/1"], (0.0 + 1.0) / 2)


def test_learning_distance_is_l2_over_weights():
    a = {"w": torch.tensor([3.0, 0.0]), "v": torch.tensor([[0.0]])}
    b = {"w": torch.tensor([0.0, 0.0]), "v": torch.tensor([[4.0]])}
    assert learning_distance(a, b) == 5.0


def test_split_metrics_separates_clean_and_noisy_subsets():
    class Fixed(nn.Module):
        def forward(self, x):
            return torch.nn.functional.one_hot(x[:, 0].long(), 2).float()

    class D:
        x_train = torch.tensor([[0.0], [1.0], [1.0], [0.0]])
        y_train = torch.tensor([0, 1, 0, 1])  # samples 2 and 3 carry wrong labels
        x_val = torch.tensor([[0.0]])
        y_val = torch.tensor([0])
        x_test = torch.tensor([[1.0], [0.0]])
        y_test = torch.tensor([1, 1])

    noisy = torch.tensor([False, False, True, True])
    m = split_metrics(Fixed(), D, noisy)
    assert m["train_acc"] == 0.5 and m["train_acc_clean"] == 1.0 and m["train_acc_noisy"] == 0.0
    assert m["val_acc"] == 1.0 and m["test_acc"] == 0.5



def test_split_metrics_equal_a_plain_computation_on_an_mlp_with_noisy_labels(monkeypatch):
    from sdd import measures
    from sdd.data import Splits
    from sdd.noise import apply_label_noise

    g = torch.Generator().manual_seed(0)
    x = torch.randn(700, 8, generator=g)
    clean = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    y_train, noisy_idx = apply_label_noise(clean[:400], 0.3, "symmetric", 4, seed=1)
    noisy = torch.zeros(400, dtype=torch.bool)
    noisy[noisy_idx] = True
    data = Splits(x[:400], y_train, x[400:500], clean[400:500], x[500:], clean[500:], 4, (8,))
    torch.manual_seed(0)
    # BatchNorm and dropout: the metrics must be those of eval mode.
    model = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 4))
    with torch.no_grad():  # BatchNorm's running statistics away from their initial values
        model(data.x_train + 1.0)

    model.eval()
    with torch.no_grad():
        expected = {}
        for name, xs, ys in (("train", data.x_train, y_train), ("val", data.x_val, data.y_val),
                             ("test", data.x_test, data.y_test)):
            logits = model(xs)
            expected[f"{name}_loss"] = nn.functional.cross_entropy(logits, ys).item()
            expected[f"{name}_acc"] = (logits.argmax(1) == ys).float().mean().item()
            if name == "train":
                hit = logits.argmax(1) == ys
                expected["train_acc_clean"] = hit[~noisy].float().mean().item()
                expected["train_acc_noisy"] = hit[noisy].float().mean().item()
    model.train()
    assert 0 < expected["train_acc_noisy"] < 1 and 0 < expected["train_acc_clean"] < 1

    monkeypatch.setattr(measures, "EVAL_BATCH", 64)  # several batches per split
    got = split_metrics(model, data, noisy)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert math.isclose(got[key], value, abs_tol=1e-6), key
    assert model.training  # the mode it was in

def test_forward_flops_counts_nonzero_weights_per_use():
    model = nn.Sequential(nn.Conv1d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(20, 4))
    with torch.no_grad():
        model[2].weight[:, :10] = 0
    # conv: 6 weights x 10 positions; linear: 40 nonzero weights once; 2 flops per multiply-add
    assert forward_flops(model, torch.zeros(1, 1, 10)) == 2 * (6 * 10 + 40)
