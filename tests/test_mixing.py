"""The mixing math, checked against the paper's formula recomputed by hand."""

from __future__ import annotations

from collections import OrderedDict, namedtuple

import numpy as np
import pytest
import torch

from lightning_manifold_mixup import (
    MixedTarget,
    mix_nested,
    mix_targets,
    mix_tensor,
    one_hot_mix,
    sample_decision,
)


def test_mix_tensor_equals_paper_formula_batch_lam() -> None:
    h = torch.randn(6, 3, 5)
    lam = torch.tensor(0.37)
    index = torch.randperm(6)
    expected = lam * h + (1 - lam) * h[index]
    torch.testing.assert_close(mix_tensor(h, lam, index), expected, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(5,), (5, 3), (5, 3, 4), (5, 2, 3, 4), (5, 2, 1, 3, 2)])
def test_sample_lam_broadcasts_over_every_non_batch_dimension(shape: tuple[int, ...]) -> None:
    h = torch.randn(shape)
    lam = torch.rand(5)
    index = torch.randperm(5)
    out = mix_tensor(h, lam, index)
    for i in range(5):
        torch.testing.assert_close(out[i], lam[i] * h[i] + (1 - lam[i]) * h[index[i]])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_mix_keeps_dtype_and_matches_float32_within_precision(dtype: torch.dtype) -> None:
    h = torch.randn(8, 4)
    lam = torch.rand(8)
    index = torch.randperm(8)
    out = mix_tensor(h.to(dtype), lam, index)
    assert out.dtype == dtype
    tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float64: 1e-6}[dtype]
    torch.testing.assert_close(out.float(), mix_tensor(h, lam, index), rtol=tol, atol=tol)


def test_lam_one_is_identity_and_lam_zero_is_the_permuted_batch() -> None:
    h = torch.randn(4, 3)
    index = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(mix_tensor(h, torch.tensor(1.0), index), h)
    torch.testing.assert_close(mix_tensor(h, torch.tensor(0.0), index), h[index])


def test_mixing_an_integer_tensor_is_refused() -> None:
    with pytest.raises(TypeError, match="floating point"):
        mix_tensor(torch.arange(4), torch.tensor(0.5), torch.arange(4))


def test_gradients_flow_to_both_rows_of_each_pair() -> None:
    h = torch.randn(3, 2, requires_grad=True)
    lam = torch.tensor(0.25)
    index = torch.tensor([1, 2, 0])
    mix_tensor(h, lam, index).sum().backward()
    # each row appears once with weight lam and once with weight 1 - lam
    torch.testing.assert_close(h.grad, torch.ones(3, 2))


def test_one_hot_mix_equals_hand_computation() -> None:
    y = torch.tensor([0, 3, 1, 1, 2])
    lam = torch.tensor(0.6)
    index = torch.tensor([4, 2, 0, 3, 1])
    eye = torch.eye(4)
    expected = lam * eye[y] + (1 - lam) * eye[y[index]]
    out = one_hot_mix(y, lam, index, 4)
    torch.testing.assert_close(out, expected)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.sum(1), torch.ones(5))


def test_one_hot_mix_with_per_sample_lam() -> None:
    y = torch.tensor([0, 1, 2])
    lam = torch.tensor([0.1, 0.5, 0.9])
    index = torch.tensor([1, 2, 0])
    eye = torch.eye(3)
    expected = lam[:, None] * eye[y] + (1 - lam[:, None]) * eye[y[index]]
    torch.testing.assert_close(one_hot_mix(y, lam, index, 3), expected)


def test_float_targets_are_lerped_in_place_of_one_hot() -> None:
    y = torch.rand(4, 7)  # multi-label / regression
    lam = torch.tensor(0.3)
    index = torch.tensor([3, 2, 1, 0])
    torch.testing.assert_close(mix_targets(y, lam, index), lam * y + (1 - lam) * y[index])


def test_pair_targets_keep_indices_and_lam() -> None:
    y = torch.tensor([0, 1, 2])
    index = torch.tensor([2, 0, 1])
    out = mix_targets(y, torch.tensor(0.4), index, pair=True)
    assert isinstance(out, MixedTarget)
    assert out.y_a.tolist() == [0, 1, 2]
    assert out.y_b.tolist() == [2, 0, 1]


def test_integer_targets_without_num_classes_are_refused() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        mix_targets(torch.tensor([0, 1]), torch.tensor(0.5), torch.tensor([1, 0]))


def test_mix_nested_handles_tuples_dicts_namedtuples_and_skips_the_rest() -> None:
    pair = namedtuple("pair", ["hidden", "mask"])
    h = torch.randn(4, 3)
    mask = torch.ones(4, 3, dtype=torch.bool)
    other = torch.randn(2, 3)  # wrong leading dim: not a batch tensor
    obj = (pair(h, mask), OrderedDict(a=h, b="text", c=other))
    lam, index = torch.tensor(0.2), torch.tensor([1, 0, 3, 2])
    out, count = mix_nested(obj, lam, index, 4)
    expected = lam * h + (1 - lam) * h[index]
    assert count == 2
    assert isinstance(out, tuple) and isinstance(out[0], pair)
    assert isinstance(out[1], OrderedDict)
    torch.testing.assert_close(out[0].hidden, expected)
    assert out[0].mask is mask and out[1]["b"] == "text" and out[1]["c"] is other
    torch.testing.assert_close(out[1]["a"], expected)


def test_sample_decision_is_a_function_of_the_generator_state() -> None:
    kwargs = {"batch_size": 7, "num_layers": 3, "alpha": 2.0, "probability": 1.0}
    a = sample_decision(np.random.default_rng([1, 0, 5]), lam_mode="sample", **kwargs)
    b = sample_decision(np.random.default_rng([1, 0, 5]), lam_mode="sample", **kwargs)
    c = sample_decision(np.random.default_rng([1, 1, 5]), lam_mode="sample", **kwargs)
    assert a is not None and b is not None and c is not None
    assert a.layer == b.layer and np.array_equal(a.lam, b.lam) and np.array_equal(a.perm, b.perm)
    assert a.lam.shape == (7,) and sorted(a.perm.tolist()) == list(range(7))
    assert not np.array_equal(a.lam, c.lam)


def test_sample_decision_follows_beta_and_probability() -> None:
    rng = np.random.default_rng(0)
    draws = [
        sample_decision(
            rng, batch_size=2, num_layers=3, alpha=2.0, probability=0.5, lam_mode="batch"
        )
        for _ in range(4000)
    ]
    mixed = [d for d in draws if d is not None]
    assert 0.45 < len(mixed) / len(draws) < 0.55
    lams = np.array([float(d.lam) for d in mixed])
    # Beta(2, 2): mean 1/2, variance 1/20
    assert abs(lams.mean() - 0.5) < 0.02 and abs(lams.var() - 0.05) < 0.006
    layers = np.bincount([d.layer for d in mixed], minlength=3) / len(mixed)
    assert np.all(np.abs(layers - 1 / 3) < 0.04)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_mixing_of_values_near_the_maximum_stays_finite(dtype: torch.dtype) -> None:
    # float16 is safe up to its maximum; bfloat16 shares float32's range, so the float32
    # arithmetic inside lerp is safe up to half of it (values that large mean divergence).
    big = torch.finfo(dtype).max if dtype == torch.float16 else torch.finfo(dtype).max / 2
    h = torch.tensor([[big, -big], [big, -big], [-big, big]], dtype=dtype)
    index = torch.tensor([1, 0, 0])
    for lam in torch.linspace(0, 1, 101):
        out = mix_tensor(h, lam, index)
        assert torch.isfinite(out).all(), float(lam)
        assert out.dtype == dtype


def test_permute_rows_matches_indexing_in_value_and_gradient() -> None:
    from lightning_manifold_mixup.mixing import permute_rows

    h = torch.randn(7, 3, 2, requires_grad=True)
    index = torch.randperm(7)
    weight = torch.randn(7, 3, 2)
    (grad_ref,) = torch.autograd.grad((h[index] * weight).sum(), h)
    out = permute_rows(h, index)
    (grad,) = torch.autograd.grad((out * weight).sum(), h)
    torch.testing.assert_close(out, h[index], rtol=0, atol=0)
    torch.testing.assert_close(grad, grad_ref, rtol=0, atol=0)
