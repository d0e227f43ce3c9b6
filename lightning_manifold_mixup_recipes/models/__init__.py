"""Reference networks whose named submodules serve as Manifold Mixup points."""

from lightning_manifold_mixup_recipes.models.bottleneck_mlp import BottleneckMLP
from lightning_manifold_mixup_recipes.models.cnn1d import CNN1D
from lightning_manifold_mixup_recipes.models.mlp import MLP
from lightning_manifold_mixup_recipes.models.preact_resnet import (
    PreActBlock,
    PreActResNet,
    PreActResNet18,
    PreActResNet34,
)
from lightning_manifold_mixup_recipes.models.small_cnn import SmallCNN2D

__all__ = [
    "CNN1D",
    "MLP",
    "BottleneckMLP",
    "PreActBlock",
    "PreActResNet",
    "PreActResNet18",
    "PreActResNet34",
    "SmallCNN2D",
]
