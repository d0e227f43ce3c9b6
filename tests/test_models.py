"""Reference networks: output shapes, parameter counts, and the named mixing points."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from jsonargparse import ArgumentParser
from torch import nn

from lightning_manifold_mixup_recipes.models import (
    CNN1D,
    MLP,
    PreActBlock,
    PreActResNet18,
    PreActResNet34,
    SmallCNN2D,
)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Run on one intra-op thread: these tiny models gain nothing from a second one, and on a
    busy machine every op then waits until both threads get scheduled (100x slower loops)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def stage_shapes(model: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, tuple]:
    """Output shape of each named submodule in one forward pass, asserting each fires once."""
    shapes: dict[str, list[tuple]] = {name: [] for name in names}
    modules = dict(model.named_modules())
    handles = [
        modules[name].register_forward_hook(
            lambda _m, _i, out, name=name: shapes[name].append(tuple(out.shape))
        )
        for name in names
    ]
    model(x)
    for handle in handles:
        handle.remove()
    # A mixing point must produce exactly one output per forward pass.
    assert all(len(s) == 1 for s in shapes.values()), shapes
    return {name: s[0] for name, s in shapes.items()}


Case = tuple[Callable[[], nn.Module], tuple[int, ...], tuple[int, ...], dict[str, tuple]]

# Each case: model factory, input shape, logits shape, {mixing point: output shape}.
CASES: dict[str, Case] = {
    "preact18": (
        lambda: PreActResNet18(num_classes=10, width=8),
        (2, 3, 32, 32),
        (2, 10),
        {
            "layer1": (2, 8, 32, 32),
            "layer2": (2, 16, 16, 16),
            "layer3": (2, 32, 8, 8),
            "layer4": (2, 64, 4, 4),
        },
    ),
    "preact34_grey": (
        lambda: PreActResNet34(num_classes=100, in_channels=1, width=4),
        (2, 1, 32, 32),
        (2, 100),
        {"layer1": (2, 4, 32, 32), "layer4": (2, 32, 4, 4)},
    ),
    "cnn1d": (
        lambda: CNN1D(),
        (3, 1, 40),
        (3, 10),
        {"block1": (3, 32, 20), "block2": (3, 32, 10), "block3": (3, 32, 5)},
    ),
    "cnn1d_odd_length": (
        lambda: CNN1D(num_classes=4, in_channels=2, input_length=41, channels=8),
        (3, 2, 41),
        (3, 4),
        {"block1": (3, 8, 21), "block3": (3, 8, 6)},
    ),
    "mlp": (
        lambda: MLP(2, 3),
        (5, 2),
        (5, 3),
        {"layers.1": (5, 128), "layers.3": (5, 128)},
    ),
    "mlp_bottleneck": (
        lambda: MLP(2, 3, hidden=(16, 8), bottleneck=2, activation="tanh"),
        (5, 2),
        (5, 3),
        {"layers.3": (5, 8), "bottleneck": (5, 2)},
    ),
    "mlp_flattens_images": (
        lambda: MLP(64, 10, hidden=(32,)),
        (4, 1, 8, 8),
        (4, 10),
        {"layers.1": (4, 32)},
    ),
    "small_cnn": (
        lambda: SmallCNN2D(),
        (4, 1, 8, 8),
        (4, 10),
        {"block1": (4, 32, 8, 8), "block2": (4, 64, 4, 4)},
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_output_and_mixing_point_shapes(case: Case) -> None:
    make_model, input_shape, logits_shape, points = case
    model, x = make_model(), torch.randn(input_shape)
    assert model(x).shape == logits_shape
    assert stage_shapes(model, x, list(points)) == points


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_models_can_fit_a_small_batch(case: Case) -> None:
    make_model, input_shape, logits_shape, _ = case
    model, x = make_model(), torch.randn(input_shape)
    y = torch.arange(len(x)) % logits_shape[1]
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-2)
    model.train()
    losses = []
    for _ in range(20):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # Loose enough for the 2-unit tanh bottleneck; a network that cannot learn keeps a ratio near 1.
    assert losses[-1] < 0.6 * losses[0]


def test_preact_resnet_parameter_counts() -> None:
    # Conv/BN/linear weights of the CIFAR PreActResNet with a final BN, as in the paper's code.
    resnet18 = num_params(PreActResNet18())
    assert resnet18 == 11_172_170
    assert 11.1e6 < resnet18 < 11.3e6
    assert num_params(PreActResNet34()) == 21_280_330
    assert num_params(PreActResNet18(num_classes=100)) == resnet18 + 90 * (512 + 1)


def test_preact_resnet_layout() -> None:
    net = PreActResNet18(width=16)
    names = {name for name, _ in net.named_children()}
    assert {"conv1", "layer1", "layer2", "layer3", "layer4", "bn", "linear"} == names
    assert [len(getattr(net, f"layer{i}")) for i in range(1, 5)] == [2, 2, 2, 2]
    deeper = PreActResNet34(width=4)
    assert [len(getattr(deeper, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    # CIFAR stem: a stride-1 3x3 conv and no max-pool, so layer1 works at full resolution.
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.layer1[0], PreActBlock)


def test_preact_block_shortcuts() -> None:
    same = PreActBlock(8, 8)
    assert same.shortcut is None
    x = torch.randn(2, 8, 6, 6)
    # Zeroed residual branch: an identity shortcut returns the input unchanged.
    nn.init.zeros_(same.conv2.weight)
    torch.testing.assert_close(same(x), x)

    down = PreActBlock(8, 16, stride=2)
    assert isinstance(down.shortcut, nn.Conv2d)
    assert down(x).shape == (2, 16, 3, 3)


def test_mlp_structure() -> None:
    plain = MLP(2, 3, hidden=(4, 5))
    assert plain.bottleneck is None
    assert "bottleneck" not in dict(plain.named_modules())
    kinds = [type(m) for m in plain.layers]
    assert kinds == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU]

    narrow = MLP(2, 3, hidden=(4,), bottleneck=2)
    assert narrow.bottleneck is not None
    assert [type(m) for m in narrow.bottleneck] == [nn.Linear, nn.ReLU]
    assert stage_shapes(narrow, torch.randn(7, 2), ["bottleneck"]) == {"bottleneck": (7, 2)}
    tanh = MLP(2, 3, hidden=(4,), activation="tanh")
    assert [type(m) for m in tanh.layers] == [nn.Linear, nn.Tanh]

    linear = MLP(4, 2, hidden=())
    assert len(linear.layers) == 0 and linear(torch.randn(3, 4)).shape == (3, 2)

    with pytest.raises(ValueError, match="activation"):
        MLP(2, 3, activation="gelu")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("cls", "args", "check"),
    [
        (
            MLP,
            ["--model.in_features=2", "--model.num_classes=3", "--model.hidden=[8, 4]"],
            {"head": (3, 4)},
        ),
        (PreActResNet18, ["--model.num_classes=100", "--model.width=4"], {"linear": (100, 32)}),
        (CNN1D, ["--model.channels=8"], {"head.1": (10, 40)}),
        (SmallCNN2D, ["--model.channels=4"], {"head.2": (10, 8)}),
    ],
)
def test_models_are_cli_parsable(
    cls: type[nn.Module], args: list[str], check: dict[str, tuple[int, int]]
) -> None:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "model")
    kwargs: dict[str, Any] = parser.parse_args(args).model.as_dict()
    model = cls(**kwargs)
    modules = dict(model.named_modules())
    for name, weight_shape in check.items():
        assert tuple(modules[name].weight.shape) == weight_shape
