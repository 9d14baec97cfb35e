"""Checkpoint files: exact round trips, compact sparse files, refusal of unsafe or broken files."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from sdd.checkpoints import check_masks_fit, load_sparse, load_state, read_level_payload, save_sparse, save_state
from sdd.errors import UsageError
from sdd.models import build_model, prunable_weights
from sdd.pruning import apply_masks, full_masks, magnitude_scores, prune_masks

DATA = Path(__file__).parent / "data"


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


def _stored(path: Path) -> dict:
    """The dict a level file holds, as torch.load reads it from the inflated stream."""
    return torch.load(io.BytesIO(read_level_payload(path)), weights_only=True)


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


def _mixed_state() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A state_dict that uses every index kind and odd dtypes, with the masks it was pruned by."""
    model, weights = _conv_model()
    masks = _pruned(weights, 0.9)
    big = nn.Linear(300, 300)  # 90,000 weights: too many for uint16 positions
    weights["big.weight"] = big.weight
    masks["big.weight"] = torch.rand(big.weight.shape) < 0.01  # uint32 positions: 4 bytes x ~1%, < 1 bit
    masks["0.weight"][:] = True  # a layer kept whole: the bitmask is its smallest index
    masks["4.weight"][:] = False  # a layer pruned away: no index bytes, no values
    with torch.no_grad():
        for name, mask in masks.items():  # +0.0 where pruned (apply_masks leaves -0.0 for negative weights)
            weights[name].masked_fill_(~mask, 0.0)
        kept = masks["big.weight"].nonzero()[:2]
        big.weight[tuple(kept[0])] = -0.0  # kept zeros load with their sign, unlike pruned positions
        big.weight[tuple(kept[1])] = 0.0
    state = {**model.state_dict(), "big.weight": big.weight.detach(), "big.bias": big.bias.detach(),
             "extra.half": torch.randn(3, 2).half(), "extra.bfloat": torch.randn(5).bfloat16(),
             "extra.flags": torch.tensor([True, False, True]), "extra.scalar": torch.tensor(2.5, dtype=torch.float64),
             "extra.empty": torch.empty(0, 4)}
    return state, masks


def test_level_round_trip_is_bit_identical(tmp_path: Path) -> None:
    state, masks = _mixed_state()
    assert state["1.num_batches_tracked"].dtype == torch.int64 and state["1.num_batches_tracked"] == 1
    path = tmp_path / "level.pt"
    save_sparse(state, masks, path)
    stored = _stored(path)
    assert stored["version"] == 3
    assert {name: kind for name, (kind, _) in stored["masked"].items()} == {
        "0.weight": "bits", "4.weight": "u16", "big.weight": "u32"}
    assert stored["masked"]["4.weight"][1] == 0

    loaded, loaded_masks = load_sparse(path)
    assert list(loaded) == list(state)
    for name, t in state.items():
        got = loaded[name]
        assert (got.dtype, got.shape) == (t.dtype, t.shape), name
        assert torch.equal(_bits(got), _bits(t)), name
        assert got.untyped_storage().nbytes() == got.numel() * got.element_size(), name  # not a view of the file
    for name, mask in masks.items():
        assert loaded_masks[name].dtype == torch.bool and torch.equal(loaded_masks[name], mask)


def test_pruned_negative_zeros_load_as_positive_zeros(tmp_path: Path) -> None:
    weight = torch.tensor([[-0.0, 1.5], [-2.0, -0.0]])
    mask = torch.tensor([[False, True], [True, False]])
    save_sparse({"w": weight}, {"w": mask}, tmp_path / "level.pt")
    loaded, _ = load_sparse(tmp_path / "level.pt")
    assert torch.equal(_bits(loaded["w"]), _bits(torch.tensor([[0.0, 1.5], [-2.0, 0.0]])))


def test_v1_level_file_still_loads() -> None:
    """tests/data/level_v1.pt was written by the version-1 save_sparse (commit c8a1d2b) from a pruned
    Conv2d(2, 3, 3) + BatchNorm2d(3) + Linear(12, 4); level_v1_expected.pt holds that state and masks."""
    assert torch.load(DATA / "level_v1.pt", weights_only=True)["version"] == 1
    expected = load_state(DATA / "level_v1_expected.pt")
    state, masks = load_sparse(DATA / "level_v1.pt")
    assert list(state) == [k.removeprefix("state/") for k in expected if k.startswith("state/")]
    for name, t in state.items():
        want = expected[f"state/{name}"]
        assert (t.dtype, t.shape) == (want.dtype, want.shape) and torch.equal(_bits(t), _bits(want)), name
    assert set(masks) == {"0.weight", "4.weight"}
    for name, mask in masks.items():
        assert torch.equal(mask, expected[f"mask/{name}"])


def test_v2_level_file_still_loads() -> None:
    """tests/data/level_v2.pt was written by the version-2 save_sparse (commit 358613d) from a pruned
    Conv2d(2, 3, 3) + BatchNorm2d(3) + Linear(12, 4) + Linear(4, 4) and two half-precision extras: a bitmask,
    a uint16 index and a layer pruned away. level_v2_expected.pt holds that state and masks."""
    stored = torch.load(DATA / "level_v2.pt", weights_only=True)
    assert stored["version"] == 2
    assert stored["masked"] == {"0.weight": ["bits", 21], "4.weight": ["u16", 2], "5.weight": ["u16", 0]}
    expected = load_state(DATA / "level_v2_expected.pt")
    state, masks = load_sparse(DATA / "level_v2.pt")
    assert list(state) == [k.removeprefix("state/") for k in expected if k.startswith("state/")]
    for name, t in state.items():
        want = expected[f"state/{name}"]
        assert (t.dtype, t.shape) == (want.dtype, want.shape) and torch.equal(_bits(t), _bits(want)), name
    assert set(masks) == {k.removeprefix("mask/") for k in expected if k.startswith("mask/")}
    for name, mask in masks.items():
        assert torch.equal(mask, expected[f"mask/{name}"])


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


def test_small_resnet_level_file_at_99_percent_is_within_5_percent(tmp_path: Path) -> None:
    """ResNet-18 width 8 (176k parameters, 101 bias and BatchNorm tensors): version 1 took 10.7%."""
    torch.manual_seed(0)
    model = build_model("resnet18", width=8, input_shape=(3, 32, 32), num_classes=10)
    weights = prunable_weights(model)
    masks = _pruned(weights, 0.99)
    save_state(model.state_dict(), tmp_path / "dense.pt")
    save_sparse(model.state_dict(), masks, tmp_path / "sparse.pt")
    assert (tmp_path / "sparse.pt").stat().st_size <= 0.05 * (tmp_path / "dense.pt").stat().st_size


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


def test_flipped_bits_in_a_level_file_are_detected(tmp_path: Path) -> None:
    state, masks = _mixed_state()
    path = tmp_path / "level.pt"
    save_sparse(state, masks, path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the deflated tensor bytes
    path.write_bytes(bytes(data))
    with pytest.raises(UsageError, match="CRC"):
        load_sparse(path)


def test_every_flipped_byte_and_every_truncation_of_a_level_file_is_refused(tmp_path: Path) -> None:
    """Not one byte of the file goes unchecked: the tag, the CRC and the deflated stream."""
    mask = torch.tensor([[True, False, False], [False, False, True]])
    linear = {"0.weight": torch.tensor([[0.5, 0.0, 0.0], [0.0, 0.0, -2.0]]), "0.bias": torch.tensor([1.0, -1.0])}
    path = tmp_path / "level.pt"
    save_sparse(linear, {"0.weight": mask}, path)
    data = path.read_bytes()
    for at in range(len(data)):
        flipped = bytearray(data)
        flipped[at] ^= 0x10
        path.write_bytes(bytes(flipped))
        with pytest.raises(UsageError, match=f"checkpoint {path} is"):
            load_sparse(path)
    for length in range(len(data)):
        path.write_bytes(data[:length])
        with pytest.raises(UsageError, match=f"checkpoint {path} is"):
            load_sparse(path)


@pytest.mark.parametrize("edit", ["kept count", "trailing byte", "dtype", "positions"])
def test_inconsistent_level_file_is_refused(tmp_path: Path, edit: str) -> None:
    """A file whose fields disagree (hand-edited, or written by a broken writer: CRCs pass) is refused."""
    state, masks = _mixed_state()
    path = tmp_path / "level.pt"
    save_sparse(state, masks, path)
    stored = _stored(path)
    if edit == "kept count":
        stored["masked"]["big.weight"][1] += 1
    elif edit == "trailing byte":
        stored["data"] = torch.cat([stored["data"], torch.zeros(1, dtype=torch.uint8)])
    elif edit == "dtype":
        stored["dtypes"][0] = "load"
    else:  # swap the two uint16 positions of a layer's index: its values would land in each other's places
        mask = torch.zeros(100, dtype=torch.bool)
        mask[[3, 7]] = True
        save_sparse({"w": mask * 2.0}, {"w": mask}, path)
        stored = _stored(path)
        assert stored["masked"]["w"] == ["u16", 2]
        stored["data"][:4] = stored["data"][[2, 3, 0, 1]]
    torch.save(stored, path)  # the fields are read alike from either container, zip or deflated
    with pytest.raises(UsageError, match=f"checkpoint {path} is corrupt"):
        load_sparse(path)


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
