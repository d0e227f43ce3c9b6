"""``TargetMixer``: a batch's targets mixed with the same lam and partners as its features."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_manifold_mixup.mixing import (
    MixedTarget,
    lam_tensor,
    mix_targets,
    mix_targets_with_partner,
    mix_tensor,
)


class TargetMixer:
    """Float targets (one-hot, soft, multi-label, regression) are mixed as they are; integer
    class labels become float32 ``(B, num_classes)`` soft targets (``mode="soft"``) or a
    :class:`MixedTarget` (``mode="pair"``).

    The label range is read on the host once per fit (the first mixed batch): reading it at
    every step would synchronise with an accelerator. Later out-of-range labels on the CPU
    fail in the scatter and get the same message.

    Example:
        >>> mixer = TargetMixer("soft", num_classes=3)
        >>> mixer.mix(torch.tensor([0, 2]), torch.tensor(0.25), torch.tensor([1, 0]))
        tensor([[0.2500, 0.0000, 0.7500],
                [0.7500, 0.0000, 0.2500]])
    """

    def __init__(self, mode: str, num_classes: int | None) -> None:
        self.mode = mode
        self.num_classes = num_classes
        self.checked = False
        self._eye: Tensor | None = None

    def mix(
        self, y: Tensor, lam: Tensor | float, index: Tensor, partner: Tensor | None = None
    ) -> Any:
        """Mixed targets; ``lam`` is a float tensor of shape ``()`` or ``(B,)`` or a Python
        number; ``partner`` holds the partner rows when they come from other ranks."""
        if y.is_floating_point():
            if partner is not None:
                return mix_targets_with_partner(y, partner, lam)
            return mix_targets(y, lam, index)
        y, partner = _class_labels(y), None if partner is None else _class_labels(partner)
        if self.mode == "pair":
            lam = lam_tensor(lam, y.device)
            if partner is not None:
                return mix_targets_with_partner(y, partner, lam, pair=True)
            return mix_targets(y, lam, index, pair=True)
        num_classes = self._classes()
        # Partner labels come from other ranks, whose own check runs only after this one.
        labels = y if partner is None else torch.cat([y, partner])
        if not self.checked:
            self.checked = True
            check_label_range(labels, num_classes)
        try:
            return self._soft(y, lam, index, partner, num_classes)
        except (RuntimeError, IndexError):
            check_label_range(labels, num_classes)
            raise

    def _soft(
        self, y: Tensor, lam: Tensor | float, index: Tensor, partner: Tensor | None, classes: int
    ) -> Any:
        if partner is None and not isinstance(lam, Tensor) and classes <= _EYE_MAX_CLASSES:
            # One-hot rows from a cached identity and one mix: the values of one_hot_pair
            # bit for bit (one term is 0 wherever the labels differ, addition commutes).
            if self._eye is None or self._eye.shape[0] != classes or self._eye.device != y.device:
                self._eye = torch.eye(classes, dtype=torch.float32, device=y.device)
            return mix_tensor(self._eye.index_select(0, y), lam, index)
        lam = lam_tensor(lam, y.device)
        if partner is not None:
            return mix_targets_with_partner(y, partner, lam, num_classes=classes)
        return mix_targets(y, lam, index, num_classes=classes)

    def correct(self, target: Any, original: Tensor, lam: Tensor, index: Tensor) -> None:
        """Rewrite ``target`` in place for a lam fixed later (CutMix's kept area)."""
        if isinstance(target, MixedTarget):
            target.lam.copy_(lam)
        elif isinstance(target, Tensor):
            target.copy_(self.mix(original, lam, index))

    def _classes(self) -> int:
        if self.num_classes is None:
            raise ValueError(
                "integer class labels need num_classes to become soft targets: pass "
                "ManifoldMixupCallback(num_classes=...), set self.num_classes on the "
                "LightningModule, or save it with self.save_hyperparameters()"
            )
        return self.num_classes


# Soft targets of up to this many classes are rows of a cached identity matrix (4 MiB).
_EYE_MAX_CLASSES = 1024


def _class_labels(y: Tensor) -> Tensor:
    """Integer class labels ``(B,)`` as int64 (scatter and gather take int64 indices)."""
    if y.dtype == torch.bool or y.is_complex():
        raise TypeError(
            f"unsupported target dtype {y.dtype}: use int64 class labels or float targets"
        )
    if y.ndim != 1:
        raise ValueError(
            f"integer targets must be class labels of shape (B,), got shape "
            f"{tuple(y.shape)}. Multi-label targets must be float (B, C) tensors."
        )
    return y if y.dtype == torch.int64 else y.long()


def check_label_range(labels: Tensor, num_classes: int) -> None:
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got values in [{lo}, {hi}]. "
            "Fix num_classes or the dataset's labels."
        )
