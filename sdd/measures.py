"""What is measured on a model: accuracy and loss on each split, activation entropy, learning distance."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

EVAL_BATCH = 4096


@torch.inference_mode()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = EVAL_BATCH) -> torch.Tensor:
    """Logits of `x` in large batches, eval mode, no autograd (float32 on x's device)."""
    was_training = model.training
    model.eval()
    try:
        outs = [model(x[i:i + batch_size]).float() for i in range(0, len(x), batch_size)]
    finally:
        model.train(was_training)
    if not outs:
        return torch.empty(0, device=x.device)
    return torch.cat(outs)


def loss_and_acc(logits: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    if len(y) == 0:
        return float("nan"), float("nan")
    loss = F.cross_entropy(logits, y).item()
    acc = (logits.argmax(1) == y).float().mean().item()
    return loss, acc


def split_metrics(model: nn.Module, data, noisy_mask: torch.Tensor) -> dict[str, float]:
    """Every per-evaluation measure of design.md, from one forward pass per split.

    `data` is a `sdd.data.Splits` whose `y_train` holds the labels trained on (noisy);
    `noisy_mask` marks the samples whose label was corrupted.
    """
    out: dict[str, float] = {}
    logits = predict(model, data.x_train)
    out["train_loss"], out["train_acc"] = loss_and_acc(logits, data.y_train)
    correct = logits.argmax(1) == data.y_train
    clean = ~noisy_mask
    if clean.any():
        out["train_acc_clean"] = correct[clean].float().mean().item()
    if noisy_mask.any():
        out["train_acc_noisy"] = correct[noisy_mask].float().mean().item()
    if len(data.y_val):
        out["val_loss"], out["val_acc"] = loss_and_acc(predict(model, data.x_val), data.y_val)
    out["test_loss"], out["test_acc"] = loss_and_acc(predict(model, data.x_test), data.y_test)
    return out


@contextlib.contextmanager
def _count_positive(model: nn.Module) -> Iterator[dict[str, list]]:
    """Per ReLU module: [count of pre-activation > 0 per unit, number of inputs seen]."""
    counts: dict[str, list] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ReLU):
            def hook(_m, inputs, _out, name=name):
                pre = inputs[0]
                positive = (pre > 0).sum(0, dtype=torch.int64)
                if name in counts:
                    counts[name][0] += positive
                    counts[name][1] += pre.shape[0]
                else:
                    counts[name] = [positive, pre.shape[0]]
            handles.append(module.register_forward_hook(hook))
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    """-p log2 p - (1-p) log2 (1-p), with 0 log 0 = 0."""
    p = p.double()
    q = 1.0 - p
    return -(torch.xlogy(p, p) + torch.xlogy(q, q)) / torch.log(torch.tensor(2.0, dtype=torch.float64))


def activation_entropy(model: nn.Module, x: torch.Tensor, batch_size: int = EVAL_BATCH) -> dict[str, float]:
    """DSD2's activation entropy over the whole (un-augmented) set `x`.

    Every unit of every ReLU (each channel x position of a feature map) is 'on' for a fraction p of
    the inputs; its entropy is H(p) in bits; layers average their units and `entropy` averages the
    layers. DSD2's own script only sees its first batch; here the counts run over all of `x`.
    """
    with _count_positive(model) as counts:
        predict(model, x, batch_size)
    out: dict[str, float] = {}
    for name, (positive, n) in counts.items():
        out[f"entropy/{name}"] = binary_entropy(positive.double() / n).mean().item()
    if out:
        out["entropy"] = sum(out.values()) / len(out)
    return out


def learning_distance(weights: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> float:
    """L2 distance between two sets of prunable weights (He et al.'s learning distance)."""
    total = torch.zeros((), dtype=torch.float64)
    for name, w in weights.items():
        diff = w.detach().double() - reference[name].to(w.device, torch.float64)
        total = total + diff.pow(2).sum().cpu()
    return total.sqrt().item()


@torch.no_grad()
def forward_flops(model: nn.Module, sample: torch.Tensor) -> float:
    """Multiply-adds x 2 of one forward pass per sample, counting only nonzero conv/linear weights.

    A weight of a conv layer is used once per output position, one of a linear layer once per
    sample, so a pruned model's cost is estimated from the weights it still has.
    """
    total = [0.0]

    def hook(module, _inputs, output):
        positions = output[0].numel() / module.weight.shape[0]
        total[0] += 2.0 * int(torch.count_nonzero(module.weight)) * positions

    layers = [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]
    handles = [m.register_forward_hook(hook) for m in layers]
    was_training = model.training
    model.eval()
    try:
        model(sample[:1])
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total[0]
