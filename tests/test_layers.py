"""Layer names: resolution, errors with close matches, wrappers, automatic selection."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torchvision
from torch import Tensor, nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from conftest import Holder
from lightning_manifold_mixup import candidate_layers, normalize_name, resolve_layers
from lightning_manifold_mixup.layers import named_layers


def resnet18() -> nn.Module:
    return torchvision.models.resnet18(num_classes=10)


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("module.net.layer1", "net.layer1"),
        ("net._fsdp_wrapped_module.layer1", "net.layer1"),
        ("net.layer1._checkpoint_wrapped_module.0", "net.layer1.0"),
        ("_orig_mod.net._orig_mod.layer2", "net.layer2"),
        ("net.layer3", "net.layer3"),
    ],
)
def test_wrapper_segments_are_removed(raw: str, clean: str) -> None:
    assert normalize_name(raw) == clean


def test_resnet_auto_selection_picks_the_four_stages() -> None:
    assert candidate_layers(Holder(resnet18())) == [
        "net.layer1",
        "net.layer2",
        "net.layer3",
        "net.layer4",
    ]


def test_resnet50_auto_selection_stays_at_stage_boundaries() -> None:
    chosen = candidate_layers(torchvision.models.resnet50())
    assert chosen == ["layer1", "layer2", "layer3", "layer4"]


def test_transformer_auto_selection_picks_each_encoder_layer() -> None:
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, batch_first=True)
    model = Holder(nn.Sequential())
    model.embed = nn.Linear(4, 16)
    model.encoder = nn.TransformerEncoder(layer, num_layers=3, enable_nested_tensor=False)
    model.head = nn.Linear(16, 2)
    assert candidate_layers(model) == ["encoder.layers.0", "encoder.layers.1", "encoder.layers.2"]


def test_mlp_auto_selection_picks_hidden_activations() -> None:
    model = Holder(
        nn.Sequential(nn.Linear(3, 5), nn.GELU(), nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 2))
    )
    assert candidate_layers(model) == ["net.1", "net.3"]


def test_auto_selection_sees_through_compile_and_checkpoint_wrappers() -> None:
    net = resnet18()
    net.layer1 = checkpoint_wrapper(net.layer1)
    holder = Holder(torch.compile(net, backend="eager"))
    assert candidate_layers(holder) == ["net.layer1", "net.layer2", "net.layer3", "net.layer4"]
    assert resolve_layers(holder, ["net.layer1", "net.layer*"]) == candidate_layers(holder)


def test_names_and_patterns_resolve_in_order_without_duplicates() -> None:
    model = Holder(resnet18())
    assert resolve_layers(model, ["input", "net.layer2", "net.layer[12]"]) == [
        "input",
        "net.layer2",
        "net.layer1",
    ]


# --------------------------------------------------------------------------- model zoos
# A layer is a sound mixing point when the model's output depends on its input only through
# that layer's output: then a skip connection or parallel branch cannot carry the unmixed
# batch around it. Checked through autograd, independently of the selection rule: with the
# layer's output detached (and no parameter requiring grad) the output must not require grad.
# Models run on the meta device (no weights, no compute) where their constructors allow it.
# The whole zoo runs with -m slow; the default run keeps the models that once failed.

TORCHVISION_ZOO: list[Any] = [
    "resnet18",
    pytest.param("wide_resnet50_2", marks=pytest.mark.slow),
    pytest.param("resnext50_32x4d", marks=pytest.mark.slow),
    "vit_b_16",
    pytest.param("swin_t", marks=pytest.mark.slow),
    pytest.param("swin_v2_t", marks=pytest.mark.slow),
    pytest.param("convnext_tiny", marks=pytest.mark.slow),
    "mobilenet_v2",
    pytest.param("mobilenet_v3_small", marks=pytest.mark.slow),
    pytest.param("mobilenet_v3_large", marks=pytest.mark.slow),
    pytest.param("efficientnet_b0", marks=pytest.mark.slow),
    pytest.param("efficientnet_v2_s", marks=pytest.mark.slow),
    pytest.param("densenet121", marks=pytest.mark.slow),
    pytest.param("regnet_y_400mf", marks=pytest.mark.slow),
    pytest.param("regnet_x_400mf", marks=pytest.mark.slow),
]
TIMM_ZOO: list[Any] = [
    pytest.param("resnet18", marks=pytest.mark.slow),
    pytest.param("wide_resnet50_2", marks=pytest.mark.slow),
    pytest.param("resnext26ts", marks=pytest.mark.slow),
    "vit_tiny_patch16_224",
    pytest.param("swin_tiny_patch4_window7_224", marks=pytest.mark.slow),
    pytest.param("convnext_atto", marks=pytest.mark.slow),
    pytest.param("mobilenetv2_100", marks=pytest.mark.slow),
    pytest.param("mobilenetv3_small_100", marks=pytest.mark.slow),
    pytest.param("efficientnet_b0", marks=pytest.mark.slow),
    pytest.param("densenet121", marks=pytest.mark.slow),
    "regnetx_002",
    pytest.param("regnety_002", marks=pytest.mark.slow),
]


def _build(factory: Callable[[], nn.Module]) -> tuple[nn.Module, torch.device]:
    try:
        with torch.device("meta"):
            return factory(), torch.device("meta")
    except (NotImplementedError, RuntimeError):  # initialisers that read values (RegNet)
        return factory(), torch.device("cpu")


def _detach_all(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach()
    if isinstance(obj, (tuple, list)):
        return type(obj)(_detach_all(v) for v in obj)
    return obj


def _depends_on_input(out: Any) -> bool:
    if isinstance(out, Tensor):
        return out.requires_grad
    if isinstance(out, (tuple, list)):
        return any(_depends_on_input(v) for v in out)
    if isinstance(out, dict):
        return any(_depends_on_input(v) for v in out.values())
    return False


def bypassed_layers(model: nn.Module, names: list[str], device: torch.device) -> list[str]:
    """The layers in ``names`` that do not run exactly once or that some data path bypasses."""
    model.eval().requires_grad_(False)
    modules = named_layers(model)
    size = 224 if device.type == "meta" else 64
    bad = []
    for name in names:
        calls = 0

        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            nonlocal calls
            calls += 1
            return _detach_all(output)

        handle = modules[name].register_forward_hook(hook)
        try:
            x = torch.randn(1, 3, size, size, device=device, requires_grad=True)
            out = model(x)
        finally:
            handle.remove()
        if calls != 1 or _depends_on_input(out):
            bad.append(name)
    return bad


def test_bypass_check_flags_a_layer_inside_a_residual_block() -> None:
    model, device = _build(lambda: torchvision.models.resnet18(num_classes=10))
    assert bypassed_layers(model, ["layer1.0.relu", "layer1.0.conv2"], device) == [
        "layer1.0.relu",
        "layer1.0.conv2",
    ]
    assert bypassed_layers(model, ["layer1", "layer2.1"], device) == []


@pytest.mark.parametrize("name", TORCHVISION_ZOO)
def test_torchvision_candidates_are_never_bypassed_by_a_skip(name: str) -> None:
    model, device = _build(lambda: torchvision.models.get_model(name))
    chosen = candidate_layers(model)
    assert chosen, f"no candidate for {name}"
    assert bypassed_layers(model, chosen, device) == []


@pytest.mark.parametrize("name", TIMM_ZOO)
def test_timm_candidates_are_never_bypassed_by_a_skip(name: str) -> None:
    timm = pytest.importorskip("timm")
    model, device = _build(lambda: timm.create_model(name, pretrained=False))
    chosen = candidate_layers(model)
    assert chosen, f"no candidate for {name}"
    assert bypassed_layers(model, chosen, device) == []


class Residual(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class SharedActivation(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(4, 4), nn.Linear(4, 4), nn.ReLU()
        self.out = nn.Tanh()

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.act(self.fc2(self.act(self.fc1(x)))))


def test_nothing_inside_a_skip_connection_is_selected() -> None:
    model = Holder(Residual(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))))
    model.head = nn.Sequential(nn.ReLU(), nn.Linear(4, 2))
    assert candidate_layers(model) == ["head.0"]


def test_an_activation_called_twice_is_not_selected() -> None:
    assert candidate_layers(Holder(SharedActivation())) == ["net.out"]


class CachesFeatures(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        self.last: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        self.last = self.body(x)
        return self.last


def test_selection_leaves_attributes_assigned_in_forward_untouched() -> None:
    model = CachesFeatures()
    assert candidate_layers(model) == ["body.1"]
    assert model.last is None


def test_vit_candidates_are_the_encoder_blocks() -> None:
    model, _ = _build(lambda: torchvision.models.vit_b_16())
    assert candidate_layers(model) == [f"encoder.layers.encoder_layer_{i}" for i in range(12)]


def test_mobilenet_v2_candidates_are_the_blocks_never_their_insides() -> None:
    model, _ = _build(lambda: torchvision.models.mobilenet_v2())
    assert candidate_layers(model) == [
        "features.0.2",
        *(f"features.{i}" for i in range(1, 18)),
        "features.18.2",
    ]
