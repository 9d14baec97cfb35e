"""Batched pad-crop + flip augmentation."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from sdd.augment import random_crop_flip
from sdd.errors import UsageError


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_shape_and_dtype_kept():
    x = torch.randn(16, 3, 32, 32)
    assert random_crop_flip(x, generator=_gen(0)).shape == x.shape
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    assert random_crop_flip(images, pad=2, generator=_gen(0)).dtype == torch.uint8


def test_no_pad_no_flip_is_identity():
    x = torch.randn(8, 3, 6, 6)
    assert torch.equal(random_crop_flip(x, pad=0, flip=False), x)


def test_flip_only_mirrors_about_half():
    x = torch.randn(2000, 1, 2, 5)
    out = random_crop_flip(x, pad=0, flip=True, generator=_gen(1))
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all())
    assert 0.45 < mirrored.float().mean().item() < 0.55


def test_every_sample_is_a_crop_of_the_padded_input():
    pad, n, h, w = 1, 400, 4, 5
    x = torch.randn(n, 2, h, w)
    out = random_crop_flip(x, pad=pad, flip=True, generator=_gen(2))
    padded = F.pad(x, (pad, pad, pad, pad))
    seen = set()
    for i in range(n):
        matches = set()
        for dy, dx in itertools.product(range(2 * pad + 1), repeat=2):
            crop = padded[i, :, dy : dy + h, dx : dx + w]
            matches |= {(dy, dx, False)} if torch.equal(out[i], crop) else set()
            matches |= {(dy, dx, True)} if torch.equal(out[i], crop.flip(-1)) else set()
        assert len(matches) == 1, f"sample {i} matches {matches}"
        seen |= matches
    # all offsets in [0, 2*pad]^2, mirrored or not, occur
    assert len(seen) == (2 * pad + 1) ** 2 * 2


def test_crop_without_flip_never_mirrors():
    pad, h, w = 2, 3, 3
    x = torch.randn(50, 1, h, w)
    out = random_crop_flip(x, pad=pad, flip=False, generator=_gen(3))
    padded = F.pad(x, (pad, pad, pad, pad))
    for i in range(len(x)):
        assert any(
            torch.equal(out[i], padded[i, :, dy : dy + h, dx : dx + w])
            for dy, dx in itertools.product(range(2 * pad + 1), repeat=2)
        )


def test_seeded_generator_is_deterministic():
    x = torch.randn(64, 3, 8, 8)
    a = random_crop_flip(x, generator=_gen(7))
    b = random_crop_flip(x, generator=_gen(7))
    c = random_crop_flip(x, generator=_gen(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_bad_input():
    with pytest.raises(UsageError):
        random_crop_flip(torch.randn(3, 8, 8))
    with pytest.raises(UsageError):
        random_crop_flip(torch.randn(2, 3, 8, 8), pad=-1)
    with pytest.raises(UsageError, match="generator"):
        random_crop_flip(torch.empty(2, 3, 8, 8, device="meta"), generator=_gen(0))


# ---------------------------------------------------------------- padding with black, not with the mean


def test_pad_fill_is_per_channel():
    x = torch.full((300, 3, 4, 4), 5.0)
    fill = torch.tensor([-1.0, -2.0, -3.0])
    out = random_crop_flip(x, pad=2, fill=fill, generator=_gen(4))
    for c in range(3):
        assert set(out[:, c].unique().tolist()) == {5.0, fill[c].item()}
    # No fill leaves torchvision's default: zeros.
    assert set(random_crop_flip(x, pad=2, generator=_gen(4)).unique().tolist()) == {0.0, 5.0}
    with pytest.raises(UsageError, match="fill"):
        random_crop_flip(x, pad=2, fill=torch.zeros(2))


def test_image_splits_record_where_black_lands(tmp_path):
    from test_data import _write_cifar10

    from sdd.data import load_dataset

    train_images, _, _ = _write_cifar10(tmp_path)
    s = load_dataset("cifar10", data_dir=str(tmp_path))  # no hold-out: the statistics are the whole pool's
    raw = train_images.astype("float64")
    mean, std = raw.mean(axis=(0, 2, 3)), raw.std(axis=(0, 2, 3))
    assert s.black is not None and s.black.shape == (3,)
    assert torch.allclose(s.black.double(), torch.from_numpy(-mean / std), atol=1e-5)
    assert load_dataset("mnist1d", train_size=20, test_size=10).black is None


def test_training_pads_with_the_black_of_its_data(store, tmp_path, monkeypatch):
    """Dense runs and pruning levels pad the normalised images with normalised black."""
    from test_data import _write_cifar10

    from conftest import tiny_train
    from sdd import training
    from sdd.chain import run_prune
    from sdd.config import PruneConfig
    from sdd.data import load_dataset
    from sdd.dense import run_train

    _write_cifar10(tmp_path / "cifar", per_batch=8)
    black = load_dataset("cifar10", data_dir=str(tmp_path / "cifar"), val_size=8).black
    fills = []

    def recording(x, **kwargs):
        fills.append(kwargs.get("fill"))
        return random_crop_flip(x, **kwargs)

    monkeypatch.setattr(training, "random_crop_flip", recording)
    cfg = tiny_train(dataset="cifar10", data_dir=str(tmp_path / "cifar"), train_size=None, test_size=None,
                     val_size=8, augment=True, model="cnn5", width=1, epochs=1, batch_size=16)
    parent = run_train(cfg).run_id
    run_prune(PruneConfig(parent=parent, levels=1, epochs=1, device="cpu", register=False))
    assert len(fills) == 2 * 2  # 32 images in batches of 16, one dense epoch and one level epoch
    assert all(f is not None and torch.equal(f, black) for f in fills)
