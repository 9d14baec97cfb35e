import math

import pytest
import torch
import torch.nn.functional as F

from sdd.config import OptimConfig
from sdd.distillation import kd_loss
from sdd.training import Recipe, fit


def test_kd_loss_matches_hand_computation():
    s = torch.tensor([[2.0, 0.0, -1.0]])
    t = torch.tensor([[1.0, 3.0, 0.0]])
    y = torch.tensor([0])
    T, alpha = 4.0, 0.7
    ps = [math.exp(v / T) for v in s[0].tolist()]
    pt = [math.exp(v / T) for v in t[0].tolist()]
    ps = [p / sum(ps) for p in ps]
    pt = [p / sum(pt) for p in pt]
    kl = sum(q * math.log(q / p) for p, q in zip(ps, pt))
    ce = -math.log(math.exp(2.0) / sum(math.exp(v) for v in s[0].tolist()))
    expected = alpha * T * T * kl + (1 - alpha) * ce
    assert math.isclose(kd_loss(s, t, y, alpha, T).item(), expected, rel_tol=1e-6)


def test_kd_loss_on_a_batch_averages_over_samples():
    # Several samples with different logits: the KL term is summed over classes and averaged over
    # samples ('batchmean'), like the cross-entropy; a 'sum' (x batch) or 'mean' (/ classes) differs.
    s = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, -0.5], [-1.0, 2.0, 3.0], [0.0, 0.0, 4.0]], dtype=torch.float64)
    t = torch.tensor([[1.0, 3.0, 0.0], [2.0, -1.0, 0.5], [3.0, 0.0, -2.0], [0.5, 0.5, 0.5]], dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0])
    T, alpha, batch = 4.0, 0.7, len(y)
    log_ps, log_pt = torch.log_softmax(s / T, dim=1), torch.log_softmax(t / T, dim=1)
    kl = sum((log_pt[i].exp() * (log_pt[i] - log_ps[i])).sum() for i in range(batch)) / batch
    ce = -sum(torch.log_softmax(s[i], dim=0)[y[i]] for i in range(batch)) / batch
    expected = alpha * T * T * kl + (1 - alpha) * ce
    assert kd_loss(s, t, y, alpha, T).item() == pytest.approx(expected.item(), rel=1e-9)


def test_alpha_zero_is_plain_cross_entropy_training():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 5, generator=g), torch.randint(0, 3, (32,), generator=g)
    teacher_logits = torch.randn(32, 3, generator=g) * 10
    results = []
    for loss_fn in (None, lambda logits, yb, xb, idx: kd_loss(logits, teacher_logits, yb, 0.0, 10.0)):
        torch.manual_seed(0)
        model = torch.nn.Linear(5, 3)
        kwargs = {"loss_fn": loss_fn} if loss_fn else {}
        fit(model, x, y, Recipe.from_optim(OptimConfig(epochs=5)), **kwargs)
        results.append(model.weight.detach().clone())
    assert torch.equal(results[0], results[1])
    assert not torch.equal(kd_loss(x[:, :3], teacher_logits, y, 0.5, 10.0), F.cross_entropy(x[:, :3], y))
