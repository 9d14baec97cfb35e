"""Batched data augmentation on the training device (no per-sample Python work)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sdd.errors import UsageError


def random_crop_flip(
    x: torch.Tensor, *, pad: int = 4, flip: bool = True, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random pad-crop and horizontal flip of an image batch ``x`` of shape (N, C, H, W).

    Each sample is zero-padded by ``pad`` on every side (torchvision's ``RandomCrop(padding=pad)``
    default), cropped back to H x W at an offset drawn uniformly from [0, 2*pad] in each dimension,
    and, if ``flip``, mirrored left-right with probability 1/2. ``generator`` (on x's device) makes
    the draws reproducible. With ``pad=0`` and ``flip=False`` x itself is returned.
    """
    if x.dim() != 4:
        raise UsageError(f"random_crop_flip needs a batch of shape (N, C, H, W), got {tuple(x.shape)}")
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        raise UsageError(f"pad must be an integer >= 0, got {pad!r}")
    if generator is not None and generator.device != x.device:
        raise UsageError(f"generator is on {generator.device} but the batch on {x.device}; they must match")
    n, _, h, w = x.shape
    out = x
    if pad > 0:
        offsets = torch.randint(0, 2 * pad + 1, (n, 2), device=x.device, generator=generator)
        padded = F.pad(x, (pad, pad, pad, pad))
        # Every H x W window of the padded batch as a strided view (N, C, 2p+1, 2p+1, H, W): picking one
        # window per sample is then a single gather. On CPU it measured 2-3x faster than looping over the
        # offsets with boolean masks; on a GPU it also avoids the masks' host syncs and per-offset launches.
        windows = padded.unfold(2, h, 1).unfold(3, w, 1).permute(0, 2, 3, 1, 4, 5)
        out = windows[torch.arange(n, device=x.device), offsets[:, 0], offsets[:, 1]]
    if flip:
        flipped = torch.rand(n, device=x.device, generator=generator) < 0.5
        out = torch.where(flipped[:, None, None, None], out.flip(-1), out)
    return out
