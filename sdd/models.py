"""The model families of the double-descent literature, built by name.

Contracts the rest of sdd relies on:

- every ReLU is its own ``nn.ReLU`` module, used once per forward and not in place, so forward hooks
  on ``nn.ReLU`` see each layer's pre-activation (activation entropy);
- ``forward`` maps a float batch ``(N, *input_shape)`` to logits ``(N, num_classes)``;
- the final classifier is the last ``nn.Linear`` in module order and is named ``fc``.

``depth`` defaults to 1. Only models whose builder takes a ``depth`` argument (``mlp``, ``vgg_like``)
use it; the others refuse any other value rather than silently ignoring it. ``maxpool`` works the same
way (only ``resnet18`` takes it).

``init`` chooses the initialisation: ``default`` keeps each family's own (PyTorch's layer defaults;
``resnet18`` Kaiming fan_out on its convs), ``open_lth`` re-initialises every model as open_lth and He et
al. 2022 do (see ``open_lth_init``).
"""

from __future__ import annotations

import inspect
import math
from collections import OrderedDict
from typing import Callable, TypeVar

import torch
from torch import nn

from sdd import names
from sdd.errors import UsageError

MODELS: dict[str, Callable[..., nn.Module]] = {}

_PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Linear)

_B = TypeVar("_B", bound=Callable[..., nn.Module])


def register(name: str) -> Callable[[_B], _B]:
    """Class/function decorator adding a model builder to ``MODELS`` under ``name``."""

    def add(builder: _B) -> _B:
        if name in MODELS:
            raise ValueError(f"model name {name!r} is registered twice")
        MODELS[name] = builder
        return builder

    return add


def _is_pos_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _takers(argument: str) -> str:
    """Comma-separated names of the models whose builder takes ``argument``."""
    return ", ".join(n for n, b in sorted(MODELS.items()) if argument in inspect.signature(b).parameters)


def open_lth_init(model: nn.Module) -> None:
    """open_lth's ``kaiming_normal`` + ``uniform`` BatchNorm initialisers (models/initializers.py,
    models/bn_initializers.py), which He et al. 2022's code keeps for every model.

    Every conv and linear weight gets ``kaiming_normal_`` with its defaults (fan_in, gain sqrt(2): std
    sqrt(2 / fan_in)); every BatchNorm weight (gamma) is drawn from U(0, 1) and its bias (beta) set to 0.
    Conv and linear biases keep PyTorch's defaults, as in open_lth. open_lth only knows Conv2d and
    BatchNorm2d; Conv1d and BatchNorm1d are treated alike here.
    """
    for m in model.modules():
        if isinstance(m, _PRUNABLE):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and m.affine:
            nn.init.uniform_(m.weight, 0.0, 1.0)
            nn.init.zeros_(m.bias)


# name -> re-initialisation applied after a model is built (None: the builder's own initialisation)
INITS: dict[str, Callable[[nn.Module], None] | None] = {"default": None, "open_lth": open_lth_init}
names.check_registry("initialisation", names.INITS, INITS)


def build_model(
    name: str,
    *,
    width: int,
    depth: int = 1,
    input_shape: tuple[int, ...],
    num_classes: int,
    maxpool: bool = False,
    init: str = "default",
) -> nn.Module:
    """Build model ``name``; raises UsageError for unknown names and out-of-range arguments."""
    if name not in MODELS:
        raise UsageError(f"unknown model {name!r}; choose one of: {', '.join(sorted(MODELS))}")
    if init not in INITS:
        raise UsageError(f"unknown initialisation {init!r}; choose one of: {', '.join(INITS)}")
    if not _is_pos_int(width):
        raise UsageError(f"width must be a positive integer, got {width!r}")
    if not _is_pos_int(depth):
        raise UsageError(f"depth must be a positive integer, got {depth!r}")
    if not _is_pos_int(num_classes) or num_classes < 2:
        raise UsageError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    shape = tuple(input_shape) if isinstance(input_shape, (tuple, list)) else ()
    if not shape or not all(map(_is_pos_int, shape)):
        raise UsageError(f"input_shape must be a non-empty tuple of positive integers, got {input_shape!r}")

    builder = MODELS[name]
    accepted = inspect.signature(builder).parameters
    kwargs: dict[str, object] = {"width": width, "input_shape": shape, "num_classes": num_classes}
    if "depth" in accepted:
        kwargs["depth"] = depth
    elif depth != 1:
        raise UsageError(
            f"model {name!r} has no depth parameter: leave depth at 1 (depth is used by: {_takers('depth')})"
        )
    if "maxpool" in accepted:
        kwargs["maxpool"] = bool(maxpool)
    elif maxpool:
        raise UsageError(f"model {name!r} has no max-pool option (maxpool is used by: {_takers('maxpool')})")
    model = builder(**kwargs)
    reinit = INITS[init]
    if reinit is not None:
        reinit(model)
    return model


def count_params(model: nn.Module) -> int:
    """Number of trainable parameters (zeros included)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _weight_name(module_name: str) -> str:
    return f"{module_name}.weight" if module_name else "weight"


def prunable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """``"<module>.weight"`` -> weight of every Conv1d/Conv2d/Linear, in module order.

    Biases and normalisation parameters are never prunable.
    """
    return {_weight_name(n): m.weight for n, m in model.named_modules() if isinstance(m, _PRUNABLE)}


def output_layer_name(model: nn.Module) -> str:
    """Name of the final classifier weight (the last nn.Linear in module order), e.g. ``"fc.weight"``."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UsageError("model has no nn.Linear layer; sdd needs a model ending in an nn.Linear classifier")
    return _weight_name(linears[-1])


def _image_channels(name: str, input_shape: tuple[int, ...], min_side: int) -> int:
    """Channel count of an image input shape (C, H, W); UsageError if the shape does not fit the model."""
    if len(input_shape) != 3 or min(input_shape[1:]) < min_side:
        raise UsageError(
            f"model {name!r} needs image input of shape (C, H, W) with H, W >= {min_side}; got {input_shape}"
        )
    return input_shape[0]


@register("mlp")
class MLP(nn.Sequential):
    """Flatten, then ``depth`` hidden layers Linear(width) -> ReLU, then Linear to the classes."""

    def __init__(self, *, width: int, depth: int, input_shape: tuple[int, ...], num_classes: int) -> None:
        layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        fan_in = math.prod(input_shape)
        for i in range(1, depth + 1):
            layers[f"linear{i}"] = nn.Linear(fan_in, width)
            layers[f"relu{i}"] = nn.ReLU()
            fan_in = width
        layers["fc"] = nn.Linear(fan_in, num_classes)
        super().__init__(layers)


@register("cnn1d")
class CNN1d(nn.Sequential):
    """Greydanus' MNIST-1D CNN (greydanus/mnist1d, notebooks/models.py ConvBase and the
    deep-double-descent notebook's get_model_cnn): three Conv1d of ``width`` channels, stride 2, padding 1,
    kernels 5, 3, 3, each followed by ReLU, then flatten and Linear (5 * width inputs for length 40).

    Input shape (L,) or (C, L); a batch (N, L) gets its channel dimension added in ``forward``.
    """

    def __init__(self, *, width: int, input_shape: tuple[int, ...], num_classes: int) -> None:
        if len(input_shape) not in (1, 2) or input_shape[-1] < 3:
            raise UsageError(
                f"model 'cnn1d' needs input of shape (L,) or (C, L) with L >= 3; got {input_shape}"
            )
        channels, length = (1, input_shape[0]) if len(input_shape) == 1 else input_shape
        super().__init__(
            OrderedDict(
                conv1=nn.Conv1d(channels, width, 5, stride=2, padding=1),
                relu1=nn.ReLU(),
                conv2=nn.Conv1d(width, width, 3, stride=2, padding=1),
                relu2=nn.ReLU(),
                conv3=nn.Conv1d(width, width, 3, stride=2, padding=1),
                relu3=nn.ReLU(),
                flatten=nn.Flatten(),
            )
        )
        with torch.no_grad():
            features = super().forward(torch.zeros(1, channels, length)).shape[1]
        self.fc = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(1)
        return super().forward(x)


@register("cnn5")
class CNN5(nn.Sequential):
    """Nakkiran et al. 2020's 5-layer CNN (paper appendix; reference code harvard-machine-learning/
    double-descent models/mcnn.py ``make_cnn``, itself after Page 2018's Myrtle backbone).

    Four Conv3x3(bias) -> BatchNorm -> ReLU layers of widths k, 2k, 4k, 8k; 2x2 max-pool after layers 2,
    3 and 4; a final global max-pool; Linear(8k, classes). For k=64 on CIFAR-10 this is the paper's
    1,558,026 parameters. The reference's final pool is MaxPool2d(4), which on 32x32 input (4x4 maps
    by then) is a global max-pool; AdaptiveMaxPool2d(1) gives the same there and also fits other sizes.
    """

    def __init__(self, *, width: int, input_shape: tuple[int, ...], num_classes: int) -> None:
        in_channels = _image_channels("cnn5", input_shape, min_side=8)  # three 2x2 pools
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for i, out_channels in enumerate((width, 2 * width, 4 * width, 8 * width), start=1):
            layers[f"conv{i}"] = nn.Conv2d(in_channels, out_channels, 3, padding=1)
            layers[f"bn{i}"] = nn.BatchNorm2d(out_channels)
            layers[f"relu{i}"] = nn.ReLU()
            if i > 1:
                layers[f"pool{i}"] = nn.MaxPool2d(2)
            in_channels = out_channels
        layers["pool"] = nn.AdaptiveMaxPool2d(1)
        layers["flatten"] = nn.Flatten()
        layers["fc"] = nn.Linear(8 * width, num_classes)
        super().__init__(layers)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with BatchNorm; 1x1 conv + BN shortcut when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


def _resnet18_stages(block: type[nn.Module], width: int) -> tuple[nn.Sequential, ...]:
    """ResNet-18's four stages of two `block`s each, widths k, 2k, 4k, 8k, downsampling from the second on."""
    stages = []
    channels = width
    for i, stage_width in enumerate((width, 2 * width, 4 * width, 8 * width)):
        stride = 1 if i == 0 else 2
        stages.append(nn.Sequential(block(channels, stage_width, stride), block(stage_width, stage_width, 1)))
        channels = stage_width
    return tuple(stages)


@register("resnet18")
class ResNet18(nn.Module):
    """CIFAR ResNet-18 of width k (stage widths k, 2k, 4k, 8k; k=64 is standard, 11,173,962 parameters
    on CIFAR-10), as in he-zh/sparse-double-descent models/cifar_pytorch_resnet.py and VGCQ/DSD2
    utils/models.py: 3x3 stride-1 stem, BasicBlocks [2, 2, 2, 2], adaptive average pool, Linear.

    ``maxpool=True`` keeps the 3x3 stride-2 max-pool after the stem (DSD2); He et al. drop it.
    Convolutions get Kaiming-normal (fan_out) init as in both references.
    """

    def __init__(
        self, *, width: int, input_shape: tuple[int, ...], num_classes: int, maxpool: bool = False
    ) -> None:
        super().__init__()
        in_channels = _image_channels("resnet18", input_shape, min_side=1)
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.maxpool: nn.Module = nn.MaxPool2d(3, stride=2, padding=1) if maxpool else nn.Identity()
        self.layer1, self.layer2, self.layer3, self.layer4 = _resnet18_stages(BasicBlock, width)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register("vgg_like")
class VGGLike(nn.Sequential):
    """DSD2's VGG-like student (VGCQ/DSD2 utils/models.py ``VGGlikeModel``; paper defaults: depth 5
    blocks, width 32, as kd.py builds it with 2**gamma, gamma=5).

    ``depth`` blocks; block i (from 1) has two 3x3 convs (with bias) of width * 2**(i-1) channels, each
    Conv -> ReLU -> BatchNorm (ReLU before BN, as in the reference), then a 2x2 max-pool. Then
    AdaptiveAvgPool2d(7), flatten and Linear(49 * last width, classes). The reference computes channel
    counts as powers of two from log2(width); we use width * 2**(i-1), which is the same for the
    power-of-two widths it supports. On 32x32 input with depth 5 the maps are 1x1 before the adaptive
    pool, which then copies each value 49 times: the reference's classifier has that redundancy too.
    """

    def __init__(self, *, width: int, depth: int, input_shape: tuple[int, ...], num_classes: int) -> None:
        in_channels = _image_channels("vgg_like", input_shape, min_side=2**depth)  # one 2x2 pool per block
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for i in range(1, depth + 1):
            out_channels = width * 2 ** (i - 1)
            for j in (1, 2):
                layers[f"conv{i}_{j}"] = nn.Conv2d(in_channels, out_channels, 3, padding=1)
                layers[f"relu{i}_{j}"] = nn.ReLU()
                layers[f"bn{i}_{j}"] = nn.BatchNorm2d(out_channels)
                in_channels = out_channels
            layers[f"pool{i}"] = nn.MaxPool2d(2)
        layers["avgpool"] = nn.AdaptiveAvgPool2d(7)
        layers["flatten"] = nn.Flatten()
        layers["fc"] = nn.Linear(49 * in_channels, num_classes)
        super().__init__(layers)

@register("lenet")
class LeNet(nn.Sequential):
    """LeNet-300-100, the fully connected MNIST model of He et al. 2022 (he-zh/sparse-double-descent
    models/mnist_mlp.py ``mnist_mlp_300_100``) and open_lth (models/mnist_lenet.py ``mnist_lenet_300_100``):
    flatten, Linear(300) -> ReLU -> Linear(100) -> ReLU -> Linear to the classes.

    ``width`` is the first hidden layer; the second has round(width / 3) units (at least 1), so
    ``width=300`` is the paper's model (266,610 parameters on MNIST) and smaller widths shrink both layers
    in the paper's 3:1 ratio. The references fix 300-100 (their name spells other plans).
    """

    def __init__(self, *, width: int, input_shape: tuple[int, ...], num_classes: int) -> None:
        second = max(1, round(width / 3))
        super().__init__(OrderedDict(
            flatten=nn.Flatten(),
            linear1=nn.Linear(math.prod(input_shape), width),
            relu1=nn.ReLU(),
            linear2=nn.Linear(width, second),
            relu2=nn.ReLU(),
            fc=nn.Linear(second, num_classes),
        ))


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016, "Identity Mappings"): BN -> ReLU -> conv3x3, BN -> ReLU
    -> conv3x3, plus the identity, or a 1x1 conv (no BN) of the pre-activated input when the shape changes
    (kuangliu/pytorch-cifar models/preact_resnet.py ``PreActBlock``)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(self.relu2(self.bn2(self.conv1(out))))
        return out + shortcut


@register("preact_resnet18")
class PreActResNet18(nn.Module):
    """Pre-activation ResNet-18 of width k, the model of Nakkiran et al. 2020's width sweep (their appendix:
    kuangliu/pytorch-cifar's PreActResNet18 with stage widths k, 2k, 4k, 8k; k=64 is the standard model,
    11,171,146 parameters on CIFAR-10).

    3x3 stride-1 stem conv (no BN or ReLU after it: each block pre-activates its input), PreActBlocks
    [2, 2, 2, 2], adaptive average pool (kuangliu's avg_pool2d(4) on 32x32 input is the same), Linear.
    PyTorch's default initialisation, as in the reference.
    """

    def __init__(self, *, width: int, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        in_channels = _image_channels("preact_resnet18", input_shape, min_side=1)
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.layer1, self.layer2, self.layer3, self.layer4 = _resnet18_stages(PreActBlock, width)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


names.check_registry("model", names.MODELS, MODELS)
