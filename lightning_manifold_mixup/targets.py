"""Owns the targets: the table of target kinds, how each mixes with its partner rows.

Each kind of target (:data:`TARGET_KINDS`, looked up by :func:`kind_of`) says how a batch of it
is mixed with its partner rows by a blend (lam) and by a box. Float targets (one-hot, soft,
multi-label, regression) blend as they are; integer class labels ``(B,)`` become float32 soft
targets ``(B, C)`` or a :class:`MixedTarget` pair; integer class maps ``(B, d1, ...)``
(segmentation masks, token labels) stay a :class:`MixedTarget` pair of maps, or under CutMix an
integer map with the partner's box pasted in. The losses and the mixin read the same table.
A new kind of target is one class and one entry in the table. Plain torch, no Lightning.

Example:
    >>> one_hot_mix(torch.tensor([0, 2]), torch.tensor(0.25), torch.tensor([1, 0]), 3)
    tensor([[0.2500, 0.0000, 0.7500],
            [0.7500, 0.0000, 0.2500]])
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_manifold_mixup.draw import Box, lam_tensor
from lightning_manifold_mixup.policies import TargetRule, mix_with_partner, permute_rows

Partner = Callable[[Tensor], Tensor]
"""The partner rows of a ``(B, ...)`` tensor (the pairing's answer for the batch in flight)."""


class MixedTarget(NamedTuple):
    """Targets kept as a pair of class-index tensors and their weight (the "pair" form).

    Stands for the soft target ``lam * one_hot(y_a) + (1 - lam) * one_hot(y_b)`` without
    materialising a ``(B, C)`` matrix. ``y_a`` and ``y_b`` are int64 class labels ``(B,)`` or
    class maps ``(B, d1, ...)`` (a segmentation mask, token labels), ``lam`` is a float32
    tensor of shape ``()`` or ``(B,)``.
    """

    y_a: Tensor
    y_b: Tensor
    lam: Tensor

    def to(self, *args: Any, **kwargs: Any) -> MixedTarget:
        """The pair moved or cast as a tensor's ``to`` would: a device moves all three, a
        dtype applies to the labels (integer dtypes only; lam stays float32).

        Example:
            >>> t = MixedTarget(torch.tensor([0]), torch.tensor([1]), torch.tensor(0.25))
            >>> t.to("cpu", torch.int64).y_b
            tensor([1])
        """
        y_a = self.y_a.to(*args, **kwargs)
        if y_a.is_floating_point() or y_a.is_complex():
            raise TypeError(
                f"MixedTarget.to: class labels cannot become {y_a.dtype}; a float target would "
                "be a soft target. Keep the labels integer and compute the loss with "
                "mixup_loss(logits, target)."
            )
        y_b = self.y_b.to(*args, **kwargs)
        return MixedTarget(y_a, y_b, self.lam.to(device=y_a.device))

    def __getattr__(self, name: str) -> Any:
        # Only for names a tuple lacks: user code that treats the target as a tensor
        # (mask.long(), y.shape) gets the way out instead of a bare AttributeError.
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(
            f"'MixedTarget' has no tensor attribute {name!r}: a mixed target is a pair of "
            "class labels or maps (y_a, y_b) and their weight lam, not one tensor. Compute the "
            "loss with lightning_manifold_mixup.mixup_loss(logits, target) (or "
            "ManifoldMixupMixin.mixup_loss), train metrics against dominant_class(target); "
            ".to(device) moves it."
        )


def one_hot_mix(y: Tensor, lam: Tensor, index: Tensor, num_classes: int) -> Tensor:
    """Soft targets ``lam * one_hot(y) + (1 - lam) * one_hot(y[index])``.

    Args:
        y: ``(B,)`` integer class labels in ``[0, num_classes)``.
        lam: float tensor of shape ``()`` or ``(B,)``.
        index: ``(B,)`` int64 permutation.

    Returns:
        ``(B, num_classes)`` float32 soft targets; each row sums to 1.

    Example:
        >>> one_hot_mix(torch.tensor([0, 2]), torch.tensor(0.25), torch.tensor([1, 0]), 3)
        tensor([[0.2500, 0.0000, 0.7500],
                [0.7500, 0.0000, 0.2500]])
    """
    return one_hot_pair(y, y.index_select(0, index.to(y.device)), lam, num_classes)


def one_hot_pair(y_a: Tensor, y_b: Tensor, lam: Tensor, num_classes: int) -> Tensor:
    """Soft targets ``lam * one_hot(y_a) + (1 - lam) * one_hot(y_b)``, float32 ``(B, C)``.

    Example:
        >>> one_hot_pair(torch.tensor([0]), torch.tensor([2]), torch.tensor(0.25), 3)
        tensor([[0.2500, 0.0000, 0.7500]])
    """
    lam = lam.to(device=y_a.device, dtype=torch.float32)
    lam_col = lam.expand(y_a.shape[0]).unsqueeze(1)
    out = torch.zeros(y_a.shape[0], num_classes, dtype=torch.float32, device=y_a.device)
    out.scatter_add_(1, y_a.unsqueeze(1), lam_col)
    out.scatter_add_(1, y_b.to(y_a.device).unsqueeze(1), 1.0 - lam_col)
    return out


def mix_targets(
    y: Tensor,
    lam: Tensor | float,
    index: Tensor,
    *,
    num_classes: int | None = None,
    pair: bool = False,
) -> Tensor | MixedTarget:
    """Mix a batch of targets with the same ``lam`` and ``index`` as the features.

    Integer labels ``(B,)`` become float32 soft targets ``(B, num_classes)`` (or a
    :class:`MixedTarget` with ``pair=True``). Floating targets of any shape ``(B, ...)``
    (one-hot, soft, multi-label, regression) become ``lam * y + (1 - lam) * y[index]`` in
    their own dtype.
    """
    return mix_targets_with_partner(
        y, permute_rows(y, index), lam, num_classes=num_classes, pair=pair
    )


def mix_targets_with_partner(
    y: Tensor,
    y_partner: Tensor,
    lam: Tensor | float,
    *,
    num_classes: int | None = None,
    pair: bool = False,
) -> Tensor | MixedTarget:
    """:func:`mix_targets` with the partner rows given instead of a permutation.

    For pairings a permutation cannot express (partners from other ranks' batches).
    ``y_partner`` has the shape and dtype of ``y``.
    """
    if y.is_floating_point():
        return mix_with_partner(y, y_partner.to(y.device), lam)
    lam = lam_tensor(lam, y.device)
    if pair:
        return MixedTarget(y, y_partner.to(y.device), lam)
    if num_classes is None:
        raise ValueError("integer targets need num_classes to be turned into soft targets")
    return one_hot_pair(y, y_partner, lam, num_classes)


def soft_targets(target: Tensor | MixedTarget, num_classes: int) -> Tensor:
    """Float32 ``(B, C)`` rows of class labels ``(B,)``, soft targets or a pair.

    Example:
        >>> soft_targets(torch.tensor([1]), 3)
        tensor([[0., 1., 0.]])
    """
    kind = kind_of(target)
    if isinstance(target, MixedTarget):
        return one_hot_pair(target.y_a, target.y_b, target.lam, num_classes)
    if kind is FLOAT:
        return target.float()
    return F.one_hot(target, num_classes).float()


class FloatTargets:
    """One-hot, soft, multi-label or regression targets of any shape: blended as they are,
    in their own dtype (a box blends them with the kept area)."""

    name = "float"

    def blend(self, mixer: TargetMixer, y: Tensor, lam: Tensor, partner: Partner) -> Any:
        return mix_with_partner(y, partner(y), lam, overwrite_partner=True)

    def cut(
        self, mixer: TargetMixer, y: Tensor, lam: Tensor, partner: Partner, box: Box | None
    ) -> Any:
        return self.blend(mixer, y, lam, partner)


class ClassLabels:
    """Integer class labels ``(B,)``: float32 soft targets ``(B, C)`` (``mode="soft"``) or a
    :class:`MixedTarget` (``mode="pair"``); a CutMix batch weighs them by the kept area."""

    name = "labels"

    def blend(self, mixer: TargetMixer, y: Tensor, lam: Tensor, partner: Partner) -> Any:
        y = y if y.dtype == torch.int64 else y.long()  # scatter and gather take int64
        if mixer.mode == "pair":
            return MixedTarget(y, partner(y), lam_tensor(lam, y.device))
        return mixer.soft(y, lam, partner)

    def cut(
        self, mixer: TargetMixer, y: Tensor, lam: Tensor, partner: Partner, box: Box | None
    ) -> Any:
        return self.blend(mixer, y, lam, partner)


class DenseLabels:
    """Integer class maps ``(B, d1, ...)``: segmentation masks ``(B, H, W)``, token labels
    ``(B, T)``. A blend keeps them as a :class:`MixedTarget` pair (never a ``(B, C, ...)``
    float map; the loss weighs the two maps' cross-entropies by lam). A CutMix batch pastes
    the partner's labels in the box, scaled to the map's last two dims: the target stays an
    exact integer map."""

    name = "maps"

    def blend(self, mixer: TargetMixer, y: Tensor, lam: Tensor, partner: Partner) -> Any:
        y = y if y.dtype == torch.int64 else y.long()  # gather and cross-entropy take int64
        return MixedTarget(y, partner(y), lam_tensor(lam, y.device))

    def cut(
        self, mixer: TargetMixer, y: Tensor, lam: Tensor, partner: Partner, box: Box | None
    ) -> Any:
        y = y if y.dtype == torch.int64 else y.long()
        if box is None:  # placed later at a hidden layer: a map to rewrite in place then
            return y.clone()
        if y.ndim < 3:
            raise ValueError(
                f"CutMix pastes a box into the last two dimensions, but the integer targets "
                f"have shape {tuple(y.shape)} (token labels (B, T) have one): set "
                "cutmix_prob=0 for sequence targets"
            )
        return box.paste(y, partner(y))


class _Unsupported:
    """Boolean and complex targets: refused with the way out."""

    name = "unsupported"

    def blend(self, mixer: TargetMixer, y: Tensor, lam: Tensor, partner: Partner) -> Any:
        raise self._error(y)

    def cut(
        self, mixer: TargetMixer, y: Tensor, lam: Tensor, partner: Partner, box: Box | None
    ) -> Any:
        raise self._error(y)

    @staticmethod
    def _error(y: Tensor) -> Exception:
        return TypeError(
            f"unsupported target dtype {y.dtype}: use int64 class labels (B,) or class maps "
            "(B, d1, ...), or float targets (multi-label targets as float (B, C) 0/1 rows)"
        )


FLOAT, LABELS, MAPS, UNSUPPORTED = FloatTargets(), ClassLabels(), DenseLabels(), _Unsupported()
TARGET_KINDS = {kind.name: kind for kind in (FLOAT, LABELS, MAPS, UNSUPPORTED)}
"""Every kind of target by name; :func:`kind_of` says which one a target is."""


def kind_of(y: Tensor | MixedTarget) -> Any:
    """The entry of :data:`TARGET_KINDS` that ``y`` is (a pair is the kind of its labels):
    float of any shape, integer ``(B,)`` labels, integer ``(B, d1, ...)`` maps, or neither.

    Example:
        >>> kind_of(torch.zeros(2, 3)).name, kind_of(torch.zeros(2, 3, dtype=torch.long)).name
        ('float', 'maps')
    """
    if isinstance(y, MixedTarget):
        y = y.y_a
    if y.is_floating_point():
        return FLOAT
    if y.dtype == torch.bool or y.is_complex() or y.ndim == 0:
        return UNSUPPORTED
    return LABELS if y.ndim == 1 else MAPS


class TargetMixer:
    """Mixes a batch's targets with the same lam and partners as its features.

    The label range of class labels is read on the host once per fit (the first mixed batch):
    reading it at every step would synchronise with an accelerator. Later out-of-range labels
    on the CPU fail in the scatter and get the same message.

    Example:
        >>> mixer = TargetMixer("soft", num_classes=3)
        >>> partner = lambda t: t[torch.tensor([1, 0])]
        >>> mixer.mix(torch.tensor([0, 2]), torch.tensor(0.25), partner, "blend")
        tensor([[0.2500, 0.0000, 0.7500],
                [0.7500, 0.0000, 0.2500]])
    """

    def __init__(self, mode: str, num_classes: int | None) -> None:
        self.mode = mode
        self.num_classes = num_classes
        self.checked = False
        self._eye: Tensor | None = None
        # Where num_classes could come from, for the error when it is missing.
        self.missing = (
            "pass ManifoldMixupCallback(num_classes=...), set self.num_classes on the "
            "LightningModule, or save it with self.save_hyperparameters()"
        )

    def mix(
        self, y: Tensor, lam: Tensor, partner: Partner, rule: TargetRule, box: Box | None = None
    ) -> Any:
        """Targets mixed by ``rule`` (the policy's): ``lam`` is a float tensor of shape ``()``
        or ``(B,)``, ``partner`` gives the partner rows of a tensor. ``"paste"``: a CutMix
        batch, whose ``box`` is given once placed (``lam`` is then its kept area); a box placed
        later at a hidden layer gets the targets rewritten by :meth:`correct`. ``"keep"``: the
        targets as an unmixed batch's (:meth:`unmixed`)."""
        if rule == "keep":
            return self.unmixed(y)
        kind = kind_of(y)
        if rule == "paste":
            return kind.cut(self, y, lam, partner, box)
        return kind.blend(self, y, lam, partner)

    def unmixed(self, y: Tensor) -> Any:
        """The targets of a batch that is not mixed, in the form a mixed batch's take (lam 1),
        so ``training_step`` sees one format for the whole fit: float targets as they are,
        class labels as one-hot float32 ``(B, C)`` (a :class:`MixedTarget` ``(y, y, 1)`` with
        ``mode="pair"``), class maps as a :class:`MixedTarget` ``(y, y, 1)``. Also the targets
        of a policy that keeps them (MixStyle).

        Example:
            >>> TargetMixer("soft", num_classes=3).unmixed(torch.tensor([2, 0]))
            tensor([[0., 0., 1.],
                    [1., 0., 0.]])
        """
        kind = kind_of(y)
        if kind is FLOAT:
            return y
        rows = torch.arange(y.shape[0], device=y.device)
        return kind.blend(
            self, y, lam_tensor(1.0, y.device), functools.partial(permute_rows, index=rows)
        )

    def soft(self, y: Tensor, lam: Tensor, partner: Partner) -> Tensor:
        """Soft targets ``(B, num_classes)`` of int64 labels ``(B,)``, range checked once."""
        num_classes = self._classes(y)
        if not self.checked:
            self.checked = True
            # With the partners' labels: under global pairing they are other ranks' rows, and
            # every rank must fail together, not one of them inside a collective.
            check_labels(torch.cat([y, partner(y)]), num_classes)
        try:
            if num_classes <= _EYE_MAX_CLASSES:
                # One-hot rows from a cached identity and one mix: the values of one_hot_pair
                # bit for bit (one term is 0 wherever the labels differ, addition commutes).
                eye = self._eye
                if eye is None or eye.shape[0] != num_classes or eye.device != y.device:
                    eye = self._eye = torch.eye(num_classes, dtype=torch.float32, device=y.device)
                rows = eye.index_select(0, y)
                return mix_with_partner(rows, partner(rows), lam, overwrite_partner=True)
            return one_hot_pair(y, partner(y), lam_tensor(lam, y.device), num_classes)
        except (RuntimeError, IndexError):
            check_labels(y, num_classes)
            raise

    def correct(
        self,
        target: Any,
        original: Tensor,
        lam: Tensor,
        partner: Partner,
        rule: TargetRule,
        box: Box | None = None,
    ) -> None:
        """Rewrite ``target`` in place for a lam fixed later (a box placed at a hidden layer):
        training_step holds this very object."""
        if isinstance(target, MixedTarget):
            target.lam.copy_(lam)
        elif isinstance(target, Tensor) and rule != "keep":
            target.copy_(self.mix(original, lam, partner, rule, box))

    def _classes(self, y: Tensor) -> int:
        if self.num_classes is None:
            binary = ""
            if y.numel() and int(y.min()) >= 0 and int(y.max()) <= 1:  # only on this error path
                binary = (
                    "The labels are all 0 or 1: for a binary classifier with one output logit "
                    "(BCE), make them float instead (y.float() in the dataset or collate_fn): "
                    "float labels are blended as they are and need no num_classes. "
                )
            raise ValueError(
                f"{binary}integer class labels need num_classes to become soft targets: "
                + self.missing
            )
        return self.num_classes


# Soft targets of up to this many classes are rows of a cached identity matrix (4 MiB).
_EYE_MAX_CLASSES = 1024


def check_labels(labels: Tensor, num_classes: int, ignore_index: int | None = None) -> None:
    """Integer labels lie in ``[0, num_classes)`` (or equal ``ignore_index``): one host read.

    The error names the values found and the fix: ``num_classes`` or the dataset for class
    labels, the logits' classes or ``mixup_ignore_index`` for class maps.

    Example:
        >>> check_labels(torch.tensor([[0, 2, -100]]), 3, -100)
        >>> check_labels(torch.tensor([[0, 3]]), 3, -100)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: labels must lie in [0, 3) or equal ignore_index=-100; found 3 ...
    """
    bad = (labels < 0) | (labels >= num_classes)
    if ignore_index is not None:
        bad &= labels != ignore_index
    if not bool(bad.any()):
        return
    if ignore_index is None:
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got values in [{int(labels.min())}, "
            f"{int(labels.max())}]. Fix num_classes or the dataset's labels."
        )
    values = torch.unique(labels[bad])[:5].tolist()
    raise ValueError(
        f"labels must lie in [0, {num_classes}) or equal ignore_index={ignore_index}; "
        f"found {', '.join(map(str, values))} ({int(bad.sum())} entries). Fix the "
        f"dataset's labels, the number of classes on the class axis of the logits "
        f"({num_classes}), or mixup_ignore_index on the LightningModule"
    )
