"""A small 1D CNN for MNIST-1D."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["CNN1D"]


class CNN1D(nn.Module):
    """Three stride-2 Conv1d+ReLU blocks and a linear head.

    Maps (B, in_channels, input_length) to logits (B, num_classes). The blocks ``block1``,
    ``block2`` and ``block3`` halve the length (40 -> 20 -> 10 -> 5 for MNIST-1D) and their outputs
    are the natural Manifold Mixup points; ``head`` flattens and classifies.

    >>> import torch
    >>> CNN1D()(torch.zeros(4, 1, 40)).shape
    torch.Size([4, 10])
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        input_length: int = 40,
        channels: int = 32,
    ) -> None:
        super().__init__()
        self.block1 = nn.Sequential(
            nn.Conv1d(in_channels, channels, 5, stride=2, padding=2), nn.ReLU()
        )
        self.block2 = nn.Sequential(
            nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU()
        )
        self.block3 = nn.Sequential(
            nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU()
        )
        length = input_length
        for _ in range(3):
            # Both kernel/padding pairs above give ceil(length / 2) at stride 2.
            length = (length + 1) // 2
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(channels * length, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_channels, input_length) -> logits (B, num_classes)."""
        return self.head(self.block3(self.block2(self.block1(x))))
