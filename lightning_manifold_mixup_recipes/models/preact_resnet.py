"""Pre-activation ResNets for 32x32 images (He et al., 2016, "Identity Mappings in Deep Residual
Networks"), in the CIFAR layout used by the Manifold Mixup paper."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PreActBlock", "PreActResNet", "PreActResNet18", "PreActResNet34"]


class PreActBlock(nn.Module):
    """Basic block ``x + conv(relu(bn(conv(relu(bn(x))))))``.

    Maps (B, in_channels, H, W) to (B, out_channels, H / stride, W / stride); a 1x1 projection
    replaces the identity shortcut when the shape changes.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C_in, H, W) -> (B, C_out, H / stride, W / stride)."""
        out = F.relu(self.bn1(x))
        # The projection reads the pre-activated input, as in He et al.'s pre-activation design.
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """Pre-activation ResNet: 3x3 stem, four stages, BN-ReLU, global average pool, linear head.

    Stage ``layer{i}`` has ``num_blocks[i - 1]`` blocks with ``width * 2 ** (i - 1)`` channels and
    strides 1, 2, 2, 2 (no stem max-pool), so a (B, C, 32, 32) input gives stage outputs of
    spatial size 32, 16, 8 and 4; the stage outputs (``layer1`` ... ``layer4``) are the natural
    Manifold Mixup points. Output: logits (B, num_classes).
    """

    def __init__(
        self,
        num_blocks: Sequence[int],
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 64,
    ) -> None:
        super().__init__()
        if len(num_blocks) != 4:
            raise ValueError(f"num_blocks needs one entry per stage (4), got {list(num_blocks)}")
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.layer1 = self._stage(width, width, num_blocks[0], stride=1)
        self.layer2 = self._stage(width, 2 * width, num_blocks[1], stride=2)
        self.layer3 = self._stage(2 * width, 4 * width, num_blocks[2], stride=2)
        self.layer4 = self._stage(4 * width, 8 * width, num_blocks[3], stride=2)
        self.bn = nn.BatchNorm2d(8 * width)
        self.linear = nn.Linear(8 * width, num_classes)

    @staticmethod
    def _stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [PreActBlock(in_channels, out_channels, stride)]
        layers += [PreActBlock(out_channels, out_channels) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_channels, H, W) -> logits (B, num_classes)."""
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        # Pre-activation blocks end on a raw sum, so the head needs its own BN-ReLU.
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


class PreActResNet18(PreActResNet):
    """PreActResNet with (2, 2, 2, 2) blocks: about 11.2M parameters at width 64, 10 classes.

    >>> import torch
    >>> PreActResNet18(num_classes=100, width=8)(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 100])
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 64) -> None:
        super().__init__((2, 2, 2, 2), num_classes, in_channels, width)


class PreActResNet34(PreActResNet):
    """PreActResNet with (3, 4, 6, 3) blocks: about 21.3M parameters at width 64, 10 classes."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 64) -> None:
        super().__init__((3, 4, 6, 3), num_classes, in_channels, width)
