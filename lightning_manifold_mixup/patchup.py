"""Owns the soft PatchUp policy (Faramarzi et al., AAAI 2022): a blend inside a box."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from torch import Tensor

from lightning_manifold_mixup.draw import Box, Draw
from lightning_manifold_mixup.policies import MixPolicy, box_needs_spatial, mix_with_partner


@dataclasses.dataclass(frozen=True)
class PatchUpSoft(MixPolicy):
    """Soft PatchUp: inside a box, blend with the partner rows; outside, keep ``h``.

    On ``(B, C, H, W)`` tensors (the input or a hidden state) the box covers about
    ``area = 1 - kept`` of ``(H, W)``; inside it ``lam * h + (1 - lam) * partner``, outside
    ``h``. The targets blend with the matching weight ``1 - area * (1 - lam)``.

    Args:
        area_alpha: the kept fraction that sets the box's size is drawn from
            ``Beta(area_alpha, area_alpha)`` (> 0; 1.0, uniform, as CutMix is usually run).

    The box's centre is the batch's CutMix centre draw; its size is drawn after every draw of
    manifold mixup, so the draws of other policies do not move. Needs ``lam_mode="batch"``.
    ``callback.current`` holds the box (``box``, once placed), the targets' weight (``lam``)
    and the blend weight inside the box (``policy.lam``).

    Example:
        >>> ManifoldMixupCallback(policy="patchup-soft", layers=["net.layer1"])  # doctest: +SKIP
    """

    area_alpha: float = 1.0
    lam: float = 1.0
    area_lam: float = 1.0
    center: tuple[float, float] = (0.5, 0.5)
    box: Box | None = None
    name = "patchup-soft"
    boxed = True

    def __post_init__(self) -> None:
        if not self.area_alpha > 0:
            raise ValueError(f"PatchUpSoft: area_alpha must be > 0, got {self.area_alpha!r}")

    def start(
        self, rng: np.random.Generator, draw: Draw, rows: int, mine: slice | None
    ) -> tuple[PatchUpSoft, Draw]:
        area_lam = float(rng.beta(self.area_alpha, self.area_alpha))
        batch = dataclasses.replace(
            self, lam=float(draw.lam), area_lam=area_lam, center=draw.box_center
        )
        return batch, draw

    def place(self, h: Any, where: str) -> tuple[PatchUpSoft, Box, float]:
        box_needs_spatial(h, where, "PatchUp", "use another policy")
        box = Box.place(h.shape[-2], h.shape[-1], self.area_lam, self.center)
        return dataclasses.replace(self, box=box), box, 1.0 - (1.0 - box.kept) * (1.0 - self.lam)

    def combine(self, h: Tensor, partner: Tensor, lam: Tensor) -> Tensor:
        assert self.box is not None, "placed before it combines"
        box = self.box.scaled(h.shape[-2], h.shape[-1])
        inside = (..., slice(box.y0, box.y1), slice(box.x0, box.x1))
        out = h.clone()
        out[inside] = mix_with_partner(h[inside], partner[inside], self.lam)
        return out
