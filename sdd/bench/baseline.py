"""The plain PyTorch way of training, as the reference implementations do it: `sdd bench`'s baseline.

A `DataLoader` over the dataset with per-sample torchvision transforms for images, every batch copied
to the device, masks applied with `torch.nn.utils.prune`. The project's own training never uses this
module; it exists so that the benchmark compares `sdd.training.fit` against the usual loop doing the
same work with the same model, optimizer and batch size. `train_grid_share` is the plain script of a
width x seed grid that `sdd bench` runs in N processes side by side against the same grid as a sweep.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune
from torch.utils.data import DataLoader, Dataset


class TensorImages(Dataset):
    """(x[i], y[i]) with an optional per-sample transform of x[i], like torchvision's CIFAR datasets."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform: nn.Module | None = None) -> None:
        self.x, self.y, self.transform = x, y, transform

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.x[i]
        return (self.transform(x) if self.transform is not None else x), self.y[i]


def crop_flip(height: int, width: int, pad: int = 4) -> nn.Module:
    """The reference CIFAR augmentation: RandomCrop(size, padding=pad) then RandomHorizontalFlip."""
    # Imported here: torchvision costs seconds to import, and the plain grid processes never augment.
    from torchvision.transforms import v2

    return v2.Compose([v2.RandomCrop((height, width), padding=pad), v2.RandomHorizontalFlip()])


def make_loader(x: torch.Tensor, y: torch.Tensor, batch_size: int, *, augment: bool, workers: int,
                device: torch.device) -> DataLoader:
    """A shuffling DataLoader over CPU tensors; `batch_size` 0 means the whole set in one batch."""
    transform = crop_flip(x.shape[-2], x.shape[-1]) if augment else None
    return DataLoader(TensorImages(x.cpu(), y.cpu(), transform), batch_size=batch_size or len(x), shuffle=True,
                      num_workers=workers, persistent_workers=workers > 0, pin_memory=device.type == "cuda")


def train(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, epochs: int,
          device: torch.device, *, autocast: bool = False) -> int:
    """The usual epoch loop; returns the number of optimizer steps taken."""
    model.train()
    steps = 0
    for _ in range(epochs):
        for xb, yb in loader:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                logits = model(xb)
            loss = F.cross_entropy(logits.float(), yb)
            loss.backward()
            optimizer.step()
            steps += 1
    return steps


def prune_with_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Attach `masks` ("<module>.weight" -> bool mask) with torch.nn.utils.prune.custom_from_mask.

    The weight becomes `weight_orig * weight_mask`, recomputed by a forward pre-hook on every call.
    """
    for name, mask in masks.items():
        module_name, _, param = name.rpartition(".")
        module = model.get_submodule(module_name)
        prune.custom_from_mask(module, param, mask.to(getattr(module, param).device))


def mlp(in_features: int, width: int, depth: int, classes: int) -> nn.Sequential:
    """The MLP as a script writes it: `depth` hidden Linear(width) -> ReLU layers, then Linear to the classes
    (the shapes, parameter order and PyTorch default initialisation of `sdd.models.MLP`)."""
    layers: list[nn.Module] = [nn.Flatten()]
    for _ in range(depth):
        layers += [nn.Linear(in_features, width), nn.ReLU()]
        in_features = width
    return nn.Sequential(*layers, nn.Linear(in_features, classes))


def train_grid_share(job_path: str) -> None:
    """One plain process of the grid benchmark: full-batch Adam on each (width, seed) of its share, then the
    test accuracy; no tracking. The job file names the shared data file (x arrays and each seed's noisy
    training labels, built once by the benchmark), the recipe, the share and where the results go."""
    job = json.loads(Path(job_path).read_text())
    torch.set_num_threads(1)  # as a sweep trial given 1 CPU
    data = torch.load(job["data"], weights_only=True)
    x_train, x_test, y_test = data["x_train"], data["x_test"], data["y_test"]
    results = []
    for width, seed in job["trials"]:
        started = time.perf_counter()
        torch.manual_seed(seed)
        model = mlp(x_train[0].numel(), width, job["depth"], job["classes"])
        optimizer = torch.optim.Adam(model.parameters(), lr=job["lr"])
        y_train = data[f"y_train_seed{seed}"]
        model.train()
        for _ in range(job["epochs"]):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x_train), y_train).backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            test_acc = (model(x_test).argmax(1) == y_test).float().mean().item()
        results.append({"width": width, "seed": seed, "test_acc": test_acc,
                        "train_time_s": time.perf_counter() - started})
    Path(job["out"]).write_text(json.dumps(results))
