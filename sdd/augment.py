"""Batched data augmentation on the training device (no per-sample Python work)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sdd.errors import UsageError


def random_crop_flip(
    x: torch.Tensor, *, pad: int = 4, flip: bool = True, fill: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random pad-crop and horizontal flip of an image batch ``x`` of shape (N, C, H, W).

    Each sample is padded by ``pad`` on every side with ``fill`` (one value per channel; None: 0),
    cropped back to H x W at an offset drawn uniformly from [0, 2*pad] in each dimension, and, if
    ``flip``, mirrored left-right with probability 1/2. torchvision's ``RandomCrop(padding=pad)``, He
    et al. and DSD2 pad the raw images with black; for normalised images pass where black lands
    (``Splits.black``), since a 0 there is the mean colour. ``generator`` (on x's device) makes the
    draws reproducible. With ``pad=0`` and ``flip=False`` x itself is returned.
    """
    if x.dim() != 4:
        raise UsageError(f"random_crop_flip needs a batch of shape (N, C, H, W), got {tuple(x.shape)}")
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        raise UsageError(f"pad must be an integer >= 0, got {pad!r}")
    if generator is not None and generator.device != x.device:
        raise UsageError(f"generator is on {generator.device} but the batch on {x.device}; they must match")
    n, c, h, w = x.shape
    if fill is not None and fill.shape != (c,):
        raise UsageError(f"fill must hold one value per channel ({c}), got shape {tuple(fill.shape)}")
    out = x
    if pad > 0:
        offsets = torch.randint(0, 2 * pad + 1, (n, 2), device=x.device, generator=generator)
        if fill is None:
            padded = F.pad(x, (pad, pad, pad, pad))
        else:
            # Written around x, not x - fill + fill: the image pixels stay bit-exact.
            padded = fill.to(x.device, x.dtype).view(1, c, 1, 1).expand(n, c, h + 2 * pad, w + 2 * pad).clone()
            padded[:, :, pad:pad + h, pad:pad + w] = x
        # Every H x W window of the padded batch as a strided view (N, C, 2p+1, 2p+1, H, W): picking one
        # window per sample is then a single gather. On CPU it measured 2-3x faster than looping over the
        # offsets with boolean masks; on a GPU it also avoids the masks' host syncs and per-offset launches.
        windows = padded.unfold(2, h, 1).unfold(3, w, 1).permute(0, 2, 3, 1, 4, 5)
        out = windows[torch.arange(n, device=x.device), offsets[:, 0], offsets[:, 1]]
    if flip:
        flipped = torch.rand(n, device=x.device, generator=generator) < 0.5
        out = torch.where(flipped[:, None, None, None], out.flip(-1), out)
    return out
