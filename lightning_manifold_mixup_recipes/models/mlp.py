"""A fully connected classifier with an optional low-dimensional bottleneck."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import Tensor, nn

__all__ = ["MLP"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh}


class MLP(nn.Module):
    """Linear+activation layers, an optional bottleneck, and a linear head.

    Inputs (B, *) are flattened to (B, in_features); output is logits (B, num_classes).
    ``layers`` is an ``nn.Sequential`` alternating Linear and activation modules, so e.g.
    ``layers.1`` is the first hidden representation. With ``bottleneck=k``, ``bottleneck`` is a
    Linear+activation block of width k before the head; ``bottleneck=2`` gives the paper's
    Figure 1 setting, whose (B, 2) output can be read with a forward hook and plotted. Both units
    of a 2-unit ReLU bottleneck can die early in training, leaving a constant prediction;
    ``activation="tanh"`` avoids that.

    >>> import torch
    >>> MLP(2, 3, hidden=(16,), bottleneck=2)(torch.zeros(5, 2)).shape
    torch.Size([5, 3])
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: Sequence[int] = (128, 128),
        bottleneck: int | None = None,
        activation: Literal["relu", "tanh"] = "relu",
    ) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}"
            )
        act = _ACTIVATIONS[activation]
        layers: list[nn.Module] = []
        features = in_features
        for width in hidden:
            layers += [nn.Linear(features, width), act()]
            features = width
        self.layers = nn.Sequential(*layers)
        self.bottleneck: nn.Sequential | None = None
        if bottleneck is not None:
            self.bottleneck = nn.Sequential(nn.Linear(features, bottleneck), act())
            features = bottleneck
        self.head = nn.Linear(features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """(B, *) with in_features elements per sample -> logits (B, num_classes)."""
        out = self.layers(x.flatten(1))
        if self.bottleneck is not None:
            out = self.bottleneck(out)
        return self.head(out)
