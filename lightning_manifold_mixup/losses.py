"""Losses that accept class indices, soft targets or :class:`MixedTarget` pairs (plain torch).

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

from lightning_manifold_mixup.targets import MixedTarget

Criterion = Literal["ce", "bce"]
Target = Tensor | MixedTarget


def _no_autocast(device_type: str) -> AbstractContextManager[Any]:
    """Autocast off for ``device_type``; devices without autocast (e.g. ``meta``) need none."""
    if not torch.amp.is_autocast_available(device_type):
        return nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)


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
        if isinstance(target, MixedTarget):
            lam = target.lam.to(device=z.device, dtype=torch.float32)
            lam = lam.expand(z.shape[0]).unsqueeze(1)
            soft = lam * F.one_hot(target.y_a, num_classes) + (1.0 - lam) * F.one_hot(
                target.y_b, num_classes
            )
        elif target.is_floating_point():
            soft = target.float()
        else:
            soft = F.one_hot(target, num_classes).float()
        if label_smoothing:
            soft = soft * (1.0 - label_smoothing) + label_smoothing / num_classes
        return F.binary_cross_entropy(torch.softmax(z, dim=-1), soft)


def mixup_loss(
    logits: Tensor,
    target: Target,
    *,
    criterion: Criterion = "ce",
    label_smoothing: float = 0.0,
) -> Tensor:
    """The training loss for mixed or unmixed batches.

    Args:
        logits: ``(B, C)``.
        target: class indices ``(B,)``, soft targets ``(B, C)`` or :class:`MixedTarget`.
        criterion: ``"ce"`` (cross-entropy) or ``"bce"`` (BCE on softmax, as the paper's code).
        label_smoothing: in ``[0, 1)``.
    """
    if criterion == "ce":
        return soft_cross_entropy(logits, target, label_smoothing=label_smoothing)
    if criterion == "bce":
        return bce_softmax_loss(logits, target, label_smoothing=label_smoothing)
    raise ValueError(f"unknown criterion {criterion!r}; use 'ce' or 'bce'")
