"""Owns the losses: class indices, soft targets, class maps or :class:`MixedTarget` pairs.

All losses upcast logits to float32 and run with autocast disabled, so they give the same
value under ``16-mixed``/``bf16-mixed`` as in float32 and never overflow in half precision.

Example:
    >>> import torch
    >>> logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    >>> soft = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> hard = torch.tensor([0, 1])
    >>> bool(torch.isclose(soft_cross_entropy(logits, soft), soft_cross_entropy(logits, hard)))
    True
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_manifold_mixup.targets import FLOAT, MAPS, MixedTarget, kind_of, soft_targets

Criterion = Literal["ce", "bce", "bce_with_logits"]
Target = Tensor | MixedTarget


def _no_autocast(device_type: str) -> AbstractContextManager[Any]:
    """Autocast off for ``device_type``; devices without autocast (e.g. ``meta``) need none."""
    available = getattr(torch.amp, "is_autocast_available", None)  # torch >= 2.4
    if available is not None and not available(device_type):
        return nullcontext()
    try:
        return torch.autocast(device_type=device_type, enabled=False)
    except RuntimeError:  # before torch 2.4: refused for a device without autocast
        return nullcontext()


class _PairCrossEntropy(torch.autograd.Function):
    """Row mean of ``-(1 - eps) * (lam * logp[y_a] + (1 - lam) * logp[y_b]) - eps * mean(logp)``.

    ``logp = log_softmax(z)`` is kept from the forward, as fused class-index cross-entropy
    keeps it, and the backward builds one ``(B, C)`` tensor: ``softmax`` with the target
    weights scattered into it in place.
    """

    @staticmethod
    def forward(ctx: Any, z: Tensor, y_a: Tensor, y_b: Tensor, lam: Tensor, eps: float) -> Tensor:
        logp = torch.log_softmax(z, dim=1)
        lp_a = logp.gather(1, y_a.unsqueeze(1)).squeeze(1)
        lp_b = logp.gather(1, y_b.unsqueeze(1)).squeeze(1)
        loss = -(1.0 - eps) * (lam * lp_a + (1.0 - lam) * lp_b)
        if eps:
            loss = loss - eps * logp.mean(dim=1)
        ctx.save_for_backward(logp, y_a, y_b, lam)
        ctx.eps = eps
        return loss.mean()

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        logp, y_a, y_b, lam = ctx.saved_tensors
        eps = ctx.eps
        batch, num_classes = logp.shape
        grad = torch.exp(logp)
        weight = (1.0 - eps) * lam.expand(batch).unsqueeze(1)
        grad.scatter_add_(1, y_a.unsqueeze(1), -weight)
        grad.scatter_add_(1, y_b.unsqueeze(1), weight - (1.0 - eps))
        if eps:
            grad.sub_(eps / num_classes)
        grad.mul_(grad_out / batch)
        return grad, None, None, None, None


def pair_cross_entropy(
    logits: Tensor, target: MixedTarget, *, label_smoothing: float = 0.0
) -> Tensor:
    """Cross-entropy against the soft target ``lam * one_hot(y_a) + (1 - lam) * one_hot(y_b)``.

    No ``(B, C)`` target matrix is built: per row the loss is
    ``-(lam * logp[y_a] + (1 - lam) * logp[y_b])`` with ``logp = log_softmax(z)``, which equals
    ``logsumexp(z) - lam * z[y_a] - (1 - lam) * z[y_b]`` (with label smoothing ``eps``: the
    gathered term scaled by ``1 - eps`` and ``eps * mean(logp)`` subtracted), averaged over the
    batch. Equal in value and gradient to :func:`soft_cross_entropy` on the soft target.

    Args:
        logits: ``(B, C)``.
        target: :class:`MixedTarget` with ``(B,)`` labels and ``lam`` of shape ``()`` or ``(B,)``.
    """
    with _no_autocast(logits.device.type):
        z = logits.float()
        lam = target.lam.to(device=z.device, dtype=torch.float32)
        out: Tensor = _PairCrossEntropy.apply(z, target.y_a, target.y_b, lam, label_smoothing)
        return out


def soft_cross_entropy(logits: Tensor, target: Target, *, label_smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy for class indices ``(B,)``, soft targets ``(B, C)`` or a pair.

    Args:
        logits: ``(B, C)`` of any floating dtype; computed in float32.
        target: int64 ``(B,)``, floating ``(B, C)`` rows summing to 1, or :class:`MixedTarget`.

    Returns:
        A float32 scalar.
    """
    if isinstance(target, MixedTarget):
        return pair_cross_entropy(logits, target, label_smoothing=label_smoothing)
    with _no_autocast(logits.device.type):
        if target.is_floating_point():
            target = target.float()
        return F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)


def bce_softmax_loss(logits: Tensor, target: Target, *, label_smoothing: float = 0.0) -> Tensor:
    """Binary cross-entropy between ``softmax(logits)`` and the (soft) one-hot target.

    The criterion of the paper's reference experiments, averaged over all ``B * C`` entries.
    Class indices and pairs are expanded to one-hot rows first.
    """
    num_classes = logits.shape[-1]
    with _no_autocast(logits.device.type):
        z = logits.float()
        soft = soft_targets(target, num_classes)
        if label_smoothing:
            soft = soft * (1.0 - label_smoothing) + label_smoothing / num_classes
        return F.binary_cross_entropy(torch.softmax(z, dim=-1), soft)


def mixup_loss(
    logits: Tensor,
    target: Target,
    *,
    criterion: Criterion = "ce",
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    class_axis: int | None = None,
) -> Tensor:
    """The training loss for mixed or unmixed batches, in float32.

    Args:
        logits: ``(B, C)``; for class maps ``(B, C, d1, ...)`` or ``(B, d1, ..., C)``.
        target: class indices ``(B,)``, soft targets ``(B, C)``, class maps ``(B, d1, ...)``
            or a :class:`MixedTarget` of either.
        criterion: ``"ce"`` (cross-entropy), ``"bce"`` (BCE on softmax, as the paper's code)
            or ``"bce_with_logits"`` (multi-label: BCE on each logit against float targets).
        label_smoothing: in ``[0, 1)`` (``"ce"`` and ``"bce"``).
        ignore_index: label of entries that class maps leave out of the loss.
        class_axis: ``1`` or ``-1``, for class-map logits whose shape fits both layouts.
    """
    if criterion == "bce_with_logits":
        return bce_with_logits_loss(logits, target)
    if criterion not in ("ce", "bce"):
        raise ValueError(f"unknown criterion {criterion!r}; use 'ce', 'bce' or 'bce_with_logits'")
    maps = target.y_a if isinstance(target, MixedTarget) else target
    kind = kind_of(maps)
    if kind is MAPS:
        if criterion != "ce":
            raise ValueError(
                f"criterion={criterion!r} takes (B, C) targets; integer class maps of shape "
                f"{tuple(maps.shape)} need criterion='ce'"
            )
        return dense_cross_entropy(
            logits,
            target,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            class_axis_hint=class_axis,
        )
    if kind is FLOAT and maps.ndim >= 2 and logits.ndim == maps.ndim + 1:
        raise ValueError(
            f"float targets of shape {tuple(maps.shape)} for logits of shape "
            f"{tuple(logits.shape)} look like a mask of class indices stored as floats, which "
            "cross-entropy would read as soft targets over the wrong axis: convert it to int64 "
            "class indices (mask.long(), with ignore_index for pixels to leave out) in the "
            "dataset or collate_fn"
        )
    if criterion == "ce":
        return soft_cross_entropy(logits, target, label_smoothing=label_smoothing)
    return bce_softmax_loss(logits, target, label_smoothing=label_smoothing)


def class_axis(logits: Tensor, target_shape: tuple[int, ...], axis: int | None = None) -> int:
    """The class axis of ``logits`` for integer targets of ``target_shape`` ``(B, d1, ...)``.

    Found from the shapes: ``1`` for ``(B, C, d1, ...)`` (segmentation), the last axis for
    ``(B, d1, ..., C)`` (token classification); ``(B, C)`` logits of ``(B,)`` labels give 1.
    ``axis`` (1 or -1) settles shapes that fit both, which are never guessed.

    Raises:
        ValueError: the shapes fit neither layout, or both and ``axis`` is None.

    Example:
        >>> class_axis(torch.zeros(2, 5, 8, 8), (2, 8, 8))
        1
        >>> class_axis(torch.zeros(2, 7, 5), (2, 7))
        2
    """
    batch, rest = target_shape[0], tuple(target_shape[1:])
    shape = tuple(logits.shape)
    first = logits.ndim == len(target_shape) + 1 and shape[0] == batch and shape[2:] == rest
    last = logits.ndim == len(target_shape) + 1 and shape[0] == batch and shape[1:-1] == rest
    if axis is not None and axis not in (1, -1, logits.ndim - 1):
        raise ValueError(f"mixup_class_axis must be 1 or -1, got {axis!r}")
    if axis is not None and (first if axis == 1 else last):
        return 1 if axis == 1 else logits.ndim - 1
    if first and last and axis is None:
        raise ValueError(
            f"logits of shape {shape} fit targets of shape {tuple(target_shape)} with the "
            "classes on axis 1 and on the last axis alike, and the class axis is never "
            "guessed: set mixup_class_axis = 1 (for (B, C, ...) logits) or -1 (for "
            "(B, ..., C) logits) on the LightningModule, or pass class_axis= to mixup_loss"
        )
    if first or last:
        return 1 if first else logits.ndim - 1
    multi_label = ""
    if shape == tuple(target_shape):
        multi_label = (
            "; integer targets of the logits' own shape look like multi-label 0/1 rows: make "
            "them float (y.float()) and set mixup_criterion = 'bce_with_logits'"
        )
    raise ValueError(
        f"logits of shape {shape} do not fit integer targets of shape {tuple(target_shape)}: "
        f"expected (B, C, {', '.join(map(str, rest))}) or (B, {', '.join(map(str, rest))}, C)"
        f" with B={batch}. Check that the model's output and the targets are of the same "
        "samples and resolution (resize the masks, or upsample the logits)"
        + ("" if axis is None else f", and mixup_class_axis={axis}")
        + multi_label
    )


def dense_cross_entropy(
    logits: Tensor,
    target: Tensor | MixedTarget,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    class_axis_hint: int | None = None,
) -> Tensor:
    """Cross-entropy for integer class maps ``(B, d1, ...)``, plain or mixed, in float32.

    For a :class:`MixedTarget` of maps this is
    ``lam * CE(logits, y_a) + (1 - lam) * CE(logits, y_b)``, each term torch's mean over the
    entries that are not ``ignore_index`` in that map (an entry ignored in one partner is
    ignored in that partner's term only). A per-sample lam ``(B,)`` weighs each sample's
    entries in the sum before the division by the count.

    Args:
        logits: ``(B, C, d1, ...)`` or ``(B, d1, ..., C)``; the class axis comes from the
            shapes (:func:`class_axis`).
        target: int64 ``(B, d1, ...)`` or a :class:`MixedTarget` of such maps.

    Example:
        >>> z = torch.zeros(1, 2, 1, 2)
        >>> y_a, y_b = torch.tensor([[[0, 1]]]), torch.tensor([[[1, -100]]])
        >>> pair = MixedTarget(y_a, y_b, torch.tensor(0.5))
        >>> round(float(dense_cross_entropy(z, pair)), 4)  # log(2)
        0.6931
    """
    maps = target.y_a if isinstance(target, MixedTarget) else target
    axis = class_axis(logits, tuple(maps.shape), class_axis_hint)
    with _no_autocast(logits.device.type):
        z = logits.float()
        if axis != 1:
            z = z.movedim(axis, 1)
        if not isinstance(target, MixedTarget):
            return F.cross_entropy(
                z, target, ignore_index=ignore_index, label_smoothing=label_smoothing
            )
        lam = target.lam.to(device=z.device, dtype=torch.float32)
        if lam.ndim == 0:
            ce_a, ce_b = (
                F.cross_entropy(z, y, ignore_index=ignore_index, label_smoothing=label_smoothing)
                for y in (target.y_a, target.y_b)
            )
            return lam * ce_a + (1.0 - lam) * ce_b
        weights = lam.view(-1, *([1] * (maps.ndim - 1)))
        terms = []
        for y, w in ((target.y_a, weights), (target.y_b, 1.0 - weights)):
            ce = F.cross_entropy(
                z, y, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="none"
            )
            terms.append((ce * w).sum() / (y != ignore_index).sum())
        return terms[0] + terms[1]


def bce_with_logits_loss(logits: Tensor, target: Target) -> Tensor:
    """``binary_cross_entropy_with_logits`` on (mixed) float targets, in float32.

    The multi-label loss: ``target`` is float ``(B, C)`` (0/1 labels, mixed by the callback
    into their blend); class indices and pairs become (mixed) one-hot rows first.

    Example:
        >>> round(float(bce_with_logits_loss(torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]))), 4)
        0.6931
    """
    with _no_autocast(logits.device.type):
        z = logits.float()
        return F.binary_cross_entropy_with_logits(z, soft_targets(target, logits.shape[-1]))
