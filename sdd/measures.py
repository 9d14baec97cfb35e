"""What is measured on a model: accuracy and loss on each split, activation entropy, learning distance."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

EVAL_BATCH = 4096


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """`model` in eval mode inside the block, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _logits(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Logits of `x` in batches of `batch_size` (float32); the caller holds eval and inference mode."""
    outs = [model(x[i:i + batch_size]).float() for i in range(0, len(x), batch_size)]
    if not outs:
        return torch.empty(0, device=x.device)
    return torch.cat(outs)


@torch.inference_mode()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = EVAL_BATCH) -> torch.Tensor:
    """Logits of `x` in large batches, eval mode, no autograd (float32 on x's device)."""
    with _eval_mode(model):
        return _logits(model, x, batch_size)


@torch.inference_mode()
def split_metrics(model: nn.Module, data, noisy_mask: torch.Tensor) -> dict[str, float]:
    """Every per-evaluation measure of design.md, from one forward pass per split.

    `data` is a `sdd.data.Splits` whose `y_train` holds the labels trained on (noisy);
    `noisy_mask` marks the samples whose label was corrupted. Train and test metrics are NaN for an
    empty split; val metrics and the clean/noisy accuracies are left out when their subset is empty.
    """
    labels = {"train": data.y_train, "val": data.y_val, "test": data.y_test}
    inputs = {"train": data.x_train, "val": data.x_val, "test": data.x_test}
    with _eval_mode(model):
        logits = {name: _logits(model, inputs[name], EVAL_BATCH) for name, y in labels.items() if len(y)}
    # Every scalar stays on the device until one transfer at the end: an .item() per metric would wait
    # for the device once per metric.
    scalars: dict[str, torch.Tensor] = {}
    for name, out in logits.items():
        y = labels[name]
        correct = out.argmax(1) == y
        scalars[f"{name}_loss"] = F.cross_entropy(out, y)
        scalars[f"{name}_correct"] = correct.sum()
        if name == "train":
            scalars["train_noisy"] = noisy_mask.sum()
            scalars["train_correct_noisy"] = (correct & noisy_mask).sum()
    host = dict(zip(scalars, torch.stack([v.double() for v in scalars.values()]).tolist())) if scalars else {}

    nan = float("nan")
    metrics: dict[str, float] = {}
    for name, y in labels.items():
        if name == "val" and not len(y):
            continue
        metrics[f"{name}_loss"] = host.get(f"{name}_loss", nan)
        metrics[f"{name}_acc"] = host[f"{name}_correct"] / len(y) if len(y) else nan
        if name == "train" and len(y):
            noisy = int(host["train_noisy"])
            if noisy < len(y):
                metrics["train_acc_clean"] = (host["train_correct"] - host["train_correct_noisy"]) / (len(y) - noisy)
            if noisy:
                metrics["train_acc_noisy"] = host["train_correct_noisy"] / noisy
    return metrics


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
    squares = [(w.detach().double() - reference[name].to(w.device, torch.float64)).pow(2).sum()
               for name, w in weights.items()]
    if not squares:
        return 0.0
    # Summed on the weights' device (in layer order, as before) and moved once: a transfer per layer
    # would wait for the device each time.
    return sum(squares[1:], start=squares[0]).sqrt().item()


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
