"""Checkpoint files: exact round trips, compact sparse files, refusal of unsafe or broken files."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from sdd.checkpoints import check_masks_fit, load_sparse, load_state, save_sparse, save_state
from sdd.errors import UsageError
from sdd.pruning import apply_masks, full_masks, magnitude_scores, prune_masks


def _conv_model() -> tuple[nn.Sequential, dict[str, nn.Parameter]]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10)
    )
    model(torch.randn(4, 3, 6, 6))  # gives BatchNorm non-trivial running statistics
    # channels_last strides must not change which value lands where.
    model[0].to(memory_format=torch.channels_last)
    return model, {"0.weight": model[0].weight, "4.weight": model[4].weight}


def _pruned(weights: dict[str, nn.Parameter], sparsity: float) -> dict[str, torch.Tensor]:
    masks = prune_masks(magnitude_scores(weights), full_masks(weights), sparsity, "global")
    apply_masks(weights, masks)
    return masks


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bytes, so comparisons are bit-exact (e.g. -0.0 differs from 0.0)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def test_state_round_trip_is_bit_identical(tmp_path: Path) -> None:
    model, _ = _conv_model()
    state = model.state_dict()
    save_state(state, tmp_path / "dense.pt")
    loaded = load_state(tmp_path / "dense.pt")
    assert list(loaded) == list(state)
    for name, t in state.items():
        assert loaded[name].dtype == t.dtype and loaded[name].device.type == "cpu"
        assert torch.equal(_bits(loaded[name]), _bits(t))


def test_save_state_writes_only_the_tensor_not_its_whole_buffer(tmp_path: Path) -> None:
    big = torch.randn(1_000_000)
    save_state({"w": big[:10]}, tmp_path / "view.pt")
    assert (tmp_path / "view.pt").stat().st_size < 10_000
    assert torch.equal(load_state(tmp_path / "view.pt")["w"], big[:10])


def test_sparse_round_trip_is_exact(tmp_path: Path) -> None:
    model, weights = _conv_model()
    masks = _pruned(weights, 0.8)
    state = model.state_dict()
    save_sparse(state, masks, tmp_path / "level.pt")
    loaded, loaded_masks = load_sparse(tmp_path / "level.pt")

    assert list(loaded) == list(state)
    assert set(loaded_masks) == set(masks)
    for name, mask in masks.items():
        assert loaded_masks[name].dtype == torch.bool and torch.equal(loaded_masks[name], mask)
    for name, t in state.items():
        assert loaded[name].dtype == t.dtype and loaded[name].shape == t.shape
        if name in masks:
            m = masks[name]
            assert torch.equal(_bits(loaded[name][m]), _bits(t[m]))
            assert torch.equal(_bits(loaded[name][~m]), _bits(torch.zeros_like(t[~m])))  # +0.0
        else:
            assert torch.equal(_bits(loaded[name]), _bits(t))

    restored, _ = _conv_model()
    restored.load_state_dict(loaded)
    restored.eval()
    model.eval()
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(restored(x), model(x))


def test_save_sparse_refuses_unmasked_nonzeros(tmp_path: Path) -> None:
    model, weights = _conv_model()
    masks = prune_masks(magnitude_scores(weights), full_masks(weights), 0.5, "global")
    with pytest.raises(ValueError, match="apply masks"):
        save_sparse(model.state_dict(), masks, tmp_path / "level.pt")


@pytest.mark.parametrize(("sparsity", "max_ratio"), [(0.9, 0.15), (0.99, 0.05)])
def test_sparse_file_is_compact(tmp_path: Path, sparsity: float, max_ratio: float) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1000, 1000), nn.ReLU(), nn.Linear(1000, 10))  # 1.01M weights
    weights = {"0.weight": model[0].weight, "2.weight": model[2].weight}
    masks = _pruned(weights, sparsity)
    save_state(model.state_dict(), tmp_path / "dense.pt")
    save_sparse(model.state_dict(), masks, tmp_path / "sparse.pt")
    ratio = (tmp_path / "sparse.pt").stat().st_size / (tmp_path / "dense.pt").stat().st_size
    assert ratio <= max_ratio


class _Payload:
    """Pickles to a call of os.system: loading it unsafely runs a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_does_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"0.weight": torch.zeros(2), "x": _Payload(marker)}, path)
    with pytest.raises(UsageError, match=f"checkpoint {path} is corrupt or not a state_dict"):
        load_state(path)
    with pytest.raises(UsageError, match=str(path)):
        load_sparse(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the unsafe load this module never does
    assert marker.exists()


def test_raw_pickle_payload_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(_Payload(marker), protocol=2))
    with pytest.raises(UsageError, match=str(path)):
        load_state(path)
    assert not marker.exists()


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_truncated_file_is_refused_naming_it(tmp_path: Path, sparse: bool) -> None:
    model, weights = _conv_model()
    path = tmp_path / "ckpt.pt"
    if sparse:
        save_sparse(model.state_dict(), _pruned(weights, 0.5), path)
    else:
        save_state(model.state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UsageError, match=f"checkpoint {path} is corrupt"):
        (load_sparse if sparse else load_state)(path)


def test_flipped_bits_in_tensor_data_are_detected(tmp_path: Path) -> None:
    path = tmp_path / "dense.pt"
    save_state({"w": torch.randn(100_000)}, path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the tensor bytes, where torch.load alone would not notice
    path.write_bytes(bytes(data))
    with pytest.raises(UsageError, match="CRC"):
        load_state(path)


def test_wrong_kind_of_file_is_refused(tmp_path: Path) -> None:
    model, weights = _conv_model()
    save_state(model.state_dict(), tmp_path / "dense.pt")
    save_sparse(model.state_dict(), _pruned(weights, 0.5), tmp_path / "sparse.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(UsageError, match="not an sdd sparse checkpoint"):
        load_sparse(tmp_path / "dense.pt")
    with pytest.raises(UsageError, match="not a state_dict"):
        load_state(tmp_path / "sparse.pt")
    with pytest.raises(UsageError, match="not a state_dict"):
        load_state(tmp_path / "list.pt")
    with pytest.raises(UsageError, match="does not exist"):
        load_state(tmp_path / "missing.pt")


def test_check_masks_fit(tmp_path: Path) -> None:
    _, weights = _conv_model()
    masks = full_masks(weights)
    check_masks_fit(masks, weights)
    wrong = dict(masks, **{"4.weight": torch.ones(10, 64, dtype=torch.bool)})
    with pytest.raises(UsageError, match=r"4\.weight.*\(10, 64\).*\(10, 128\)"):
        check_masks_fit(wrong, weights)
    with pytest.raises(UsageError, match="0.weight"):
        check_masks_fit({"4.weight": masks["4.weight"]}, weights)
    with pytest.raises(UsageError, match="extra.weight"):
        check_masks_fit(dict(masks, **{"extra.weight": torch.ones(2, dtype=torch.bool)}), weights)
    model, _ = _conv_model()
    with pytest.raises(UsageError, match=r"4\.weight"):
        save_sparse(model.state_dict(), wrong, tmp_path / "level.pt")
