"""Shortcuts of the mixing code give the values of the general form, bit for bit.

Soft targets are rows of a cached identity matrix mixed like a hidden batch (not a scatter),
a layer known to be batch-major skips the nested-output walk, half-precision mixes take their
gradients in float32, and a Python-number lam is a float32 tensor. Each must equal the general
form exactly, so a run's numbers do not depend on which form ran.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from conftest import MLPClassifier, make_loader, quiet_trainer
from lightning_manifold_mixup import ManifoldMixupCallback
from lightning_manifold_mixup.layout import map_batch
from lightning_manifold_mixup.mixing import (
    Box,
    MixDecision,
    is_batch_major,
    mix_with_partner,
    one_hot_pair,
    permute_rows,
)
from lightning_manifold_mixup.targets import TargetMixer

# float32 lams near the rounding edges of 1 - lam, and the ends.
CPU = torch.device("cpu")
LAMS = [0.0, 1.0, 0.5, 0.1, 1e-7, 1 - 2**-24, 0.3333333, 0.7, 0.99999]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_number_lam_mixes_bit_for_bit_like_a_float32_tensor(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(16, 7, generator=g, dtype=dtype)
    partner = torch.randn(16, 7, generator=g, dtype=dtype)
    for value in LAMS + [float(v) for v in torch.rand(50, generator=g)]:
        lam32 = torch.tensor(value, dtype=torch.float32)
        expected = mix_with_partner(h, partner, lam32)
        # the paper's formula with the float32 weights, by hand
        by_hand = lam32.to(dtype) * h + (1 - lam32).to(dtype) * partner
        got = mix_with_partner(h, partner, float(lam32))
        assert torch.equal(got, expected), value
        assert torch.equal(got, by_hand), value


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_number_lam_in_half_precision_equals_the_tensor_form(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(2)
    h = torch.randn(64, 32, generator=g).to(dtype)
    partner = torch.randn(64, 32, generator=g).to(dtype)
    for value in LAMS + [float(v) for v in torch.rand(20, generator=g)]:
        lam32 = torch.tensor(value, dtype=torch.float32)
        got = mix_with_partner(h, partner, float(lam32))
        assert got.dtype == dtype
        assert torch.equal(got, mix_with_partner(h, partner, lam32)), value
        expected = lam32 * h.float() + (1 - lam32) * partner.float()
        torch.testing.assert_close(got.float(), expected, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("num_classes", [3, 10])
def test_identity_soft_targets_equal_the_scatter_form_bit_for_bit(num_classes: int) -> None:
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, num_classes, (64,), generator=g)  # many rows share a label
    index = torch.randperm(64, generator=g)
    mixer = TargetMixer("soft", num_classes)
    for value in LAMS + [float(v) for v in torch.rand(50, generator=g)]:
        lam32 = torch.tensor(value, dtype=torch.float32)
        got = mixer.mix(y, lam32, lambda t: t[index], "blend")
        assert torch.equal(got, one_hot_pair(y, y[index], lam32, num_classes)), value
        eye = torch.eye(num_classes)
        torch.testing.assert_close(got, lam32 * eye[y] + (1 - lam32) * eye[y[index]])


def test_identity_soft_targets_refuse_out_of_range_labels_with_the_fix() -> None:
    mixer = TargetMixer("soft", 4)
    mixer.checked = True  # a later batch: the range is not read on the host again
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\).*Fix num_classes"):
        mixer.mix(torch.tensor([0, 4]), torch.tensor(0.5), lambda t: t.flip(0), "blend")


@pytest.mark.parametrize("shape", [(7, 3, 2), (7, 48, 64)])
def test_permute_rows_matches_indexing_in_value_and_gradient(shape: tuple[int, ...]) -> None:
    h = torch.randn(*shape, requires_grad=True)
    index = torch.randperm(shape[0])
    weight = torch.randn(*shape)
    (grad_ref,) = torch.autograd.grad((h[index] * weight).sum(), h)
    out = permute_rows(h, index)
    (grad,) = torch.autograd.grad((out * weight).sum(), h)
    torch.testing.assert_close(out, h[index], rtol=0, atol=0)
    torch.testing.assert_close(grad, grad_ref, rtol=0, atol=0)


def test_only_modules_with_batch_major_outputs_are_batch_major() -> None:
    # a module whose outputs are time-major is never treated as batch-major
    assert not is_batch_major(nn.TransformerEncoderLayer(4, 2))
    assert not is_batch_major(nn.LSTM(3, 3, batch_first=True))  # (output, state) layouts
    assert is_batch_major(nn.Linear(3, 3))
    assert is_batch_major(nn.TransformerEncoderLayer(4, 2, batch_first=True))


def test_batch_major_tensor_output_is_mixed_without_the_walk(monkeypatch: Any) -> None:
    import lightning_manifold_mixup.batch as batch

    def no_walk(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("map_batch walked a batch-major tensor output")

    monkeypatch.setattr(batch, "map_batch", no_walk)
    cb = ManifoldMixupCallback(layers=["net.1", "net.3"], seed=0, log=False)
    quiet_trainer(max_steps=4, callbacks=[cb]).fit(MLPClassifier(), make_loader())
    assert sum(cb.summary["layers"].values()) == 4
    with pytest.raises(AssertionError, match="walked"):  # the input takes the walk
        cb = ManifoldMixupCallback(layers=["input"], seed=0, log=False)
        quiet_trainer(max_steps=1, callbacks=[cb]).fit(MLPClassifier(), make_loader())


def test_the_walk_keeps_the_layer_error_for_unmixable_outputs() -> None:
    ids = torch.zeros(4, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"layer 'emb' returned a torch\.int64 tensor"):
        map_batch(ids, lambda t: t, 4, where="layer 'emb'", module=nn.Identity())


def test_decision_lam_is_one_float32_tensor_and_a_fixed_lam_is_a_new_decision() -> None:
    host = np.asarray(0.25, dtype=np.float32)
    decision = MixDecision("net.1", 0, torch.arange(4), (0.5, 0.5), host_lam=host, device=CPU)
    assert decision.lam.dtype == torch.float32 and decision.lam.shape == ()
    assert float(decision.lam) == 0.25
    box = Box(0, 2, 0, 2, 4, 4)
    fixed = decision.with_box(box, 0.75, None)  # CutMix's kept area, known once placed
    assert float(fixed.lam) == 0.75 and float(decision.lam) == 0.25
    assert fixed.layer == decision.layer and fixed.index is decision.index and fixed.box == box
    per_row = MixDecision(
        "net.1", 0, torch.arange(4), host_lam=np.full(4, 0.5, np.float32), device=CPU
    )
    assert per_row.lam.shape == (4,)
    with pytest.raises(TypeError):  # the old positional order fails loudly
        MixDecision("net.1", 0, torch.tensor(0.5), torch.arange(4), None)  # type: ignore[call-arg]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("per_row", [False, True])
def test_half_precision_mix_takes_the_gradients_of_lerp_with_a_number_weight(
    dtype: torch.dtype, per_row: bool
) -> None:
    g = torch.Generator().manual_seed(3)
    for value in LAMS[2:] + [float(v) for v in torch.rand(10, generator=g)]:
        h = torch.randn(8, 5, generator=g).to(dtype).requires_grad_()
        partner = torch.randn(8, 5, generator=g).to(dtype).requires_grad_()
        upstream = torch.randn(8, 5, generator=g).to(dtype)
        lam = torch.full((8,) if per_row else (), value)
        out = mix_with_partner(h, partner, lam)
        grads = torch.autograd.grad(out, (h, partner), upstream)
        w = float(torch.tensor(value).to(dtype))  # the weight as rounded to the half dtype
        ref = torch.lerp(partner, h, w)
        ref_grads = torch.autograd.grad(ref, (h, partner), upstream)
        assert torch.equal(out, ref), value
        assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads, strict=True)), value
