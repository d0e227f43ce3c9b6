"""Layer names: resolution, errors with close matches, wrappers, automatic selection."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from lightning_manifold_mixup import candidate_layers, normalize_name, resolve_layers


class Holder(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net


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


def test_unknown_name_suggests_close_matches_and_lists_available() -> None:
    with pytest.raises(
        ValueError, match=r"unknown layer 'net\.layr1'; did you mean 'net\.layer1'"
    ) as err:
        resolve_layers(Holder(resnet18()), ["net.layr1"])
    assert "Available: 'input', 'net', 'net.conv1'" in str(err.value)


def test_pattern_that_matches_nothing_is_refused() -> None:
    with pytest.raises(ValueError, match=r"layer pattern 'net\.block\*' matches no submodule"):
        resolve_layers(Holder(resnet18()), ["net.block*"])


def test_empty_layer_list_is_refused() -> None:
    with pytest.raises(ValueError, match="layers is empty"):
        resolve_layers(Holder(resnet18()), [])


def test_model_without_candidates_needs_explicit_layers() -> None:
    with pytest.raises(ValueError, match="could not select layers automatically"):
        resolve_layers(Holder(nn.Linear(3, 2)), None)
