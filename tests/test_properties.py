"""Properties of the mixing math over random shapes, dtypes and lam (hypothesis)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_manifold_mixup import MixedTarget, mix_tensor, one_hot_mix
from lightning_manifold_mixup.losses import pair_cross_entropy, soft_cross_entropy

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@st.composite
def batches(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b = draw(st.integers(1, 6))
    rest = draw(st.lists(st.integers(1, 4), min_size=0, max_size=3))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, *rest, generator=g).to(dtype)
    per_sample = draw(st.booleans())
    lam = torch.rand(b if per_sample else (), generator=g)
    if draw(st.booleans()):
        lam = torch.full_like(lam, float(draw(st.sampled_from([0.0, 1.0]))))
    index = torch.randperm(b, generator=g)
    return h, lam, index


def _bcast(lam: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return lam.view(-1, *([1] * (h.ndim - 1))) if lam.ndim else lam


@settings(max_examples=150, deadline=None)
@given(batches())
def test_mix_is_a_convex_combination_of_each_row_and_its_partner(batch: tuple) -> None:
    h, lam, index = batch
    out = mix_tensor(h, lam, index)
    assert out.shape == h.shape and out.dtype == h.dtype and out.device == h.device
    lo = torch.minimum(h, h[index]).double()
    hi = torch.maximum(h, h[index]).double()
    slack = TOL[h.dtype] * (1 + hi.abs())
    assert bool(((out.double() >= lo - slack) & (out.double() <= hi + slack)).all())
    ref = _bcast(lam.double(), h) * h.double() + (1 - _bcast(lam.double(), h)) * h[index].double()
    torch.testing.assert_close(out.double(), ref, rtol=TOL[h.dtype], atol=TOL[h.dtype])


@settings(max_examples=60, deadline=None)
@given(batches())
def test_lam_one_is_the_identity(batch: tuple) -> None:
    h, lam, index = batch
    torch.testing.assert_close(mix_tensor(h, torch.ones_like(lam), index), h, rtol=0, atol=0)


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 8), st.integers(2, 12), st.booleans(), st.integers(0, 2**31 - 1))
def test_soft_targets_sum_to_one_and_pair_loss_equals_soft_loss(
    b: int, c: int, per_sample: bool, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (b,), generator=g)
    lam = torch.rand(b if per_sample else (), generator=g)
    index = torch.randperm(b, generator=g)
    soft = one_hot_mix(y, lam, index, c)
    torch.testing.assert_close(soft.sum(1), torch.ones(b))
    assert bool((soft >= 0).all())
    logits = (torch.randn(b, c, generator=g) * 5).requires_grad_(True)
    loss_soft = soft_cross_entropy(logits, soft)
    (g_soft,) = torch.autograd.grad(loss_soft, logits)
    loss_pair = pair_cross_entropy(logits, MixedTarget(y, y[index], lam))
    (g_pair,) = torch.autograd.grad(loss_pair, logits)
    torch.testing.assert_close(loss_pair, loss_soft, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_pair, g_soft, rtol=1e-5, atol=1e-6)
