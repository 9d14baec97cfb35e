"""Checkpoint files: plain state_dicts and compact sparse level artifacts.

Everything is written with `torch.save` as a plain dict of CPU tensors (plus str/int metadata) and
read back with ``weights_only=True``, so loading a file never runs code from it.
"""

from __future__ import annotations

import logging
import os
import zipfile
from typing import Any
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from sdd.errors import UsageError
from sdd.pruning import Masks

log = logging.getLogger(__name__)

SPARSE_FORMAT = "sdd.sparse"
SPARSE_VERSION = 1

PathLike = str | os.PathLike[str]


def _compact_cpu(t: torch.Tensor) -> torch.Tensor:
    """Detached CPU tensor that owns exactly its own data.

    torch.save writes a tensor's whole storage, so a view into a larger buffer would bloat the file.
    """
    t = t.detach().cpu()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


def _atomic_save(obj: dict, path: PathLike) -> None:
    # Write then rename, so a killed process never leaves a half-written file under the final name.
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        # Given a file object (not a path), torch names the archive's inner folder "archive"
        # instead of after the temporary file.
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _damaged_record(path: Path) -> str | None:
    """Name of the first zip record whose CRC32 does not match, if any.

    torch.load does not check the CRCs torch.save writes, so flipped bits inside tensor data would
    otherwise load silently as wrong weights.
    """
    with zipfile.ZipFile(path) as archive:
        # All-zero CRCs mean the writer skipped them (torch.serialization.set_crc32_options).
        if not any(info.CRC for info in archive.infolist()):
            return None
        return archive.testzip()


def _load(path: PathLike) -> object:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist or is not a file")
    try:
        if zipfile.is_zipfile(path):
            damaged = _damaged_record(path)
            if damaged is not None:
                raise ValueError(f"record {damaged} fails its CRC check")
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any failure to parse means the file cannot be trusted
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise UsageError(f"checkpoint {path} is corrupt or not a state_dict: {reason}") from exc


def _check_tensor_dict(obj: object, path: PathLike, what: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict):
        raise UsageError(
            f"checkpoint {path} is corrupt or not a state_dict: {what} is a {type(obj).__name__}"
        )
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise UsageError(
                f"checkpoint {path} is corrupt or not a state_dict: {what} entry {key!r} is a "
                f"{type(value).__name__}, not a tensor"
            )
    return obj


def save_state(state: Mapping[str, torch.Tensor], path: PathLike) -> None:
    """Save a state_dict as a plain dict of CPU tensors."""
    _atomic_save({name: _compact_cpu(t) for name, t in state.items()}, path)


def load_state(path: PathLike) -> dict[str, torch.Tensor]:
    """Load a file written by `save_state` (CPU tensors; never unpickles arbitrary objects)."""
    return _check_tensor_dict(_load(path), path, "the file")


def save_training_state(state: Mapping[str, Any], path: PathLike) -> None:
    """A resumable training state: nested dicts and lists of tensors and numbers (model, optimizer, RNG)."""
    _atomic_save(dict(state), path)


def load_training_state(path: PathLike) -> dict[str, Any]:
    obj = _load(path)
    if not isinstance(obj, dict) or not {"epoch", "step", "model", "optimizer"} <= obj.keys():
        raise UsageError(f"checkpoint {path} is not a training state (needs epoch, step, model, optimizer)")
    _check_tensor_dict(obj["model"], path, "its model state")
    return obj


def check_masks_fit(masks: Masks, weights: Mapping[str, torch.Tensor]) -> None:
    """Raise UsageError unless `masks` has exactly the layers of `weights`, with the same shapes."""
    for name in weights:
        if name not in masks:
            covered = ", ".join(masks) or "nothing"
            raise UsageError(f"layer {name} has no mask; the masks cover {covered}")
    for name, mask in masks.items():
        if name not in weights:
            raise UsageError(f"mask for layer {name} matches no weight of the model")
        if mask.shape != weights[name].shape:
            raise UsageError(
                f"mask for layer {name} has shape {tuple(mask.shape)} but the weight has shape "
                f"{tuple(weights[name].shape)}"
            )


def _pack(mask: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(mask.reshape(-1).numpy()))


def _unpack(packed: torch.Tensor, numel: int) -> torch.Tensor:
    if packed.dtype != torch.uint8 or packed.numel() != (numel + 7) // 8:
        raise ValueError(f"packed mask of {packed.numel()} {packed.dtype} for {numel} weights")
    return torch.from_numpy(np.unpackbits(packed.numpy(), count=numel).astype(bool))


def save_sparse(state: Mapping[str, torch.Tensor], masks: Masks, path: PathLike) -> None:
    """Save a pruned model's state_dict and masks compactly.

    Each masked tensor is stored as its bit-packed mask plus the values at kept positions; all other
    entries (biases, normalisation, unmasked layers) are stored as they are. Pruned positions must
    already be zero (masks applied); they load back as +0.0.
    """
    check_masks_fit(masks, {name: state[name] for name in masks if name in state})
    dense: dict[str, torch.Tensor] = {}
    sparse: dict[str, dict] = {}
    for name, t in state.items():
        if name not in masks:
            dense[name] = _compact_cpu(t)
            continue
        t = t.detach().cpu()
        mask = masks[name].detach().cpu().to(torch.bool)
        if torch.count_nonzero(t[~mask]) > 0:
            raise ValueError(f"weight {name} is nonzero where its mask is False; apply masks first")
        sparse[name] = {
            "shape": list(t.shape),
            "mask": _pack(mask),
            # Boolean indexing reads in logical (row-major) order whatever the tensor's strides.
            "values": t[mask],
        }
    _atomic_save(
        {
            "format": SPARSE_FORMAT,
            "version": SPARSE_VERSION,
            "order": list(state),
            "dense": dense,
            "sparse": sparse,
        },
        path,
    )


def load_sparse(path: PathLike) -> tuple[dict[str, torch.Tensor], Masks]:
    """Load a file written by `save_sparse`: the full state_dict and the bool masks."""
    obj = _load(path)
    if not isinstance(obj, dict) or obj.get("format") != SPARSE_FORMAT:
        raise UsageError(f"checkpoint {path} is not an sdd sparse checkpoint ({SPARSE_FORMAT})")
    if obj.get("version") != SPARSE_VERSION:
        raise UsageError(
            f"checkpoint {path} has sparse format version {obj.get('version')!r}; this sdd reads "
            f"version {SPARSE_VERSION}"
        )
    state = dict(_check_tensor_dict(obj.get("dense"), path, "'dense'"))
    try:
        masks: Masks = {}
        for name, entry in obj["sparse"].items():
            shape = torch.Size(entry["shape"])
            mask = _unpack(entry["mask"], shape.numel()).reshape(shape)
            values = entry["values"]
            weight = torch.zeros(shape, dtype=values.dtype)
            weight[mask] = values
            state[name] = weight
            masks[name] = mask
        if sorted(obj["order"]) != sorted(state):
            raise ValueError("the stored key order does not list the stored tensors")
        state = {name: state[name] for name in obj["order"]}
    except Exception as exc:  # inconsistent fields: the file was damaged or hand-edited
        reason = " ".join(str(exc).split())[:300]
        raise UsageError(f"checkpoint {path} is corrupt: {type(exc).__name__} {reason}") from exc
    log.debug("loaded sparse checkpoint %s (%d masked tensors)", path, len(masks))
    return state, masks
