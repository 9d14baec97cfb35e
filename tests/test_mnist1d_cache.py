"""The on-disk cache of generated MNIST-1D arrays (sdd.data): hits, verification, keys, fallbacks."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import pytest

from sdd import data

N, SEED = 37, 4242  # a stream no other test generates


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty cache folder as SDD_CACHE_DIR, with the in-process cache cleared around the test."""
    monkeypatch.setenv("SDD_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(data, "_UNWRITABLE_CACHE_WARNED", set())
    data._mnist1d_raw.cache_clear()
    yield tmp_path / "mnist1d"
    data._mnist1d_raw.cache_clear()


def _without_generating(n: int = N, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """The arrays as a new process would get them, failing if they are generated instead of read."""
    def refuse(*_args):
        raise AssertionError("generated, not read from the cache")

    data._mnist1d_raw.cache_clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, "_generate_mnist1d", refuse)
        return data._mnist1d_raw(n, seed)


def _assert_fresh(arrays: tuple[np.ndarray, np.ndarray], n: int = N, seed: int = SEED) -> None:
    x, y = arrays
    fresh_x, fresh_y = data._generate_mnist1d(n, seed)
    assert x.dtype == fresh_x.dtype and y.dtype == fresh_y.dtype
    assert np.array_equal(x, fresh_x) and np.array_equal(y, fresh_y)
    assert not x.flags.writeable and not y.flags.writeable


def _entries(cache: Path) -> list[Path]:
    return sorted(cache.iterdir())


def test_a_cache_hit_returns_the_generated_arrays(cache):
    _assert_fresh(data._mnist1d_raw(N, SEED))
    (entry,) = _entries(cache)
    assert entry.name.endswith(f"-s{SEED}-n{N}.npz")
    _assert_fresh(_without_generating())


def _flip_a_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # inside x's data
    path.write_bytes(bytes(raw))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _other_arrays_same_digest(path: Path) -> None:
    with np.load(path) as entry:
        fields = dict(entry)
    fields["x"] = fields["x"] + 1e-9  # a valid file whose arrays no longer match their recorded sha256
    np.savez(path, **fields)


def _another_streams_entry(path: Path) -> None:
    x, y = data._generate_mnist1d(N, SEED + 1)
    data._write_mnist1d_entry(path, x, y, SEED + 1, data._mnist1d_generator_version())


UNPICKLED: list[str] = []


def _record_unpickling() -> str:
    UNPICKLED.append("unpickled")
    return "payload"


class _Tripwire:
    def __reduce__(self):
        return _record_unpickling, ()


def _pickled(path: Path) -> None:
    with np.load(path) as entry:
        fields = dict(entry)
    fields["x"] = np.array([_Tripwire()], dtype=object)  # np.savez pickles object arrays
    np.savez(path, **fields)


@pytest.mark.parametrize("spoil", [_flip_a_byte, _truncate, _other_arrays_same_digest, _another_streams_entry,
                                   _pickled])
def test_a_bad_entry_is_detected_regenerated_and_rewritten(cache, caplog, spoil):
    data._mnist1d_raw(N, SEED)
    (entry,) = _entries(cache)
    spoil(entry)
    data._mnist1d_raw.cache_clear()
    with caplog.at_level(logging.WARNING, logger="sdd.data"):
        _assert_fresh(data._mnist1d_raw(N, SEED))
    assert any(str(entry) in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert _entries(cache) == [entry]  # rewritten in place, no temporary file left behind
    assert not UNPICKLED  # loading never runs a pickle's code
    _assert_fresh(_without_generating())


def test_different_arguments_and_generators_get_different_entries(cache, monkeypatch):
    for n, seed in ((N, SEED), (N + 5, SEED), (N, SEED + 1)):
        _assert_fresh(data._mnist1d_raw(n, seed), n, seed)
    assert len(_entries(cache)) == 3
    assert not np.array_equal(_without_generating(N, SEED)[0], _without_generating(N, SEED + 1)[0])

    # A changed generator (here: the file format, one part of the version digest) never reads old entries.
    monkeypatch.setattr(data, "_MNIST1D_CACHE_FORMAT", data._MNIST1D_CACHE_FORMAT + 1)
    monkeypatch.setattr(data, "_mnist1d_generator_version", data._mnist1d_generator_version.__wrapped__)
    with pytest.raises(AssertionError, match="generated, not read"):
        _without_generating(N, SEED)
    data._mnist1d_raw.cache_clear()
    _assert_fresh(data._mnist1d_raw(N, SEED))
    assert len(_entries(cache)) == 4


def test_a_shorter_request_is_served_by_a_longer_entry_of_its_stream(cache):
    data._mnist1d_raw(N + 13, SEED)
    _assert_fresh(_without_generating(N, SEED))
    assert len(_entries(cache)) == 1


def test_an_unwritable_cache_folder_warns_once_and_still_generates(cache, monkeypatch, tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("SDD_CACHE_DIR", str(blocker))
    with caplog.at_level(logging.WARNING, logger="sdd.data"):
        _assert_fresh(data._mnist1d_raw(N, SEED))
        _assert_fresh(data._mnist1d_raw(N, SEED + 1), N, SEED + 1)
    assert len([r for r in caplog.records if "cannot write" in r.getMessage()]) == 1


def test_concurrent_writers_of_one_entry_leave_a_good_file_readers_never_see_a_partial_one(cache):
    x, y = data._generate_mnist1d(N, SEED)
    version = data._mnist1d_generator_version()
    path = cache / f"{version}-s{SEED}-n{N}.npz"
    data._write_mnist1d_entry(path, x, y, SEED, version)
    done = threading.Event()

    def write() -> None:
        while not done.is_set():
            data._write_mnist1d_entry(path, x, y, SEED, version)

    writers = [threading.Thread(target=write) for _ in range(3)]
    for w in writers:
        w.start()
    try:
        reads = [data._read_mnist1d_entry(path, N, SEED, version, exact=True) for _ in range(200)]
    finally:
        done.set()
        for w in writers:
            w.join()
    assert all(r is not None and np.array_equal(r[0], x) for r in reads)
    assert _entries(cache) == [path]


def test_the_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SDD_CACHE_DIR", str(tmp_path / "mine"))
    assert data.mnist1d_cache_dir() == tmp_path / "mine" / "mnist1d"
    monkeypatch.delenv("SDD_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.mnist1d_cache_dir() == tmp_path / "xdg" / "sdd" / "mnist1d"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.mnist1d_cache_dir() == tmp_path / "home" / ".cache" / "sdd" / "mnist1d"


def test_the_test_session_caches_outside_the_home_folder():
    import os
    import tempfile

    # Set by conftest.py for the whole session (xdist workers and subprocesses inherit it).
    assert Path(os.environ["SDD_CACHE_DIR"]).is_relative_to(tempfile.gettempdir())
