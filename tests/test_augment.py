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
