"""Owns how a tensor is combined with its partner rows: the formula and the policy interface.

A policy is one per-tensor function, ``combine(h, partner, lam)``, and a rule for the targets
(:data:`TargetRule`: ``"blend"``, ``"paste"`` or ``"keep"``). ``partner`` holds the rows ``h``
is mixed with, whichever pairing found them (the local batch permuted, or every rank's rows
gathered). :class:`Blend` is Manifold Mixup's ``lam * h + (1 - lam) * partner`` (Verma et al.,
ICML 2019, eq. 2), whose formula lives in :func:`mix_with_partner` alone; :class:`CutMix`
pastes a box of the partner rows into ``(B, C, H, W)`` tensors. Plain torch, no Lightning.

Example:
    >>> h = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> mix_tensor(h, torch.tensor(0.75), torch.tensor([1, 0]))
    tensor([[0.7500, 0.2500],
            [0.2500, 0.7500]])
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor, nn

from lightning_manifold_mixup.draw import Box, Draw, lam_tensor
from lightning_manifold_mixup.layout import describe, map_batch

TargetRule = Literal["blend", "paste", "keep"]


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


def lam_like(lam: Tensor, h: Tensor) -> Tensor:
    """``lam`` (``()`` or ``(B,)``) on ``h``'s device, shaped to broadcast over ``h``."""
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
        In float16/bfloat16 it is ``torch.lerp``, which evaluates the same convex combination
        in float32 internally (with lam rounded to ``h``'s dtype first): float16 values up to
        the float16 maximum never overflow to inf, which the formula in float16 can do when
        the two rounded weights sum to slightly more than 1.

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
    lam = lam_like(lam, h)
    if h.element_size() < 4:
        out: Tensor = _HalfLerp.apply(partner, h, lam.to(h.dtype))
        return out
    own, other = lam.to(h.dtype), (1.0 - lam).to(h.dtype)
    # Scaling the partner first and adding in place keeps one transient tensor instead of
    # three; addition commutes, so this is the formula's value bit for bit.
    out = partner.mul_(other) if overwrite_partner else partner * other
    return out.add_(h * own)


def permute_rows(x: Tensor, index: Tensor) -> Tensor:
    """``x[index]`` along dim 0: the partner rows under a permutation ``index`` ``(B,)``.

    Example:
        >>> permute_rows(torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([2, 0, 1]))
        tensor([[3.],
                [1.],
                [2.]])
    """
    return x.index_select(0, index.to(x.device))


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
) -> tuple[Any, int]:
    """:func:`map_batch` with the mix ``lam * h + (1 - lam) * h[index]`` along each batch axis.

    ``lam`` is ``()`` or ``(B,)`` (broadcast over the other axes of each tensor), ``index`` is
    the ``(B,)`` permutation. Returns the mixed structure and how many tensors were mixed.
    """
    return map_batch(
        obj, lambda h: mix_tensor(h, lam, index), batch_size, where=where, module=module
    )


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
    return Box(*box, h.shape[-2], h.shape[-1]).paste(h, permute_rows(h, index))


class MixPolicy:
    """How a batch's tensors are combined with their partner rows, and how its targets follow.

    ``combine(h, partner, lam)`` maps a ``(B, ...)`` float tensor, its partner rows (same shape
    and dtype, a fresh tensor the policy may overwrite) and lam (float32, ``()`` or ``(B,)``)
    to the mixed tensor. ``targets`` says what happens to the batch's targets: ``"blend"``
    (``lam * y + (1 - lam) * y_partner``), ``"paste"`` (class maps get the partner's labels in
    the box, other targets blend with the kept area) or ``"keep"`` (untouched).

    ``start`` gives the policy of one batch: it may draw numbers of its own from the batch's
    generator, after every common draw, so the draws of the other policies never move. A
    ``boxed`` policy mixes inside a box, placed by ``place`` on the first tensor it meets.
    """

    name: ClassVar[str] = ""
    targets: ClassVar[TargetRule] = "blend"
    boxed: ClassVar[bool] = False

    def start(
        self, rng: np.random.Generator, draw: Draw, rows: int, mine: slice | None
    ) -> tuple[MixPolicy, Draw] | None:
        """This batch's policy and draw (None: the batch is not mixed). ``rows`` is the number
        of rows drawn over (every rank's under global pairing), ``mine`` this rank's slice."""
        return self, draw

    def place(self, h: Any, where: str) -> tuple[MixPolicy, Box, float]:
        """A boxed policy's box on ``h``: the policy holding it, the box and the weight of the
        original sample in the targets."""
        raise NotImplementedError(f"{type(self).__name__} mixes no box")

    combine: Any = None  # (h, partner, lam) -> mixed h


class Blend(MixPolicy):
    """``lam * h + (1 - lam) * partner`` for every batch tensor (Manifold Mixup)."""

    name = "blend"
    # The formula itself: no call between the hook and mix_with_partner.
    combine = staticmethod(functools.partial(mix_with_partner, overwrite_partner=True))


def box_needs_spatial(h: Any, where: str, policy: str, fix: str) -> None:
    """Refuse a boxed policy on anything but a ``(B, C, H, W)`` tensor."""
    if isinstance(h, Tensor) and h.ndim >= 3:
        return
    if where == "input":
        raise ValueError(
            f"{policy} on the input needs a (B, C, H, W) tensor, got {describe(h)}; {fix} or "
            "remove 'input' from layers"
        )
    raise ValueError(
        f"{policy} at layer {where!r} needs a (B, C, H, W) tensor output, got "
        f"{describe(h)}; {fix} or choose spatial layers only"
    )


@dataclasses.dataclass(frozen=True)
class CutMix(MixPolicy):
    """Paste a box of the partner rows; its area is about ``(1 - area_lam)`` of ``(H, W)``.

    ``center`` holds fractions of the height and width, so a box can be placed on any
    resolution: the input, or a hidden ``(B, C, h, w)`` state (PatchUp-style). lam becomes the
    kept area (:attr:`Box.kept`) once the box is placed.
    """

    area_lam: float
    center: tuple[float, float]
    box: Box | None = None
    name = "cutmix"
    targets = "paste"
    boxed = True

    def place(self, h: Any, where: str) -> tuple[MixPolicy, Box, float]:
        box_needs_spatial(h, where, "CutMix", "set cutmix_prob=0")
        box = Box.place(h.shape[-2], h.shape[-1], self.area_lam, self.center)
        return dataclasses.replace(self, box=box), box, box.kept

    def combine(self, h: Tensor, partner: Tensor, lam: Tensor) -> Tensor:
        assert self.box is not None, "placed before it combines"
        return self.box.paste(h, partner)


def batch_policy(
    policy: MixPolicy, rng: np.random.Generator, draw: Draw, rows: int, mine: slice | None
) -> tuple[MixPolicy, Draw] | None:
    """The policy of a drawn batch: CutMix when the draw says so (whatever the configured
    policy), else ``policy.start`` (which may draw numbers of its own or leave it unmixed)."""
    if draw.cutmix:
        return CutMix(float(draw.lam), draw.box_center), draw
    return policy.start(rng, draw, rows, mine)
