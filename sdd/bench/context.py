"""What every section of `sdd bench` shares: its sizes, the device, the quick preset's recipe and data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdd.bench.measure import Stores
from sdd.errors import UsageError

IMAGE_SHAPE = (3, 32, 32)
IMAGE_CLASSES = 10


@dataclass(frozen=True)
class Size:
    """How much work each figure does: `quick` fits in a few minutes on 2 cores, `tiny` is for tests."""

    name: str
    repeats: int  # interleaved repeats of every timed pair
    mlp_repeats: int  # the MLP workloads are cheap: more repeats steady their medians
    mnist_train: int | None  # MNIST-1D training samples (None: the preset's)
    mnist_val: int | None
    mnist_test: int | None
    # (project, baseline) epochs timed per repeat, chosen so that both sides run about as long and are
    # equally exposed to bursts of load from other processes
    full_batch_epochs: tuple[int, int]  # MLP, full batch
    minibatch_epochs: tuple[int, int]  # MLP, minibatch
    images: int  # CIFAR-shaped random images
    image_epochs: tuple[int, int]
    image_models: tuple[tuple[str, int], ...]  # (model, width), timed with crop+flip
    log_epochs: int  # most epochs of the preset's recipe timed for the logging + evaluation share (its own if fewer)
    log_evaluations: int  # evaluations logged for log_batch vs log_metric
    artifact_models: tuple[tuple[str, int], ...]  # (model, width); "mlp" takes the preset's width
    sweep_widths: tuple[int, ...]  # the short trials' sweep: widths x seeds trials
    sweep_seeds: tuple[int, ...]
    sweep_epochs: int
    # the sweep against N plain processes: the quick preset's dense grid (widths x seeds), scaled down
    grid_widths: tuple[int, ...]
    grid_seeds: tuple[int, ...]
    grid_epochs: int


SIZES: dict[str, Size] = {
    "full": Size("full", repeats=5, mlp_repeats=9, mnist_train=None, mnist_val=None, mnist_test=None,
                 full_batch_epochs=(300, 30), minibatch_epochs=(40, 10), images=2048, image_epochs=(1, 1),
                 image_models=(("cnn5", 8), ("resnet18", 8)),
                 log_epochs=2000, log_evaluations=100,
                 artifact_models=(("mlp", 0), ("cnn5", 8), ("resnet18", 8), ("resnet18", 64)),
                 sweep_widths=(32, 64, 96, 128), sweep_seeds=(0, 1), sweep_epochs=2000,
                 grid_widths=(8, 16, 24, 32, 48, 64, 96, 128), grid_seeds=(0, 1, 2), grid_epochs=1000),
    "quick": Size("quick", repeats=5, mlp_repeats=7, mnist_train=None, mnist_val=None, mnist_test=None,
                  full_batch_epochs=(60, 6), minibatch_epochs=(12, 4), images=384, image_epochs=(1, 1),
                  image_models=(("cnn5", 8), ("resnet18", 8)),
                  log_epochs=1000, log_evaluations=10,
                  artifact_models=(("mlp", 0), ("cnn5", 8), ("resnet18", 8), ("resnet18", 64)),
                  sweep_widths=(32, 64, 96, 128), sweep_seeds=(0, 1), sweep_epochs=100,
                  grid_widths=(8, 16, 32, 64, 96, 128), grid_seeds=(0, 1), grid_epochs=1000),
    "tiny": Size("tiny", repeats=1, mlp_repeats=1, mnist_train=200, mnist_val=50, mnist_test=100,
                 full_batch_epochs=(2, 1), minibatch_epochs=(1, 1), images=64, image_epochs=(1, 1), image_models=(("cnn5", 4), ("resnet18", 2)),
                 log_epochs=20, log_evaluations=3, artifact_models=(("mlp", 0), ("resnet18", 4)),
                 sweep_widths=(8,), sweep_seeds=(0,), sweep_epochs=2,
                 grid_widths=(8,), grid_seeds=(0, 1), grid_epochs=2),
}


@dataclass
class Context:
    """What every section shares: device, sizes, the quick preset's recipe and its data."""

    size: Size
    device: Any
    workers: int
    preset: Any  # sdd.config.TrainConfig: the quick preset's dense recipe at the median width of its grid
    recipe: dict[str, Any]  # that recipe as study-file options (without width and seed)
    problem: Any  # sdd.problem.Problem of the preset's data
    stores: Stores
    workdir: Path


def _preset(size: Size, device_name: str) -> tuple[Any, dict[str, Any]]:
    """The quick preset's dense recipe (sdd/presets/mnist1d_quick.yaml) at the median width of its grid, as
    a config and as study-file options."""
    from sdd import config
    from sdd.sweep import presets
    from sdd.sweep.study_file import load_study

    # The shipped file, not presets.find's: a sweeps/ folder in the working directory must not change the
    # benchmark's workload.
    path = presets.folder() / f"{presets.DEFAULT}{presets.SUFFIX}"
    if not path.is_file():
        raise UsageError(f"the quick preset {path} is missing from the installed package")
    dense = load_study(path).stages["dense"]
    widths = tuple(sorted(int(w) for w in dense.values("width", config.ModelConfig().width)))
    recipe = {k: v for k, v in dense.recipe.items() if k not in ("width", "seed")}
    recipe["device"] = device_name
    for key, value in (("train_size", size.mnist_train), ("val_size", size.mnist_val),
                       ("test_size", size.mnist_test)):
        if value is not None:
            recipe[key] = value
    cfg = config.from_flat_dict(config.TrainConfig, {**recipe, "width": widths[len(widths) // 2]})
    cfg.validate()
    return cfg, recipe


def random_images(n: int, device: Any) -> Any:
    """A Problem of CIFAR-shaped random images (seeded), resident on `device`, for the image workloads."""
    import torch

    from sdd.data import Splits
    from sdd.problem import Problem

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, *IMAGE_SHAPE, generator=g)
    y = torch.randint(0, IMAGE_CLASSES, (n,), generator=g)
    none = torch.empty(0, *IMAGE_SHAPE)
    splits = Splits(x_train=x, y_train=y, x_val=none, y_val=torch.empty(0, dtype=torch.long), x_test=none,
                    y_test=torch.empty(0, dtype=torch.long), num_classes=IMAGE_CLASSES,
                    input_shape=IMAGE_SHAPE).to(device)
    return Problem(splits, splits.y_train, torch.empty(0, dtype=torch.long),
                   torch.zeros(n, dtype=torch.bool, device=device), device)


def make_context(size: Size | str, device: Any, workers: int, workdir: Path) -> Context:
    """Everything the sections share; `size` is a Size or the name of one in SIZES."""
    from sdd.problem import load_problem

    size = SIZES[size] if isinstance(size, str) else size
    preset, recipe = _preset(size, device.type)
    problem = load_problem(preset.data, device, run_seed=preset.optim.seed)
    return Context(size, device, workers, preset, recipe, problem, Stores(workdir), workdir)
