"""Owns the MixStyle policy (Zhou et al., ICLR 2021): feature statistics mixed, labels kept."""

from __future__ import annotations

import dataclasses

import numpy as np
from torch import Tensor

from lightning_manifold_mixup.draw import Draw
from lightning_manifold_mixup.layout import describe
from lightning_manifold_mixup.policies import MixPolicy, lam_like


@dataclasses.dataclass(frozen=True)
class MixStyle(MixPolicy):
    """MixStyle: mix each sample's per-channel feature statistics with its partner's.

    On ``(B, C, ...)`` features, ``mu`` and ``sigma = sqrt(var + eps)`` are taken per sample
    and channel over the remaining axes (unbiased variance), detached as in the paper; the
    output is ``(h - mu) / sigma * sigma_mix + mu_mix`` with ``mu_mix = lam * mu + (1 - lam) *
    mu_partner`` and ``sigma_mix`` alike. The targets are untouched (handed to training_step
    as an unmixed batch's, lam 1).

    Args:
        p: chance in [0, 1] that a mixed batch is restyled (else it is left alone).
        alpha: ``lam ~ Beta(alpha, alpha)``, one per sample (> 0).
        eps: added to the variance, > 0.

    The batch's numbers are drawn after every draw of manifold mixup: one uniform number
    against ``p``, then the lams of every row drawn over (this rank's are kept under global
    pairing). ``callback.current`` holds the ``(B,)`` lam and the partner index used; the
    callback's own alpha, ``fixed_lam`` and ``lam_transform`` do not apply.

    Example:
        >>> ManifoldMixupCallback(policy="mixstyle", layers=["net.layer1"])  # doctest: +SKIP
    """

    p: float = 0.5
    alpha: float = 0.1
    eps: float = 1e-6
    name = "mixstyle"
    targets = "keep"

    def __post_init__(self) -> None:
        problems = []
        if not 0.0 <= self.p <= 1.0:
            problems.append(f"p must be in [0, 1], got {self.p!r}")
        if not self.alpha > 0:
            problems.append(f"alpha must be > 0, got {self.alpha!r}")
        if not self.eps > 0:
            problems.append(f"eps must be > 0, got {self.eps!r}")
        if problems:
            raise ValueError("MixStyle: " + "; ".join(problems))

    def start(
        self, rng: np.random.Generator, draw: Draw, rows: int, mine: slice | None
    ) -> tuple[MixStyle, Draw] | None:
        restyle = rng.random() < self.p
        lam = np.asarray(rng.beta(self.alpha, self.alpha, size=rows), dtype=np.float32)
        if not restyle:
            return None
        return self, draw._replace(lam=lam if mine is None else lam[mine])

    def combine(self, h: Tensor, partner: Tensor, lam: Tensor) -> Tensor:
        if h.ndim < 3:
            raise ValueError(
                f"MixStyle needs (B, C, ...) features with an axis after the channels, got "
                f"{describe(h)}; choose layers with spatial or sequence axes"
            )
        axes = tuple(range(2, h.ndim))
        mu, sig = _stats(h, axes, self.eps)
        mu_p, sig_p = _stats(partner, axes, self.eps)
        w = lam_like(lam, h).to(h.dtype)
        mu_mix = mu * w + mu_p * (1 - w)
        sig_mix = sig * w + sig_p * (1 - w)
        return (h - mu) / sig * sig_mix + mu_mix


def _stats(h: Tensor, axes: tuple[int, ...], eps: float) -> tuple[Tensor, Tensor]:
    """Detached per-sample, per-channel mean and ``sqrt(var + eps)`` over ``axes``."""
    mu = h.mean(dim=axes, keepdim=True)
    var = h.var(dim=axes, keepdim=True)
    return mu.detach(), (var + eps).sqrt().detach()
