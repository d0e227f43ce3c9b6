"""Owns the Noisy Feature Mixup policy (Lim et al., ICLR 2022): a blend, then noise."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import Tensor

from lightning_manifold_mixup.draw import Draw
from lightning_manifold_mixup.policies import MixPolicy, mix_with_partner


@dataclasses.dataclass(frozen=True)
class NoisyFeatureMixup(MixPolicy):
    """Noisy Feature Mixup: mix as manifold mixup, then perturb the mixed features.

    ``h = lam * h + (1 - lam) * partner`` (:class:`~lightning_manifold_mixup.mixing.Blend`),
    then elementwise ``h = (1 + mult_noise_level * b1 * u) * h + add_noise_level * b2 * n`` with
    ``u ~ U(-1, 1)`` and ``n ~ N(0, 1)`` of ``h``'s shape, and ``b1, b2 ~ Beta(2, 5)`` once per
    batch. Targets blend with lam as in manifold mixup.

    Args:
        add_noise_level: ``a``, the additive noise level, >= 0. Default 0.4, the value of the
            official code's CIFAR commands (erichson/NFM, ``train_cifar.py --alpha 1.0
            --add_noise_level 0.4 --mult_noise_level 0.2 --manifold_mixup 1``).
        mult_noise_level: ``m``, the multiplicative noise level, >= 0. Default 0.2 (same
            command).

    The batch's numbers are drawn after every draw of manifold mixup, from the batch's own
    generator: ``b2`` (additive) then ``b1`` (multiplicative), then ``seed``, which seeds the
    ``torch.Generator`` on ``h``'s device that gives ``u`` (``2 * torch.rand - 1``) and then
    ``n`` (``torch.randn``), in float32. So the noise is the same for the same seed, and with
    both levels 0 the result is manifold mixup's, bit for bit. ``callback.current.policy``
    holds ``b1``, ``b2`` and ``seed`` of the batch in flight.

    Example:
        >>> ManifoldMixupCallback(policy=NoisyFeatureMixup(add_noise_level=0.1))  # doctest: +SKIP
    """

    add_noise_level: float = 0.4
    mult_noise_level: float = 0.2
    b1: float = 0.0
    b2: float = 0.0
    seed: int = 0
    name = "nfm"

    def __post_init__(self) -> None:
        for arg in ("add_noise_level", "mult_noise_level"):
            value = getattr(self, arg)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"NoisyFeatureMixup: {arg} must be a number >= 0, got {value!r}")

    def start(
        self, rng: np.random.Generator, draw: Draw, rows: int, mine: slice | None
    ) -> tuple[NoisyFeatureMixup, Draw]:
        b2, b1 = rng.beta(2.0, 5.0, size=2)
        seed = int(rng.integers(2**62))
        return dataclasses.replace(self, b1=float(b1), b2=float(b2), seed=seed), draw

    def combine(self, h: Tensor, partner: Tensor, lam: Tensor) -> Tensor:
        out = mix_with_partner(h, partner, lam, overwrite_partner=True)
        if not (self.add_noise_level or self.mult_noise_level):
            return out
        gen = torch.Generator(device=h.device).manual_seed(self.seed)
        u = torch.rand(h.shape, generator=gen, device=h.device).mul_(2.0).sub_(1.0)
        n = torch.randn(h.shape, generator=gen, device=h.device)
        scale = u.mul_(self.mult_noise_level * self.b1).add_(1.0)
        return (scale * out + n.mul_(self.add_noise_level * self.b2)).to(h.dtype)
