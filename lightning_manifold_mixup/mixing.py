"""The mixing math of Manifold Mixup, in plain torch (no Lightning import).

For a batch ``h`` of shape ``(B, ...)``, a mixing coefficient ``lam`` and a permutation
``index`` of ``range(B)``, the mixed batch is ``lam * h + (1 - lam) * h[index]``
(Verma et al., ICML 2019, eq. 2). Targets are mixed the same way, with integer class labels
first turned into one-hot rows.

Example:
    >>> import torch
    >>> h = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> mix_tensor(h, torch.tensor(0.75), torch.tensor([1, 0]))
    tensor([[0.7500, 0.2500],
            [0.2500, 0.7500]])
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

LamMode = Literal["batch", "sample"]


class MixedTarget(NamedTuple):
    """Targets kept as a pair of class-index tensors and their weight (the "pair" form).

    Stands for the soft target ``lam * one_hot(y_a) + (1 - lam) * one_hot(y_b)`` without
    materialising a ``(B, C)`` matrix. ``y_a`` and ``y_b`` are ``(B,)`` int64, ``lam`` is a
    float32 tensor of shape ``()`` or ``(B,)``.
    """

    y_a: Tensor
    y_b: Tensor
    lam: Tensor


@dataclass(frozen=True)
class MixDecision:
    """What is mixed in one training batch.

    Attributes:
        layer: name of the mixed layer, ``"input"`` for input mixup.
        layer_index: position of ``layer`` in the eligible set.
        lam: float32 tensor, shape ``()`` (``lam_mode="batch"``) or ``(B,)`` (``"sample"``).
        index: ``(B,)`` int64; row ``i`` is mixed with row ``index[i]``. With
            ``pairing="local"`` (or a single process) a permutation of ``range(B)``; with
            ``pairing="global"`` in a distributed run, indices into the global batch (every
            rank's ``B`` rows concatenated in rank order, ``world_size * B`` rows), drawn from
            one permutation shared by all ranks.
        box_center: for CutMix batches, the box centre as fractions of (H, W); else None.
            ``lam`` is then the kept area fraction, set when the layer's size is known.
    """

    layer: str
    layer_index: int
    lam: Tensor
    index: Tensor
    box_center: tuple[float, float] | None = None


class Draw(NamedTuple):
    """The host-side random draws for one batch (see :func:`sample_decision`)."""

    layer: int
    lam: np.ndarray
    perm: np.ndarray
    cutmix: bool
    box_center: tuple[float, float]


def sample_decision(
    rng: np.random.Generator,
    *,
    batch_size: int,
    num_layers: int,
    alpha: float,
    probability: float,
    lam_mode: LamMode,
    layer_weights: np.ndarray | None = None,
    cutmix_prob: float = 0.0,
) -> Draw | None:
    """Draw the layer, lam, permutation and CutMix choice for one batch; None if unmixed.

    Draws happen on the host from ``rng`` in a fixed order, whatever the outcome, so the same
    generator state always gives the same decision. ``lam`` has shape ``()`` or
    ``(batch_size,)``; ``layer_weights`` (summing to 1) replaces the uniform layer choice.
    ``alpha <= 0`` means no mixing for this batch (a schedule at zero).

    Example:
        >>> rng = np.random.default_rng(0)
        >>> d = sample_decision(
        ...     rng, batch_size=4, num_layers=3, alpha=2.0, probability=1.0, lam_mode="batch")
        >>> 0 <= d.layer < 3, 0.0 <= float(d.lam) <= 1.0, sorted(d.perm.tolist())
        (True, True, [0, 1, 2, 3])
    """
    u = rng.random()
    k = int(rng.choice(num_layers, p=layer_weights))
    size = batch_size if lam_mode == "sample" else None
    lam = rng.beta(alpha, alpha, size=size) if alpha > 0 else np.ones(size or ())
    index = rng.permutation(batch_size)
    cut_u, cy, cx = rng.random(3)
    if u >= probability or alpha <= 0:
        return None
    return Draw(k, np.asarray(lam, dtype=np.float32), index, bool(cut_u < cutmix_prob), (cy, cx))


def cutmix_box(
    height: int, width: int, lam: float, center: tuple[float, float]
) -> tuple[int, int, int, int]:
    """The box ``(y0, y1, x0, x1)`` of area about ``(1 - lam) * H * W`` around ``center``.

    ``center`` holds fractions of the height and width; the box is clipped to the image, so
    the pasted area can be smaller than asked: use :func:`cutmix_lam` for the true weight.

    Example:
        >>> cutmix_box(8, 8, 0.75, (0.5, 0.5))
        (2, 6, 2, 6)
    """
    ratio = float(np.sqrt(1.0 - lam))
    cut_h, cut_w = round(height * ratio), round(width * ratio)
    cy, cx = int(center[0] * height), int(center[1] * width)
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h - cut_h // 2, height)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w - cut_w // 2, width)
    return y0, y1, x0, x1


def cutmix_lam(height: int, width: int, box: tuple[int, int, int, int]) -> float:
    """Weight of the original sample: ``1 - pasted area / (H * W)``."""
    y0, y1, x0, x1 = box
    return 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)


def cutmix_tensor(h: Tensor, index: Tensor, box: tuple[int, int, int, int]) -> Tensor:
    """``h`` with the box ``(y0, y1, x0, x1)`` of its last two dims pasted from ``h[index]``.

    Args:
        h: ``(B, C, H, W)`` (any floating dtype; any rank >= 3 works on the last two dims).
        index: ``(B,)`` permutation.
    """
    if h.ndim < 3:
        raise ValueError(
            f"CutMix needs a (B, C, H, W) tensor, got shape {tuple(h.shape)}; use blending "
            "(cutmix_prob=0) for layers without spatial dimensions"
        )
    y0, y1, x0, x1 = box
    out = h.clone()
    out[..., y0:y1, x0:x1] = permute_rows(h, index)[..., y0:y1, x0:x1]
    return out


class _PermuteRows(torch.autograd.Function):
    """``x[index]`` for a permutation ``index``, with a gather (not a scatter-add) backward.

    The gradient of a row permutation is the inverse permutation of the gradient; computing it
    as a gather is faster on the CPU than the scatter-add autograd uses for ``x[index]``
    (``benchmarks/mixing.py``) and deterministic on every device.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, index: Tensor) -> Tensor:
        ctx.save_for_backward(index)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (index,) = ctx.saved_tensors
        arange = torch.arange(index.shape[0], device=index.device, dtype=index.dtype)
        inverse = torch.empty_like(index).scatter_(0, index, arange)
        return grad.index_select(0, inverse), None


def permute_rows(x: Tensor, index: Tensor) -> Tensor:
    """``x[index]`` along dim 0 for a permutation ``index`` (see :class:`_PermuteRows`).

    Example:
        >>> permute_rows(torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([2, 0, 1]))
        tensor([[3.],
                [1.],
                [2.]])
    """
    index = index.to(x.device)
    if x.requires_grad:
        out: Tensor = _PermuteRows.apply(x, index)
        return out
    return x.index_select(0, index)


def _lam_like(lam: Tensor, h: Tensor) -> Tensor:
    """``lam`` on ``h``'s device, shaped to broadcast over ``h`` (still float32)."""
    lam = lam.to(device=h.device)
    if lam.ndim == 1:
        lam = lam.view(lam.shape[0], *([1] * (h.ndim - 1)))
    return lam


def mix_with_partner(
    h: Tensor, partner: Tensor, lam: Tensor, *, overwrite_partner: bool = False
) -> Tensor:
    """Return ``lam * h + (1 - lam) * partner``, the one place the mixing formula lives.

    Args:
        h: ``(B, ...)`` floating tensor of any rank.
        partner: the rows ``h`` is mixed with, same shape and dtype as ``h`` (``h[index]`` for
            local pairing, rows gathered from every rank for global pairing).
        lam: float tensor of shape ``()`` or ``(B,)``; a ``(B,)`` lam is broadcast over every
            non-batch dimension.
        overwrite_partner: ``partner`` is a fresh tensor nobody else reads (the output of an
            ``index_select``) and may be reused for the result, saving one transient tensor.

    Returns:
        A tensor with the shape, dtype and device of ``h``. In float32/float64 it is the
        formula above, operation for operation. In float16/bfloat16 it is ``torch.lerp``, which
        evaluates the same convex combination in float32 internally (with lam rounded to
        ``h``'s dtype): float16 values up to the float16 maximum never overflow to inf, which the
        formula in float16 can do when the two rounded weights sum to slightly more than 1.

    Example:
        >>> mix_with_partner(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]),
        ...                  torch.tensor(0.75))
        tensor([[0.7500, 0.2500]])
    """
    if not h.is_floating_point():
        raise TypeError(f"cannot mix a tensor of dtype {h.dtype}: mixing needs floating point")
    if partner.shape != h.shape or partner.dtype != h.dtype:
        raise ValueError(
            f"partner must match h: got {partner.dtype} {tuple(partner.shape)} for h "
            f"{h.dtype} {tuple(h.shape)}"
        )
    lam = _lam_like(lam, h)
    if h.element_size() < 4:
        return torch.lerp(partner, h, lam.to(h.dtype))
    # Scaling the partner first and adding in place keeps one transient tensor instead of
    # three; addition commutes, so this is the formula's value bit for bit.
    weight = (1.0 - lam).to(h.dtype)
    out = partner.mul_(weight) if overwrite_partner else partner * weight
    return out.add_(h * lam.to(h.dtype))


def mix_tensor(h: Tensor, lam: Tensor, index: Tensor) -> Tensor:
    """Return ``lam * h + (1 - lam) * h[index]`` (see :func:`mix_with_partner`).

    Args:
        h: ``(B, ...)`` floating tensor of any rank.
        lam: float tensor of shape ``()`` or ``(B,)``; a ``(B,)`` lam is broadcast over every
            non-batch dimension.
        index: ``(B,)`` int64 permutation.
    """
    return mix_with_partner(h, permute_rows(h, index), lam, overwrite_partner=True)


def map_nested(obj: Any, fn: Callable[[Tensor], Tensor], batch_size: int) -> tuple[Any, int]:
    """Apply ``fn`` to every floating tensor in ``obj`` whose first dimension is ``batch_size``.

    ``obj`` may be a tensor or any nesting of tuples, lists, named tuples and mappings (a
    layer's output, a batch's input). Other leaves are returned unchanged. Leaves are visited
    in a fixed order (containers in iteration order), so ``fn`` may run collectives.

    Returns:
        The new structure (same container types) and the number of tensors ``fn`` was applied to.
    """
    if isinstance(obj, Tensor):
        if obj.is_floating_point() and obj.ndim >= 1 and obj.shape[0] == batch_size:
            return fn(obj), 1
        return obj, 0
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        parts = [map_nested(v, fn, batch_size) for v in obj]
        return type(obj)(*(p[0] for p in parts)), sum(p[1] for p in parts)
    if isinstance(obj, (tuple, list)):
        parts = [map_nested(v, fn, batch_size) for v in obj]
        return type(obj)(p[0] for p in parts), sum(p[1] for p in parts)
    if isinstance(obj, Mapping):
        mixed = {k: map_nested(v, fn, batch_size) for k, v in obj.items()}
        out = dict(obj)
        out.update({k: v[0] for k, v in mixed.items()})
        rebuilt: Any = out
        with contextlib.suppress(TypeError):  # keeps OrderedDict and ModelOutput-like types
            rebuilt = type(obj)(out)  # type: ignore[call-arg]
        return rebuilt, sum(v[1] for v in mixed.values())
    return obj, 0


def mix_nested(obj: Any, lam: Tensor, index: Tensor, batch_size: int) -> tuple[Any, int]:
    """Mix every floating tensor in ``obj`` whose first dimension is ``batch_size``.

    ``obj`` may be a tensor or any nesting of tuples, lists, named tuples and mappings (a
    layer's output, a batch's input). Other leaves are returned unchanged.

    Returns:
        The mixed structure (same container types) and the number of tensors mixed.
    """
    return map_nested(obj, lambda h: mix_tensor(h, lam, index), batch_size)


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
    return one_hot_pair(y, y[index.to(y.device)], lam, num_classes)


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
    lam: Tensor,
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
    if y.is_floating_point():
        return mix_tensor(y, lam, index)
    return mix_targets_with_partner(
        y, y[index.to(y.device)], lam, num_classes=num_classes, pair=pair
    )


def mix_targets_with_partner(
    y: Tensor,
    y_partner: Tensor,
    lam: Tensor,
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
    if pair:
        lam = lam.to(device=y.device, dtype=torch.float32)
        return MixedTarget(y, y_partner.to(y.device), lam)
    if num_classes is None:
        raise ValueError("integer targets need num_classes to be turned into soft targets")
    return one_hot_pair(y, y_partner, lam, num_classes)
