"""The mixing math, checked against the paper's formula recomputed by hand."""

from __future__ import annotations

from collections import OrderedDict, namedtuple
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from conftest import TimeMajor
from lightning_manifold_mixup import (
    MixedTarget,
    mix_batch,
    mix_targets,
    mix_tensor,
    one_hot_mix,
    sample_decision,
)
from lightning_manifold_mixup.mixing import map_nested


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


def test_map_nested_mixes_tuples_dicts_namedtuples_and_skips_the_rest() -> None:
    pair = namedtuple("pair", ["hidden", "mask"])
    h = torch.randn(4, 3)
    mask = torch.ones(4, 3, dtype=torch.bool)
    other = torch.randn(2, 3)  # wrong leading dim: not a batch tensor
    obj = (pair(h, mask), OrderedDict(a=h, b="text", c=other))
    lam, index = torch.tensor(0.2), torch.tensor([1, 0, 3, 2])
    out, count = map_nested(obj, lambda t: mix_tensor(t, lam, index), 4)
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


# --------------------------------------------------------------------------- batch axes
# B = 4 everywhere below, and the layer count, sequence length or both equal B too, so a mix
# along the wrong axis has the right shape and only the values tell it apart.
B = 4
INDEX = torch.tensor([2, 0, 3, 1])
LAMS = [torch.tensor(0.3), torch.tensor([0.1, 0.5, 0.8, 0.95])]


def by_hand(h: torch.Tensor, lam: torch.Tensor, axis: int) -> torch.Tensor:
    """``lam * h + (1 - lam) * h[index]`` along ``axis``, lam broadcast over the other axes."""
    if lam.ndim == 1:
        lam = lam.view(*([1] * axis), B, *([1] * (h.ndim - axis - 1)))
    return lam * h + (1 - lam) * h.index_select(axis, INDEX)


@pytest.mark.parametrize("lam", LAMS)
@pytest.mark.parametrize("batch_first", [True, False])
def test_lstm_output_h_n_and_c_n_are_mixed_along_their_batch_axes(
    batch_first: bool, lam: torch.Tensor
) -> None:
    lstm = nn.LSTM(3, 5, num_layers=B, batch_first=batch_first)
    output, (h_n, c_n) = lstm(torch.randn(B, B, 3))
    mixed, count = mix_batch((output, (h_n, c_n)), lam, INDEX, B, where="layer 'rnn'", module=lstm)
    assert count == 3
    torch.testing.assert_close(mixed[0], by_hand(output, lam, 0 if batch_first else 1))
    torch.testing.assert_close(mixed[1][0], by_hand(h_n, lam, 1))
    torch.testing.assert_close(mixed[1][1], by_hand(c_n, lam, 1))


@pytest.mark.parametrize("lam", LAMS)
def test_gru_state_is_mixed_along_axis_1(lam: torch.Tensor) -> None:
    gru = nn.GRU(3, 5, num_layers=2, bidirectional=True, batch_first=True)  # h_n: (4, B, 5)
    output, h_n = gru(torch.randn(B, 6, 3))
    (mixed_out, mixed_h), count = mix_batch(
        (output, h_n), lam, INDEX, B, where="layer 'rnn'", module=gru
    )
    assert count == 2 and h_n.shape == (4, B, 5)
    torch.testing.assert_close(mixed_out, by_hand(output, lam, 0))
    torch.testing.assert_close(mixed_h, by_hand(h_n, lam, 1))


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.TransformerEncoderLayer(8, 2, dropout=0.0),
        lambda: nn.TransformerEncoder(
            nn.TransformerEncoderLayer(8, 2, dropout=0.0), 2, enable_nested_tensor=False
        ),
        lambda: nn.Sequential(nn.Linear(8, 8), nn.TransformerEncoderLayer(8, 2, dropout=0.0)),
    ],
    ids=["layer", "stack", "sequential"],
)
def test_time_major_transformer_output_is_mixed_along_axis_1(make: Any) -> None:
    module = make().eval()
    out = module(torch.randn(B, B, 8))  # (S, B, E) with S == B
    mixed, count = mix_batch(out, LAMS[1], INDEX, B, where="layer 'enc'", module=module)
    assert count == 1
    torch.testing.assert_close(mixed, by_hand(out, LAMS[1], 1))


def test_attention_output_follows_batch_first_and_its_weights_axis_0() -> None:
    mha = nn.MultiheadAttention(8, 2)  # time-major
    q = torch.randn(B, B, 8)
    out, weights = mha(q, q, q, average_attn_weights=False)  # weights: (B, heads, L, S)
    (mixed_out, mixed_w), count = mix_batch(
        (out, weights), LAMS[0], INDEX, B, where="layer 'attn'", module=mha
    )
    assert count == 2
    torch.testing.assert_close(mixed_out, by_hand(out, LAMS[0], 1))
    torch.testing.assert_close(mixed_w, by_hand(weights, LAMS[0], 0))


def test_a_declared_batch_first_false_is_followed() -> None:
    module = TimeMajor()
    module.batch_first = False  # type: ignore[assignment]
    out = torch.randn(B, B, 3)
    mixed, _ = mix_batch(out, LAMS[1], INDEX, B, where="layer 'tm'", module=module)
    torch.testing.assert_close(mixed, by_hand(out, LAMS[1], 1))


def test_with_one_row_integer_and_other_tensors_pass_unchanged() -> None:
    ids, other = torch.arange(1), torch.randn(7, 1)
    (h, ids_out, other_out), count = mix_batch(
        (torch.ones(1, 3), ids, other), torch.tensor(0.3), torch.tensor([0]), 1, where="input"
    )
    assert count == 1 and ids_out is ids and other_out is other
    torch.testing.assert_close(h, torch.ones(1, 3))


def test_tensors_without_the_batch_size_on_axes_0_or_1_pass_unchanged() -> None:
    table = torch.randn(5, 3, B)
    (_, kept), count = mix_batch(
        (torch.randn(B, 2), table), LAMS[0], INDEX, B, where="layer 'x'", module=nn.Identity()
    )
    assert count == 1 and kept is table
