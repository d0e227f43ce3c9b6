"""Mixing policies: how a hidden batch (or the input) is mixed with its partner rows.

:class:`Blend` is Manifold Mixup's ``lam * h + (1 - lam) * h[index]`` (Verma et al., ICML 2019,
eq. 2) along each tensor's batch axis; :class:`CutMix` pastes a box of the partner rows into
the last two dimensions of a ``(B, C, H, W)`` tensor, with lam the kept area. Both follow
:class:`MixPolicy`, so the callback never asks which one it holds; a new policy is one class
here. Plain torch, no Lightning import.

Example:
    >>> h = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> mix_tensor(h, torch.tensor(0.75), torch.tensor([1, 0]))
    tensor([[0.7500, 0.2500],
            [0.2500, 0.7500]])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from lightning_manifold_mixup.draw import MixDecision, lam_tensor
from lightning_manifold_mixup.layout import describe, map_batch


class _PermuteRows(torch.autograd.Function):
    """``x[index]`` for a permutation ``index``, with a gather (not a scatter-add) backward.

    The gradient of a row permutation is the inverse permutation of the gradient; on the CPU a
    gather computes it faster than the scatter-add autograd uses for ``x[index]`` once the
    tensor is not tiny (about 1.5x at 32k elements, 2x from 128k; one core).
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


# Below this many elements a custom autograd function costs more host time than its gather
# backward saves (CPU, one core); on accelerators the scatter-add backward is as fast.
_GATHER_BACKWARD_MIN = 16384


def permute_rows(x: Tensor, index: Tensor) -> Tensor:
    """``x[index]`` along dim 0 for a permutation ``index``.

    The backward is exact and deterministic on every device (each row receives exactly one
    gradient row); large CPU tensors take a gather backward (:class:`_PermuteRows`).

    Example:
        >>> permute_rows(torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([2, 0, 1]))
        tensor([[3.],
                [1.],
                [2.]])
    """
    index = index.to(x.device)
    if x.requires_grad and x.device.type == "cpu" and x.numel() >= _GATHER_BACKWARD_MIN:
        out: Tensor = _PermuteRows.apply(x, index)
        return out
    return x.index_select(0, index)


class _HalfLerp(torch.autograd.Function):
    """``torch.lerp(partner, h, w)`` for a half-precision ``w``, with gradients in float32.

    The forward is torch's (the convex combination evaluated in float32). The backward gives
    ``grad * w`` and ``grad * (1 - w)`` with ``1 - w`` in float32, as torch's lerp with a
    Python-number weight does; its tensor-weight backward would round ``1 - w`` to the half
    dtype first.
    """

    @staticmethod
    def forward(ctx: Any, partner: Tensor, h: Tensor, w: Tensor) -> Tensor:
        ctx.save_for_backward(w)
        return torch.lerp(partner, h, w)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        (w,) = ctx.saved_tensors
        g, w32 = grad.float(), w.float()
        return (g * (1.0 - w32)).to(grad.dtype), (g * w32).to(grad.dtype), None


def _lam_like(lam: Tensor, h: Tensor) -> Tensor:
    """``lam`` on ``h``'s device, shaped to broadcast over ``h`` (still float32)."""
    lam = lam.to(device=h.device)
    if lam.ndim == 1:
        lam = lam.view(lam.shape[0], *([1] * (h.ndim - 1)))
    return lam


def mix_with_partner(
    h: Tensor, partner: Tensor, lam: Tensor | float, *, overwrite_partner: bool = False
) -> Tensor:
    """Return ``lam * h + (1 - lam) * partner``, the one place the mixing formula lives.

    Args:
        h: ``(B, ...)`` floating tensor of any rank.
        partner: the rows ``h`` is mixed with, same shape and dtype as ``h`` (``h[index]`` for
            local pairing, rows gathered from every rank for global pairing).
        lam: a float tensor of shape ``()`` or ``(B,)`` (a Python number is taken as a
            float32 tensor); a ``(B,)`` lam is broadcast over every non-batch dimension.
        overwrite_partner: ``partner`` is a fresh tensor nobody else reads (the output of an
            ``index_select``) and may be reused for the result, saving one transient tensor.

    Returns:
        A tensor with the shape, dtype and device of ``h``. In float32/float64 it is the
        formula above, operation for operation, with lam and ``1 - lam`` rounded to float32.
        In float16/bfloat16
        it is ``torch.lerp``, which evaluates the same convex combination in float32
        internally (with lam rounded to ``h``'s dtype first): float16
        values up to the float16 maximum never overflow to inf, which the formula in float16
        can do when the two rounded weights sum to slightly more than 1.

    Example:
        >>> mix_with_partner(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), 0.75)
        tensor([[0.7500, 0.2500]])
    """
    if not h.is_floating_point():
        raise TypeError(f"cannot mix a tensor of dtype {h.dtype}: mixing needs floating point")
    if partner.shape != h.shape or partner.dtype != h.dtype:
        raise ValueError(
            f"partner must match h: got {partner.dtype} {tuple(partner.shape)} for h "
            f"{h.dtype} {tuple(h.shape)}"
        )
    if not isinstance(lam, Tensor):
        lam = lam_tensor(lam, h.device)
    lam = _lam_like(lam, h)
    if h.element_size() < 4:
        out: Tensor = _HalfLerp.apply(partner, h, lam.to(h.dtype))
        return out
    own, other = lam.to(h.dtype), (1.0 - lam).to(h.dtype)
    # Scaling the partner first and adding in place keeps one transient tensor instead of
    # three; addition commutes, so this is the formula's value bit for bit.
    out = partner.mul_(other) if overwrite_partner else partner * other
    return out.add_(h * own)


def mix_tensor(h: Tensor, lam: Tensor | float, index: Tensor) -> Tensor:
    """Return ``lam * h + (1 - lam) * h[index]`` (see :func:`mix_with_partner`).

    Args:
        h: ``(B, ...)`` floating tensor of any rank.
        lam: a float tensor of shape ``()`` or ``(B,)`` (or a Python number); a ``(B,)`` lam
            is broadcast over every non-batch dimension.
        index: ``(B,)`` int64 permutation.
    """
    return mix_with_partner(h, permute_rows(h, index), lam, overwrite_partner=True)


def mix_batch(
    obj: Any,
    lam: Tensor | float,
    index: Tensor,
    batch_size: int,
    *,
    where: str,
    module: nn.Module | None = None,
    batch_major: bool = False,
) -> tuple[Any, int]:
    """:func:`map_batch` with the mix ``lam * h + (1 - lam) * h[index]`` along each batch axis.

    ``lam`` is ``()`` or ``(B,)`` (broadcast over the other axes of each tensor), ``index`` is
    the ``(B,)`` permutation. ``batch_major=True`` says ``module`` is known to put the batch
    on axis 0 (:func:`is_batch_major`), so a tensor output is mixed without the layout walk.
    Returns the mixed structure and how many tensors were mixed.
    """
    if (
        (module is None or batch_major)
        and isinstance(obj, Tensor)
        and obj.ndim
        and obj.shape[0] == batch_size
        and obj.is_floating_point()
    ):
        return mix_tensor(obj, lam, index), 1  # the common case, without the generic walk
    return map_batch(
        obj, lambda h: mix_tensor(h, lam, index), batch_size, where=where, module=module
    )


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


Blender = Callable[[Any], tuple[Any, int]]
"""Blends a layer output or the input with the partner rows; returns it and the tensor count
(the pairing's mix: within the local batch, or across ranks)."""


@dataclass(frozen=True)
class Box:
    """A CutMix box ``[y0, y1) x [x0, x1)`` on a grid of ``height x width``.

    Example:
        >>> box = Box(2, 6, 2, 6, 8, 8)
        >>> box.kept, box.scaled(4, 4)
        (0.75, Box(y0=1, y1=3, x0=1, x1=3, height=4, width=4))
    """

    y0: int
    y1: int
    x0: int
    x1: int
    height: int
    width: int

    @property
    def kept(self) -> float:
        """Weight of the original sample: the area fraction outside the box."""
        return cutmix_lam(self.height, self.width, (self.y0, self.y1, self.x0, self.x1))

    def scaled(self, height: int, width: int) -> Box:
        """The same box on a ``height x width`` grid (a mask of another resolution)."""
        if (height, width) == (self.height, self.width):
            return self
        sy, sx = height / self.height, width / self.width
        return Box(
            round(self.y0 * sy),
            round(self.y1 * sy),
            round(self.x0 * sx),
            round(self.x1 * sx),
            height,
            width,
        )

    def paste(self, h: Tensor, index: Tensor) -> Tensor:
        """``h`` with this box of its last two dims pasted from ``h[index]``."""
        return cutmix_tensor(h, index, (self.y0, self.y1, self.x0, self.x1))


class MixPolicy(Protocol):
    """How one batch mixes: the input at the batch start, a hidden layer in its forward hook.

    ``place`` returns the CutMix box a tensor would get (None for policies without one); the
    callback calls it on the input to fix lam before the targets are mixed, and hands that box
    back to ``mix``. ``mix`` returns the mixed object, how many tensors were mixed, and the box
    it used (None: lam is unchanged).
    ``pastes`` says whether the batch's targets take a box too (class maps get the partner's
    labels pasted in), rather than a blend.
    """

    pastes: bool

    def place(self, h: Any, where: str) -> Box | None: ...

    def mix(
        self, obj: Any, decision: MixDecision, blend: Blender, where: str, box: Box | None = None
    ) -> tuple[Any, int, Box | None]: ...


class Blend:
    """``lam * h + (1 - lam) * h[index]`` for every batch tensor of the object (Manifold Mixup)."""

    pastes = False

    def place(self, h: Any, where: str) -> Box | None:
        return None

    def mix(
        self, obj: Any, decision: MixDecision, blend: Blender, where: str, box: Box | None = None
    ) -> tuple[Any, int, Box | None]:
        mixed, count = blend(obj)
        return mixed, count, None


@dataclass(frozen=True)
class CutMix:
    """Paste a box of the partner rows; its area is about ``(1 - area_lam)`` of ``(H, W)``.

    ``center`` holds fractions of the height and width, so a box can be placed on any
    resolution: the input, or a hidden ``(B, C, h, w)`` state (PatchUp-style). lam becomes the
    kept area (:attr:`Box.kept`) once the box is placed.
    """

    area_lam: float
    center: tuple[float, float]
    pastes = True

    def place(self, h: Any, where: str) -> Box:
        if not isinstance(h, Tensor) or h.ndim < 3:
            if where == "input":
                raise ValueError(
                    f"CutMix on the input needs a (B, C, H, W) tensor, got {describe(h)}; set "
                    "cutmix_prob=0 or remove 'input' from layers"
                )
            raise ValueError(
                f"CutMix at layer {where!r} needs a (B, C, H, W) tensor output, got "
                f"{describe(h)}; set cutmix_prob=0 or choose spatial layers only"
            )
        height, width = h.shape[-2], h.shape[-1]
        return Box(*cutmix_box(height, width, self.area_lam, self.center), height, width)

    def mix(
        self, obj: Any, decision: MixDecision, blend: Blender, where: str, box: Box | None = None
    ) -> tuple[Any, int, Box | None]:
        box = box or self.place(obj, where)
        return box.paste(obj, decision.index), 1, box


def make_policy(cutmix: bool, lam: np.ndarray, center: tuple[float, float]) -> MixPolicy:
    """The policy of a drawn batch: CutMix (its drawn lam sets the box area) or Blend."""
    return CutMix(float(lam), center) if cutmix else Blend()
