"""A small 2D CNN for tiny images such as scikit-learn's 8x8 digits."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["SmallCNN2D"]


class SmallCNN2D(nn.Module):
    """Two Conv2d+BN+ReLU stages, global average pooling and a linear head.

    Maps (B, in_channels, H, W) to logits (B, num_classes). ``block1`` keeps the resolution with
    ``channels`` maps, ``block2`` halves it with ``2 * channels`` maps (8x8 -> 8x8 -> 4x4 for
    digits); their outputs are the natural Manifold Mixup points.

    >>> import torch
    >>> SmallCNN2D()(torch.zeros(3, 1, 8, 8)).shape
    torch.Size([3, 10])
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, channels: int = 32) -> None:
        super().__init__()
        # No conv bias: the following BatchNorm's shift makes it redundant.
        self.block1 = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
        )
        self.block2 = nn.Sequential(
            nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * channels),
            nn.ReLU(),
        )
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * channels, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_channels, H, W) -> logits (B, num_classes)."""
        return self.head(self.block2(self.block1(x)))
