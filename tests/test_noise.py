import pytest
import torch

from conftest import tiny_train
from sdd.errors import UsageError
from sdd.noise import NOISE_KINDS, apply_label_noise


def _clean(n: int, num_classes: int, seed: int = 123) -> torch.Tensor:
    return torch.randint(0, num_classes, (n,), generator=torch.Generator().manual_seed(seed))


def _check_contract(clean: torch.Tensor, noisy: torch.Tensor, idx: torch.Tensor, num_classes: int) -> None:
    assert noisy.dtype == torch.int64 and idx.dtype == torch.int64
    assert noisy.shape == clean.shape
    assert torch.equal(idx, torch.nonzero(noisy != clean.long()).flatten())
    assert torch.equal(idx, idx.sort().values)
    assert int(noisy.min()) >= 0 and int(noisy.max()) < num_classes
    outside = torch.ones(len(clean), dtype=torch.bool)
    outside[idx] = False
    assert torch.equal(noisy[outside], clean.long()[outside])


@pytest.mark.parametrize("kind", ["symmetric", "pairflip"])
@pytest.mark.parametrize(("n", "rate", "expected"), [(1000, 0.2, 200), (1000, 0.05, 50), (999, 0.5, 500), (7, 0.3, 2)])
def test_exact_count_of_wrong_labels(kind: str, n: int, rate: float, expected: int) -> None:
    clean = _clean(n, 10)
    noisy, idx = apply_label_noise(clean, rate, kind, 10, seed=0)
    _check_contract(clean, noisy, idx, 10)
    assert len(idx) == expected == round(rate * n)


def test_symmetric_labels_never_equal_clean_and_are_uniform_over_other_classes() -> None:
    clean = torch.zeros(30000, dtype=torch.int64)
    noisy, idx = apply_label_noise(clean, 0.5, "symmetric", 3, seed=1)
    assert (noisy[idx] != 0).all()
    share_of_class_1 = (noisy[idx] == 1).float().mean().item()
    assert abs(share_of_class_1 - 0.5) < 0.02  # 15000 draws: std 0.004


def test_pairflip_maps_to_next_class() -> None:
    clean = _clean(1000, 4)
    noisy, idx = apply_label_noise(clean, 0.3, "pairflip", 4, seed=2)
    assert torch.equal(noisy[idx], (clean[idx] + 1) % 4)


@pytest.mark.parametrize(("num_classes", "rate"), [(10, 0.4), (2, 0.5)])
def test_random_wrong_rate_is_rate_times_one_minus_one_over_c(num_classes: int, rate: float) -> None:
    n = 100_000
    clean = _clean(n, num_classes)
    noisy, idx = apply_label_noise(clean, rate, "random", num_classes, seed=3)
    _check_contract(clean, noisy, idx, num_classes)
    expected = rate * (1 - 1 / num_classes)
    # Binomial std is below 0.002 for both cases; `symmetric` semantics (rate wrong) would miss by >= 0.04.
    assert abs(len(idx) / n - expected) < 0.01
    assert len(idx) <= round(rate * n)


@pytest.mark.parametrize("kind", NOISE_KINDS)
def test_deterministic_by_seed(kind: str) -> None:
    clean = _clean(500, 10)
    a = apply_label_noise(clean, 0.3, kind, 10, seed=7)
    b = apply_label_noise(clean, 0.3, kind, 10, seed=7)
    c = apply_label_noise(clean, 0.3, kind, 10, seed=8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_does_not_touch_global_rng_or_input() -> None:
    clean = _clean(200, 10)
    before = clean.clone()
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    apply_label_noise(clean, 0.5, "random", 10, seed=0)
    assert torch.equal(torch.rand(3), expected)
    assert torch.equal(clean, before)


def test_zero_rate_copies_labels() -> None:
    clean = _clean(50, 10).to(torch.int32)
    noisy, idx = apply_label_noise(clean, 0.0, "symmetric", 10, seed=0)
    assert noisy.dtype == torch.int64 and torch.equal(noisy, clean.long())
    assert idx.dtype == torch.int64 and idx.numel() == 0
    noisy[0] = (noisy[0] + 1) % 10
    assert noisy[0] != clean[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_returns_on_input_device() -> None:
    clean = _clean(100, 10).cuda()
    noisy, idx = apply_label_noise(clean, 0.2, "symmetric", 10, seed=0)
    assert noisy.device == clean.device and idx.device == clean.device
    assert torch.equal(noisy.cpu(), apply_label_noise(clean.cpu(), 0.2, "symmetric", 10, seed=0)[0])


@pytest.mark.parametrize(
    ("labels", "rate", "kind", "num_classes"),
    [
        (torch.zeros(10, dtype=torch.int64), -0.1, "symmetric", 10),
        (torch.zeros(10, dtype=torch.int64), 1.0, "symmetric", 10),
        (torch.zeros(10, dtype=torch.int64), "0.2", "symmetric", 10),
        (torch.zeros(10, dtype=torch.int64), True, "symmetric", 10),
        (torch.zeros(10, dtype=torch.int64), 0.2, "uniform", 10),
        (torch.zeros(10, dtype=torch.int64), 0.2, "symmetric", 1),
        (torch.full((10,), 10), 0.2, "symmetric", 10),
        (torch.full((10,), -1), 0.2, "symmetric", 10),
        (torch.zeros(2, 5, dtype=torch.int64), 0.2, "symmetric", 10),
        (torch.zeros(10), 0.2, "symmetric", 10),
    ],
)
def test_bad_input_raises_usage_error(labels: torch.Tensor, rate: object, kind: str, num_classes: int) -> None:
    with pytest.raises(UsageError) as info:
        apply_label_noise(labels, rate, kind, num_classes, seed=0)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- the noise of a run's problem

def _problem(**overrides):
    from sdd.problem import load_problem

    cfg = tiny_train(**overrides)
    return cfg, load_problem(cfg.data, torch.device("cpu"), run_seed=cfg.optim.seed)


def test_the_noise_draw_follows_the_run_seed_unless_given() -> None:
    from sdd.config import train_hash

    cfg0, seed0 = _problem(seed=0)
    cfg1, seed1 = _problem(seed=1)
    assert torch.equal(seed0.clean_y_train, seed1.clean_y_train)
    assert len(seed0.noisy_idx) == len(seed1.noisy_idx) == 80  # 20% of 400, symmetric
    assert not torch.equal(seed0.noisy_idx, seed1.noisy_idx)
    assert (seed0.noise_seed, seed1.noise_seed) == (0, 1)
    # An explicit noise seed wins over the run's seed ...
    cfg5a, fixed_a = _problem(seed=0, noise_seed=5)
    cfg5b, fixed_b = _problem(seed=1, noise_seed=5)
    _, seed5 = _problem(seed=5)
    assert torch.equal(fixed_a.noisy_idx, fixed_b.noisy_idx) and torch.equal(fixed_a.noisy_idx, seed5.noisy_idx)
    assert fixed_b.noise_seed == 5
    # ... and the hash holds the effective value: naming the run's own seed is the same run.
    assert train_hash(cfg0, None) == train_hash(tiny_train(noise_seed=0, seed=0), None)
    assert len({train_hash(c, None) for c in (cfg0, cfg1, cfg5a, cfg5b)}) == 4


def test_validation_labels_are_clean_unless_val_noise() -> None:
    from sdd.data import load_dataset

    clean_val = load_dataset("mnist1d", train_size=400, test_size=200, val_size=100).y_val
    _, default = _problem()
    assert torch.equal(default.splits.y_val, clean_val) and default.val_noisy_idx.numel() == 0
    _, strict = _problem(val_noise=True)
    wrong = torch.nonzero(strict.splits.y_val != clean_val).flatten()
    assert torch.equal(wrong, strict.val_noisy_idx) and len(wrong) == 20  # same kind and rate: 20% symmetric
    # The training labels and their noise do not move.
    assert torch.equal(strict.splits.y_train, default.splits.y_train)
    _, random_kind = _problem(val_noise=True, noise_kind="random", noise=0.5)
    assert 0 < len(random_kind.val_noisy_idx) < 50  # `random`: about p(1 - 1/C) wrong


def test_val_noise_needs_a_validation_split() -> None:
    from sdd.config import DataConfig

    with pytest.raises(UsageError, match="--val-noise needs a validation split"):
        DataConfig(val_size=0, val_noise=True).validate()
