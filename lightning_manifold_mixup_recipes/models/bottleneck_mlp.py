"""The fully connected bottleneck networks of the paper's MNIST experiments (Appendix B and G)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["BottleneckMLP"]


def _stack(features: int, widths: Sequence[int], slope: float) -> tuple[nn.Sequential, int]:
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Linear(features, width), nn.LeakyReLU(slope)]
        features = width
    return nn.Sequential(*layers), features


class BottleneckMLP(nn.Module):
    """``encoder`` (Linear+LeakyReLU layers) -> linear ``bottleneck`` -> ``decoder`` -> ``head``.

    Inputs (B, *) are flattened to (B, in_features); output is logits (B, num_classes). The
    ``bottleneck`` is a Linear layer of width ``bottleneck`` with no activation (followed by
    ``BatchNorm1d`` when ``bottleneck_norm``, as the official code's 2-D MNIST script has it);
    its output is the mixing point and the representation the paper's Appendix G measures.
    ``encoder.1`` is the first hidden layer's activation (paper section 3.2).

    The defaults are Appendix G's network: 784 -> 3 x 1024 -> 12 -> 4 x 1024 -> 10; Appendix B's
    Figure 5 uses ``encoder=(1024, 1024), bottleneck=2, decoder=(1024, 1024)``.

    >>> import torch
    >>> BottleneckMLP(784, 10, encoder=(8,), bottleneck=2, decoder=(8,))(torch.zeros(3, 784)).shape
    torch.Size([3, 10])
    """

    def __init__(
        self,
        in_features: int = 784,
        num_classes: int = 10,
        encoder: Sequence[int] = (1024, 1024, 1024),
        bottleneck: int = 12,
        decoder: Sequence[int] = (1024, 1024, 1024, 1024),
        bottleneck_norm: bool = False,
        negative_slope: float = 0.01,
    ) -> None:
        super().__init__()
        if bottleneck < 1:
            raise ValueError(f"bottleneck must be positive, got {bottleneck}")
        self.encoder, features = _stack(in_features, encoder, negative_slope)
        linear = nn.Linear(features, bottleneck)
        self.bottleneck: nn.Module = (
            nn.Sequential(linear, nn.BatchNorm1d(bottleneck)) if bottleneck_norm else linear
        )
        self.decoder, features = _stack(bottleneck, decoder, negative_slope)
        self.head = nn.Linear(features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """(B, *) with in_features elements per sample -> logits (B, num_classes)."""
        return self.head(self.decoder(self.bottleneck(self.encoder(x.flatten(1)))))
