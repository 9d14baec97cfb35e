"""Checkpoint files: plain state_dicts and compact sparse level artifacts.

Everything is written with `torch.save` as a plain dict of CPU tensors (plus str/int metadata) and
read back with ``weights_only=True``, so loading a file never runs code from it. Level files wrap torch's
stream in a deflated, CRC-checked container (see "sparse level files" below).
"""

from __future__ import annotations

import io
import logging
import math
import os
import sys
import zipfile
import zlib
from typing import Any
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

from sdd.errors import UsageError
from sdd.pruning import Masks

log = logging.getLogger(__name__)

SPARSE_FORMAT = "sdd.sparse"
SPARSE_VERSION = 3  # the version save_sparse writes; load_sparse also reads 1 and 2

PathLike = str | os.PathLike[str]


def _compact_cpu(t: torch.Tensor) -> torch.Tensor:
    """Detached CPU tensor that owns exactly its own data.

    torch.save writes a tensor's whole storage, so a view into a larger buffer would bloat the file.
    """
    t = t.detach().cpu()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


def _atomic_write(path: PathLike, write: Callable[[io.BufferedWriter], object]) -> None:
    # Write then rename, so a killed process never leaves a half-written file under the final name.
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_save(obj: dict, path: PathLike) -> None:
    # Given a file object (not a path), torch names the archive's inner folder "archive" instead of after
    # the temporary file.
    _atomic_write(path, lambda f: torch.save(obj, f))


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
        with open(path, "rb") as f:
            deflated = f.read(len(_DEFLATED_TAG)) == _DEFLATED_TAG
        if deflated:
            return torch.load(io.BytesIO(_inflate(path.read_bytes())), map_location="cpu", weights_only=True)
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


# --- sparse level files ---------------------------------------------------------------------------
#
# The dict (versions 2 and 3): one uint8 tensor `data` holds every byte, and plain lists describe it. Per
# entry of the state_dict, in order: a masked weight contributes its index then its kept values (row-major
# order), every other tensor its raw bytes. The index of a layer is whichever is smallest: the bit-packed
# mask (numel/8 bytes) or the kept positions as little-endian uint16 (layers of at most 65,536 weights) or
# uint32. One tensor rather than one per entry matters because torch.save spends ~250 bytes per tensor in
# its zip: as separate tensors, the 25 bias and BatchNorm tensors of cnn5 width 8 (2.5 KB of numbers) would
# bring ~6 KB of headers. Entries are not padded: loading copies each one into memory of its own.
#
# The container: version 2 is torch.save's zip. Version 3 is _DEFLATED_TAG, the CRC32 of the rest (4 bytes,
# little-endian), then torch.save's legacy (non-zip) stream of the dict, raw-deflated with the preset
# dictionary _ZDICT. The zip's records, 64-byte alignment and central directory cost ~1.4 KB whatever the
# file holds: 6.5% of the dense file of the quick preset's MLP before any weight. The legacy stream costs
# ~340 bytes of fixed header and tensor record, which _ZDICT (those bytes and the usual words of state_dict
# names) shrinks to a few back-references. The CRC covers every byte after the tag, so a flipped byte or a
# truncation there is refused before anything is inflated or unpickled; a damaged tag leaves a file that is
# neither a zip nor a legacy stream, which torch.load refuses.
# Version 1 (read only, zip): per masked weight a dict of shape, packed mask and values; other tensors as-is.

_BITS = "bits"
_POSITIONS = {"u16": np.dtype("<u2"), "u32": np.dtype("<u4")}
_READABLE_VERSIONS = (1, 2, SPARSE_VERSION)

_DEFLATED_TAG = b"sdd.pt+deflate\n"
DEFLATED_HEADER_BYTES = len(_DEFLATED_TAG) + 4  # the tag and the CRC32 in front of the deflated stream
# Part of format version 3: a file deflated with one dictionary inflates only with the same one, so these
# bytes never change (a better dictionary needs a new version). Which bytes they are affects only how well
# files compress. torch.save's legacy stream starts with its header (magic number, protocol version,
# system info); the dict's keys, the state_dict words and the uint8 tensor's record follow.
_ZDICT = (
    b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19.\x80\x02M\xe9\x03.\x80\x02}q\x00(X\x10\x00\x00\x00protocol_versionq"
    b"\x01M\xe9\x03X\r\x00\x00\x00little_endianq\x02\x88X\n\x00\x00\x00type_sizesq\x03}q\x04(X\x05\x00\x00\x00shortq"
    b"\x05K\x02X\x03\x00\x00\x00intq\x06K\x04X\x04\x00\x00\x00longq\x07K\x04uu."
    b"\x80\x02}q\x00(X\x06\x00\x00\x00formatq\x01X\n\x00\x00\x00sdd.sparseq\x02X\x07\x00\x00\x00versionq\x03K\x03"
    b"X\t\x00\x00\x00byteorderq\x04X\x06\x00\x00\x00littleq\x05X\x05\x00\x00\x00orderq\x06]q\x07(X"
    b".weightq .biasq .running_meanq .running_varq .num_batches_trackedq conv linear layer shortcut downsample "
    b"bn fc features classifier X\x06\x00\x00\x00dtypesq X\x07\x00\x00\x00float32q X\x05\x00\x00\x00int64q "
    b"X\x06\x00\x00\x00shapesq X\x06\x00\x00\x00maskedq X\x04\x00\x00\x00bitsq X\x03\x00\x00\x00u16q u32q "
    b"X\x04\x00\x00\x00dataq ctorch._utils\n_rebuild_tensor_v2\nq ((X\x07\x00\x00\x00storageq ctorch\nByteStorage\nq "
    b"X\x0e\x00\x00\x00 X\x03\x00\x00\x00cpuq K\x00 \x85q K\x01\x85q \x89ccollections\nOrderedDict\nq )Rq tq Rq "
    b"u.\x80\x02]q\x00X\x0e\x00\x00\x00 q\x01a."
)


def _deflate(payload: bytes) -> bytes:
    # Level 1: within 1.5% of level 6's size at half its time (6 MB of ResNet-18 weights: 0.37 s against 0.81 s).
    compressor = zlib.compressobj(1, zlib.DEFLATED, -15, zdict=_ZDICT)  # -15: raw deflate, the CRC is ours
    body = compressor.compress(payload) + compressor.flush()
    return _DEFLATED_TAG + zlib.crc32(body).to_bytes(4, "little") + body


def _inflate(raw: bytes) -> bytes:
    """The stream _deflate wrapped in `raw`; ValueError where the CRC or the deflate stream is broken."""
    crc, body = raw[len(_DEFLATED_TAG):DEFLATED_HEADER_BYTES], raw[DEFLATED_HEADER_BYTES:]
    if len(crc) < 4 or zlib.crc32(body) != int.from_bytes(crc, "little"):
        raise ValueError("the deflated stream fails its CRC check (damaged or truncated)")
    inflater = zlib.decompressobj(-15, zdict=_ZDICT)
    payload = inflater.decompress(body)
    if not inflater.eof or inflater.unused_data:
        raise ValueError("the deflated stream does not end where the file does")
    return payload


def read_level_payload(path: PathLike) -> bytes:
    """The torch.save stream inside a level file written by `save_sparse` (to account for its bytes)."""
    raw = Path(path).read_bytes()
    if not raw.startswith(_DEFLATED_TAG):
        raise UsageError(f"checkpoint {path} is not a deflated level file (version {SPARSE_VERSION})")
    try:
        return _inflate(raw)
    except ValueError as exc:
        raise UsageError(f"checkpoint {path} is corrupt: {exc}") from exc


def _index_kind(numel: int, kept: int) -> str:
    """The smallest index of a layer with `numel` weights of which `kept` are kept."""
    sizes = {_BITS: (numel + 7) // 8}
    if numel <= 1 << 16:
        sizes["u16"] = 2 * kept
    elif numel <= 1 << 32:
        sizes["u32"] = 4 * kept
    return min(sizes, key=sizes.__getitem__)


def _index_bytes(kind: str, mask: np.ndarray, positions: np.ndarray) -> bytes:
    if kind == _BITS:
        return np.packbits(mask).tobytes()
    return positions.astype(_POSITIONS[kind]).tobytes()


def _index_size(kind: str, numel: int, kept: int) -> int:
    return (numel + 7) // 8 if kind == _BITS else kept * _POSITIONS[kind].itemsize


def _index_positions(kind: str, raw: np.ndarray, numel: int, kept: int) -> np.ndarray:
    """The kept flat positions (int64, increasing) an index encodes; ValueError where it does not describe
    `kept` of `numel` weights."""
    if kind == _BITS:
        positions = np.flatnonzero(np.unpackbits(raw, count=numel))
    else:
        positions = raw.view(_POSITIONS[kind]).astype(np.int64)
        # Strictly increasing positions keep the values in the row-major order they were written in.
        if positions.size and (positions[-1] >= numel or np.any(np.diff(positions) <= 0)):
            raise ValueError(f"{kind} positions are not increasing and below {numel}")
    if positions.size != kept:
        raise ValueError(f"a {kind} index of {positions.size} kept weights where {kept} are listed")
    return positions


def _raw(t: torch.Tensor) -> bytes:
    """A tensor's bytes in row-major order (any dtype, including bfloat16 and bool)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _dtype(name: object) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def save_sparse(state: Mapping[str, torch.Tensor], masks: Masks, path: PathLike) -> None:
    """Save a pruned model's state_dict and masks compactly (format version 3).

    Masked tensors keep only their values at kept positions plus the smallest index of those positions;
    every other entry (biases, normalisation parameters and buffers, unmasked layers) is stored whole.
    Loading gives back every dtype, shape and bit, except that pruned positions, which must already be
    zero (masks applied), load as +0.0: `apply_masks` leaves -0.0 where the weight was negative, and
    keeping that sign would cost one bit per pruned weight, as much as a bitmask.
    """
    check_masks_fit(masks, {name: state[name] for name in masks if name in state})
    chunks: list[bytes] = []
    dtypes: list[str] = []
    shapes: list[list[int]] = []
    masked: dict[str, list] = {}
    dtype_names: dict[torch.dtype, str] = {}  # one str object per dtype: pickle then stores each name once
    for name, t in state.items():
        t = t.detach().cpu()
        dtypes.append(dtype_names.setdefault(t.dtype, str(t.dtype).removeprefix("torch.")))
        shapes.append(list(t.shape))
        if name not in masks:
            chunks.append(_raw(t))
            continue
        # Flattening a contiguous copy reads in logical (row-major) order whatever the tensor's strides.
        flat_weight = t.contiguous().reshape(-1)
        flat_mask = masks[name].detach().cpu().to(torch.bool).contiguous().reshape(-1)
        if torch.any(flat_weight.ne(0) & ~flat_mask):  # NaN counts as nonzero too
            raise ValueError(f"weight {name} is nonzero where its mask is False; apply masks first")
        mask = flat_mask.numpy()
        positions = np.flatnonzero(mask)
        kind = _index_kind(mask.size, positions.size)
        masked[name] = [kind, positions.size]
        chunks.append(_index_bytes(kind, mask, positions))
        # Gathering by position and the elementwise check above took save_sparse of an 11M-weight ResNet-18
        # from 4.4 s (boolean indexing) to 1.0 s.
        chunks.append(_raw(flat_weight[torch.from_numpy(positions)]))
    data = torch.from_numpy(np.frombuffer(bytearray(b"".join(chunks)), dtype=np.uint8))
    stream = io.BytesIO()
    torch.save(
        {
            "format": SPARSE_FORMAT,
            "version": SPARSE_VERSION,
            "byteorder": sys.byteorder,  # `data` holds tensors' bytes in this machine's order
            "order": list(state),
            "dtypes": dtypes,
            "shapes": shapes,
            "masked": masked,
            "data": data,
        },
        stream,
        _use_new_zipfile_serialization=False,
    )
    _atomic_write(path, lambda f: f.write(_deflate(stream.getvalue())))


def _read_packed(obj: dict) -> tuple[dict[str, torch.Tensor], Masks]:
    """Versions 2 and 3, which differ only in their container."""
    if obj["byteorder"] != sys.byteorder:
        raise ValueError(f"written on a {obj['byteorder']}-endian machine; this one is {sys.byteorder}-endian")
    data = obj["data"]
    if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or data.dim() != 1:
        raise ValueError("'data' is not a flat uint8 tensor")
    raw = data.numpy()
    order, dtypes, shapes, masked = obj["order"], obj["dtypes"], obj["shapes"], obj["masked"]
    if not len(order) == len(dtypes) == len(shapes) or not set(masked) <= set(order):
        raise ValueError("the entry lists do not describe the same tensors")
    offset = 0

    def take(nbytes: int) -> torch.Tensor:
        """The next `nbytes` of `data`, copied so that each tensor owns its own (aligned) memory."""
        nonlocal offset
        if offset + nbytes > raw.size:
            raise ValueError(f"'data' ends at byte {raw.size}, before the {nbytes} bytes needed at {offset}")
        chunk = torch.empty(nbytes, dtype=torch.uint8)
        chunk.numpy()[:] = raw[offset:offset + nbytes]
        offset += nbytes
        return chunk

    state: dict[str, torch.Tensor] = {}
    masks: Masks = {}
    for name, dtype_name, shape in zip(order, dtypes, shapes):
        dtype = _dtype(dtype_name)
        numel = math.prod(shape)
        itemsize = torch.empty((), dtype=dtype).element_size()
        if name not in masked:
            state[name] = take(numel * itemsize).view(dtype).reshape(shape)
            continue
        kind, kept = masked[name]
        if kind != _BITS and kind not in _POSITIONS:
            raise ValueError(f"unknown index kind {kind!r} for {name}")
        index = take(_index_size(kind, numel, kept)).numpy()
        positions = torch.from_numpy(_index_positions(kind, index, numel, kept))
        weight = torch.zeros(numel, dtype=dtype)
        weight[positions] = take(kept * itemsize).view(dtype)
        mask = torch.zeros(numel, dtype=torch.bool)
        mask[positions] = True
        state[name] = weight.reshape(shape)
        masks[name] = mask.reshape(shape)
    if offset != raw.size:
        raise ValueError(f"'data' has {raw.size - offset} bytes that no entry describes")
    return state, masks


def _read_v1(obj: dict, path: PathLike) -> tuple[dict[str, torch.Tensor], Masks]:
    state = dict(_check_tensor_dict(obj.get("dense"), path, "'dense'"))
    masks: Masks = {}
    for name, entry in obj["sparse"].items():
        shape = torch.Size(entry["shape"])
        packed = entry["mask"]
        if packed.dtype != torch.uint8 or packed.numel() != (shape.numel() + 7) // 8:
            raise ValueError(f"packed mask of {packed.numel()} {packed.dtype} for {shape.numel()} weights")
        mask = torch.from_numpy(np.unpackbits(packed.numpy(), count=shape.numel()).astype(bool)).reshape(shape)
        values = entry["values"]
        weight = torch.zeros(shape, dtype=values.dtype)
        weight[mask] = values
        state[name] = weight
        masks[name] = mask
    if sorted(obj["order"]) != sorted(state):
        raise ValueError("the stored key order does not list the stored tensors")
    return {name: state[name] for name in obj["order"]}, masks


def load_sparse(path: PathLike) -> tuple[dict[str, torch.Tensor], Masks]:
    """Load a file written by `save_sparse` (format version 1, 2 or 3): the full state_dict and the bool masks."""
    obj = _load(path)
    if not isinstance(obj, dict) or obj.get("format") != SPARSE_FORMAT:
        raise UsageError(f"checkpoint {path} is not an sdd sparse checkpoint ({SPARSE_FORMAT})")
    version = obj.get("version")
    if version not in _READABLE_VERSIONS:
        raise UsageError(
            f"checkpoint {path} has sparse format version {version!r}; this sdd reads versions "
            f"{', '.join(map(str, _READABLE_VERSIONS))}"
        )
    try:
        state, masks = _read_v1(obj, path) if version == 1 else _read_packed(obj)
    except UsageError:
        raise
    except Exception as exc:  # inconsistent fields: the file was damaged or hand-edited
        reason = " ".join(str(exc).split())[:300]
        raise UsageError(f"checkpoint {path} is corrupt: {type(exc).__name__} {reason}") from exc
    log.debug("loaded sparse checkpoint %s (version %d, %d masked tensors)", path, version, len(masks))
    return state, masks
