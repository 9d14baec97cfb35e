"""Model zoo: parameter counts against hand counts, shapes, ReLU contract, pruning view, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sdd.errors import UsageError
from sdd.models import MODELS, build_model, count_params, output_layer_name, prunable_weights

CIFAR = (3, 32, 32)
MNIST = (1, 28, 28)

# name, build kwargs, number of distinct ReLU uses per forward
SMALL = [
    ("mlp", dict(width=8, depth=2, input_shape=(40,)), 2),
    ("cnn1d", dict(width=4, input_shape=(40,)), 3),
    ("cnn5", dict(width=2, input_shape=CIFAR), 4),
    ("resnet18", dict(width=2, input_shape=CIFAR), 1 + 8 * 2),
    ("resnet18", dict(width=2, input_shape=CIFAR, maxpool=True), 1 + 8 * 2),
    ("vgg_like", dict(width=4, depth=3, input_shape=CIFAR), 3 * 2),
    ("lenet", dict(width=12, input_shape=MNIST), 2),
    ("preact_resnet18", dict(width=2, input_shape=CIFAR), 8 * 2),
]
IDS = [f"{name}-{i}" for i, (name, _, _) in enumerate(SMALL)]


def _build(name: str, kwargs: dict, num_classes: int = 10) -> nn.Module:
    return build_model(name, num_classes=num_classes, **kwargs)


def test_registry_lists_all_models():
    assert set(MODELS) == {"mlp", "cnn1d", "cnn5", "resnet18", "vgg_like", "lenet", "preact_resnet18"}


# --- parameter counts, written out by hand -------------------------------------------------------


def test_mlp_param_counts():
    one = build_model("mlp", width=64, depth=1, input_shape=(40,), num_classes=10)
    assert count_params(one) == 40 * 64 + 64 + 64 * 10 + 10
    two = build_model("mlp", width=64, depth=2, input_shape=(40,), num_classes=10)
    assert count_params(two) == 40 * 64 + 64 + 64 * 64 + 64 + 64 * 10 + 10
    image = build_model("mlp", width=5, depth=1, input_shape=(1, 4, 4), num_classes=3)
    assert count_params(image) == 16 * 5 + 5 + 5 * 3 + 3


def test_cnn1d_param_counts():
    # Greydanus' ConvBase with 25 channels: length 40 -> 19 -> 10 -> 5, so the linear layer sees 25 * 5.
    model = build_model("cnn1d", width=25, input_shape=(40,), num_classes=10)
    conv1 = 1 * 25 * 5 + 25
    conv2 = 25 * 25 * 3 + 25
    conv3 = 25 * 25 * 3 + 25
    linear = 25 * 5 * 10 + 10
    assert count_params(model) == conv1 + conv2 + conv3 + linear == 5210
    two_channels = build_model("cnn1d", width=4, input_shape=(2, 40), num_classes=10)
    assert count_params(two_channels) == (2 * 4 * 5 + 4) + 2 * (4 * 4 * 3 + 4) + (4 * 5 * 10 + 10)


def test_cnn5_param_counts():
    model = build_model("cnn5", width=2, input_shape=CIFAR, num_classes=10)
    # conv 3x3 with bias + batchnorm (weight and bias), widths k, 2k, 4k, 8k with k = 2
    layer1 = 3 * 2 * 9 + 2 + 2 * 2
    layer2 = 2 * 4 * 9 + 4 + 2 * 4
    layer3 = 4 * 8 * 9 + 8 + 2 * 8
    layer4 = 8 * 16 * 9 + 16 + 2 * 16
    assert count_params(model) == layer1 + layer2 + layer3 + layer4 + 16 * 10 + 10
    # Nakkiran et al. 2020 (appendix): "For k = 64, this CNN has 1558026 parameters."
    assert count_params(build_model("cnn5", width=64, input_shape=CIFAR, num_classes=10)) == 1558026


def test_resnet18_param_counts():
    model = build_model("resnet18", width=2, input_shape=CIFAR, num_classes=10)
    stem = 3 * 2 * 9 + 2 * 2  # conv (no bias) + bn
    # each block: conv3x3 + bn + conv3x3 + bn [+ 1x1 shortcut conv + bn when the shape changes]
    layer1 = 2 * (2 * 2 * 9 + 2 * 2 + 2 * 2 * 9 + 2 * 2)
    layer2 = (2 * 4 * 9 + 2 * 4 + 4 * 4 * 9 + 2 * 4 + 2 * 4 + 2 * 4) + (4 * 4 * 9 + 2 * 4 + 4 * 4 * 9 + 2 * 4)
    layer3 = (4 * 8 * 9 + 2 * 8 + 8 * 8 * 9 + 2 * 8 + 4 * 8 + 2 * 8) + (8 * 8 * 9 + 2 * 8 + 8 * 8 * 9 + 2 * 8)
    layer4 = (8 * 16 * 9 + 2 * 16 + 16 * 16 * 9 + 2 * 16 + 8 * 16 + 2 * 16) + (
        16 * 16 * 9 + 2 * 16 + 16 * 16 * 9 + 2 * 16
    )
    fc = 16 * 10 + 10
    assert count_params(model) == stem + layer1 + layer2 + layer3 + layer4 + fc
    with_pool = build_model("resnet18", width=2, input_shape=CIFAR, num_classes=10, maxpool=True)
    assert count_params(with_pool) == count_params(model)
    # the standard CIFAR-10 ResNet-18 (k=64)
    assert count_params(build_model("resnet18", width=64, input_shape=CIFAR, num_classes=10)) == 11173962


def test_vgg_like_param_counts():
    model = build_model("vgg_like", width=4, depth=2, input_shape=CIFAR, num_classes=10)
    block1 = (3 * 4 * 9 + 4 + 2 * 4) + (4 * 4 * 9 + 4 + 2 * 4)  # conv (bias) + bn, twice
    block2 = (4 * 8 * 9 + 8 + 2 * 8) + (8 * 8 * 9 + 8 + 2 * 8)
    fc = 7 * 7 * 8 * 10 + 10  # after AdaptiveAvgPool2d(7)
    assert count_params(model) == block1 + block2 + fc
    # DSD2's student: 5 blocks, width 32 (2**gamma, gamma=5), CIFAR-10
    dsd2 = build_model("vgg_like", width=32, depth=5, input_shape=CIFAR, num_classes=10)
    blocks = [(3, 32), (32, 64), (64, 128), (128, 256), (256, 512)]
    expected = sum((i * o * 9 + o + 2 * o) + (o * o * 9 + o + 2 * o) for i, o in blocks) + 49 * 512 * 10 + 10
    assert count_params(dsd2) == expected


def test_lenet_300_100_shape_and_param_count():
    model = build_model("lenet", width=300, input_shape=MNIST, num_classes=10)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 300), (300, 100), (100, 10)]
    # He et al. / open_lth's LeNet-300-100 on MNIST: 784*300+300 + 300*100+100 + 100*10+10
    assert count_params(model) == 266610
    assert model(torch.randn(5, *MNIST)).shape == (5, 10)
    assert model(torch.randn(5, 784)).shape == (5, 10)  # flattened digits too
    # smaller widths keep the 3:1 ratio of the two hidden layers
    small = build_model("lenet", width=30, input_shape=MNIST, num_classes=10)
    assert count_params(small) == 784 * 30 + 30 + 30 * 10 + 10 + 10 * 10 + 10
    assert build_model("lenet", width=1, input_shape=MNIST, num_classes=10).linear2.out_features == 1


def test_preact_resnet18_param_counts():
    model = build_model("preact_resnet18", width=2, input_shape=CIFAR, num_classes=10)
    stem = 3 * 2 * 9  # conv only: no BN after the stem, each block pre-activates its input
    # each block: bn(in) + conv3x3 + bn(out) + conv3x3 [+ 1x1 shortcut conv, no BN, when the shape changes]
    def block(i, o):
        return 2 * i + i * o * 9 + 2 * o + o * o * 9 + (i * o if i != o else 0)
    body = sum(block(i, o) + block(o, o) for i, o in [(2, 2), (2, 4), (4, 8), (8, 16)])
    assert count_params(model) == stem + body + 16 * 10 + 10
    # kuangliu/pytorch-cifar's PreActResNet18 (k=64) on CIFAR-10
    assert count_params(build_model("preact_resnet18", width=64, input_shape=CIFAR, num_classes=10)) == 11171146


def test_preact_block_normalises_and_activates_before_each_conv():
    model = build_model("preact_resnet18", width=2, input_shape=CIFAR, num_classes=10)
    order: list[str] = []
    for name, module in model.layer2[0].named_modules():
        if name:
            module.register_forward_hook(lambda m, i, o, name=name: order.append(name))
    out = model(torch.randn(2, *CIFAR))
    assert out.shape == (2, 10)
    # BN -> ReLU -> conv, twice; the projection shortcut sees the pre-activated input
    assert order == ["bn1", "relu1", "shortcut", "conv1", "bn2", "relu2", "conv2"]
    block = model.layer1[0]
    x = torch.randn(2, 2, 8, 8)
    expected = block.conv2(block.relu2(block.bn2(block.conv1(block.relu1(block.bn1(x)))))) + x
    assert torch.allclose(block(x), expected)
    assert [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)][0] == "layer1.0.bn1"


@pytest.mark.parametrize("name,kwargs", [
    ("resnet18", dict(width=16, input_shape=CIFAR)),
    ("preact_resnet18", dict(width=16, input_shape=CIFAR)),
    ("lenet", dict(width=300, input_shape=MNIST)),
    ("cnn1d", dict(width=64, input_shape=(40,))),
])
def test_open_lth_init(name, kwargs):
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, init="open_lth", **kwargs)
    for module_name, module in model.named_modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            fan_in = module.weight[0].numel()
            expected = (2 / fan_in) ** 0.5  # kaiming_normal_, fan_in, ReLU gain
            n = module.weight.numel()
            # the sample std of n normal draws is within a few sd/sqrt(2n) of the true one
            assert abs(module.weight.std().item() - expected) < 5 * expected / (2 * n) ** 0.5 + 1e-3 * expected, \
                module_name
            assert abs(module.weight.mean().item()) < 5 * expected / n ** 0.5, module_name
        if isinstance(module, nn.BatchNorm2d):
            gamma = module.weight.detach()
            assert ((gamma >= 0) & (gamma < 1)).all() and not torch.equal(gamma, torch.ones_like(gamma))
            assert torch.count_nonzero(module.bias) == 0
    # same seed, same weights; and not the model's own initialisation
    torch.manual_seed(0)
    again = build_model(name, num_classes=10, init="open_lth", **kwargs).state_dict()
    torch.manual_seed(0)
    default = build_model(name, num_classes=10, **kwargs).state_dict()
    state = model.state_dict()
    assert all(torch.equal(state[k], again[k]) for k in state)
    assert not torch.equal(state["fc.weight"], default["fc.weight"])


def test_open_lth_init_enters_the_config_hash_without_moving_old_hashes():
    from sdd.config import ModelConfig, TrainConfig, config_hash

    default = TrainConfig()
    assert config_hash(TrainConfig(model=ModelConfig(init="default"))) == config_hash(default)
    assert config_hash(TrainConfig(model=ModelConfig(init="open_lth"))) != config_hash(default)
    with pytest.raises(UsageError, match="open_lth"):
        build_model("mlp", width=4, input_shape=(3,), num_classes=2, init="he")


def test_count_params_skips_frozen():
    model = build_model("mlp", width=4, depth=1, input_shape=(3,), num_classes=2)
    model.fc.requires_grad_(False)
    assert count_params(model) == 3 * 4 + 4


# --- forward contract ----------------------------------------------------------------------------


@pytest.mark.parametrize("name,kwargs,relus", SMALL, ids=IDS)
def test_output_shape(name, kwargs, relus):
    model = _build(name, kwargs, num_classes=7)
    out = model(torch.randn(4, *kwargs["input_shape"]))
    assert out.shape == (4, 7)


@pytest.mark.parametrize("name,kwargs,relus", SMALL, ids=IDS)
def test_each_relu_is_a_distinct_module_used_once(name, kwargs, relus):
    model = _build(name, kwargs)
    all_relus = [m for _, m in model.named_modules(remove_duplicate=False) if isinstance(m, nn.ReLU)]
    assert len(all_relus) == len({id(m) for m in all_relus}) == relus
    calls: dict[int, int] = {}
    saw_negative: dict[int, bool] = {}

    def hook(module, inputs, output):
        calls[id(module)] = calls.get(id(module), 0) + 1
        # the hook must see the pre-activation, so the ReLU must not have clamped its input in place
        saw_negative[id(module)] = bool((inputs[0] < 0).any())

    for m in all_relus:
        assert not m.inplace
        m.register_forward_hook(hook)
    model(torch.randn(4, *kwargs["input_shape"]))
    assert calls == {id(m): 1 for m in all_relus}
    assert all(saw_negative.values())


def test_cnn1d_accepts_batch_without_channel_dim():
    model = build_model("cnn1d", width=4, input_shape=(40,), num_classes=10)
    x = torch.randn(3, 40)
    assert torch.equal(model(x), model(x.unsqueeze(1)))


@pytest.mark.parametrize("side", [32, 64])
@pytest.mark.parametrize("maxpool", [False, True])
def test_resnet18_sizes_and_maxpool(side, maxpool):
    model = build_model("resnet18", width=2, input_shape=(3, side, side), num_classes=10, maxpool=maxpool)
    seen: list[int] = []
    model.layer1.register_forward_hook(lambda m, i, o: seen.append(o.shape[-1]))
    assert model(torch.randn(2, 3, side, side)).shape == (2, 10)
    assert seen == [side // 2 if maxpool else side]


def test_cnn5_on_64px_images():
    model = build_model("cnn5", width=2, input_shape=(3, 64, 64), num_classes=200)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 200)


def test_init_is_deterministic_given_seed():
    for name, kwargs, _ in SMALL:
        torch.manual_seed(0)
        a = _build(name, kwargs).state_dict()
        torch.manual_seed(0)
        b = _build(name, kwargs).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name


# --- pruning view ------------------------------------------------------------------------------


@pytest.mark.parametrize("name,kwargs,relus", SMALL, ids=IDS)
def test_prunable_weights_are_conv_and_linear_weights(name, kwargs, relus):
    model = _build(name, kwargs)
    weights = prunable_weights(model)
    modules = dict(model.named_modules())
    assert weights
    for key, param in weights.items():
        module_name, attr = key.rsplit(".", 1)
        assert attr == "weight"
        assert isinstance(modules[module_name], (nn.Conv1d, nn.Conv2d, nn.Linear))
        assert param is modules[module_name].weight
    expected = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]
    assert list(weights) == [f"{n}.weight" for n in expected]  # module order
    params = dict(model.named_parameters())
    assert all(params[k] is v for k, v in weights.items())
    assert list(weights)[-1] == output_layer_name(model) == "fc.weight"


def test_resnet18_prunable_layout():
    weights = prunable_weights(build_model("resnet18", width=2, input_shape=CIFAR, num_classes=10))
    # stem + 8 blocks x 2 convs + 3 shortcut convs + fc
    assert len(weights) == 1 + 16 + 3 + 1
    assert next(iter(weights)) == "conv1.weight"
    assert "layer2.0.shortcut.0.weight" in weights
    assert not any("bn" in k or k.endswith("bias") for k in weights)


def test_mlp_prunable_names():
    model = build_model("mlp", width=8, depth=2, input_shape=(40,), num_classes=10)
    assert list(prunable_weights(model)) == ["linear1.weight", "linear2.weight", "fc.weight"]


def test_output_layer_name_of_foreign_models():
    assert output_layer_name(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))) == "2.weight"
    assert output_layer_name(nn.Linear(3, 2)) == "weight"
    with pytest.raises(UsageError):
        output_layer_name(nn.Sequential(nn.Conv2d(1, 1, 1)))


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,kwargs,fragment",
    [
        ("transformer", dict(width=8, input_shape=(40,)), "mlp"),
        ("mlp", dict(width=0, input_shape=(40,)), "width"),
        ("mlp", dict(width=8.5, input_shape=(40,)), "width"),
        ("mlp", dict(width=8, depth=0, input_shape=(40,)), "depth"),
        ("resnet18", dict(width=8, depth=2, input_shape=CIFAR), "depth"),
        ("mlp", dict(width=8, input_shape=(40,), maxpool=True), "resnet18"),
        ("mlp", dict(width=8, input_shape=(40,), num_classes=1), "num_classes"),
        ("mlp", dict(width=8, input_shape=()), "input_shape"),
        ("mlp", dict(width=8, input_shape=(0, 4)), "input_shape"),
        ("mlp", dict(width=8, input_shape=40), "input_shape"),
        ("cnn5", dict(width=8, input_shape=(40,)), "(C, H, W)"),
        ("cnn5", dict(width=8, input_shape=(3, 4, 4)), "H, W >= 8"),
        ("resnet18", dict(width=8, input_shape=(40,)), "(C, H, W)"),
        ("vgg_like", dict(width=8, depth=6, input_shape=CIFAR), "H, W >= 64"),
        ("cnn1d", dict(width=8, input_shape=CIFAR), "(L,) or (C, L)"),
        ("cnn1d", dict(width=8, input_shape=(2,)), "L >= 3"),
        ("lenet", dict(width=8, depth=2, input_shape=MNIST), "depth"),
        ("preact_resnet18", dict(width=8, input_shape=(784,)), "(C, H, W)"),
        ("preact_resnet18", dict(width=8, input_shape=CIFAR, maxpool=True), "max-pool"),
    ],
)
def test_bad_input_raises_one_line_usage_error(name, kwargs, fragment):
    kwargs = {"num_classes": 10, **kwargs}
    with pytest.raises(UsageError) as info:
        build_model(name, **kwargs)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message
