"""The default path's lean form gives the values of the general one, bit for bit.

With one lam per batch and no CutMix the callback passes lam as a Python number (no lam tensor,
no copy to the device), builds soft targets from a cached identity matrix and mixes a layer's
tensor output without the nested-output walk. Each of these must equal the general form
exactly, so a run's numbers do not depend on which form ran.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from conftest import MLPClassifier, make_loader, quiet_trainer
from helpers import DecisionRecorder
from lightning_manifold_mixup import ManifoldMixupCallback
from lightning_manifold_mixup.mixing import (
    MixDecision,
    is_batch_major,
    mix_batch,
    mix_tensor,
    mix_with_partner,
    one_hot_pair,
    permute_rows,
)
from lightning_manifold_mixup.targets import TargetMixer

# float32 lams near the rounding edges of 1 - lam, and the ends.
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
        got = mixer.mix(y, float(lam32), index)
        assert torch.equal(got, one_hot_pair(y, y[index], lam32, num_classes)), value
        eye = torch.eye(num_classes)
        torch.testing.assert_close(got, lam32 * eye[y] + (1 - lam32) * eye[y[index]])


def test_identity_soft_targets_refuse_out_of_range_labels_with_the_fix() -> None:
    mixer = TargetMixer("soft", 4)
    mixer.checked = True  # a later batch: the range is not read on the host again
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\).*Fix num_classes"):
        mixer.mix(torch.tensor([0, 4]), 0.5, torch.tensor([1, 0]))


@pytest.mark.parametrize("shape", [(7, 3, 2), (7, 48, 64)])  # below and above the gather size
def test_permute_rows_matches_indexing_in_value_and_gradient(shape: tuple[int, ...]) -> None:
    h = torch.randn(*shape, requires_grad=True)
    index = torch.randperm(shape[0])
    weight = torch.randn(*shape)
    (grad_ref,) = torch.autograd.grad((h[index] * weight).sum(), h)
    out = permute_rows(h, index)
    (grad,) = torch.autograd.grad((out * weight).sum(), h)
    torch.testing.assert_close(out, h[index], rtol=0, atol=0)
    torch.testing.assert_close(grad, grad_ref, rtol=0, atol=0)


def test_batch_major_tensor_outputs_skip_the_walk_with_the_same_values() -> None:
    h = torch.randn(4, 3)
    index = torch.tensor([2, 0, 3, 1])
    fast, count = mix_batch(
        h, 0.25, index, 4, where="layer 'l'", module=nn.Linear(3, 3), batch_major=True
    )
    assert count == 1 and torch.equal(fast, mix_tensor(h, torch.tensor(0.25), index))
    # a module whose outputs are time-major is never treated as batch-major
    assert not is_batch_major(nn.TransformerEncoderLayer(4, 2))
    assert not is_batch_major(nn.LSTM(3, 3, batch_first=True))  # (output, state) layouts
    assert is_batch_major(nn.Linear(3, 3))
    assert is_batch_major(nn.TransformerEncoderLayer(4, 2, batch_first=True))


def test_batch_major_tensor_output_is_mixed_without_the_walk(monkeypatch: Any) -> None:
    import lightning_manifold_mixup.mixing as mixing

    def no_walk(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("map_batch walked a batch-major tensor output")

    monkeypatch.setattr(mixing, "map_batch", no_walk)
    h, index = torch.randn(4, 3), torch.tensor([2, 0, 3, 1])
    out, count = mix_batch(
        h, 0.25, index, 4, where="layer 'l'", module=nn.Linear(3, 3), batch_major=True
    )
    assert count == 1 and torch.equal(out, 0.25 * h + 0.75 * h[index])
    with pytest.raises(AssertionError, match="walked"):  # an undeclared module takes the walk
        mix_batch(h, 0.25, index, 4, where="layer 'l'", module=nn.Linear(3, 3))


def test_batch_major_flag_keeps_the_layer_error_for_unmixable_outputs() -> None:
    ids = torch.zeros(4, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"layer 'emb' returned a torch\.int64 tensor"):
        mix_batch(
            ids,
            0.5,
            torch.arange(4),
            4,
            where="layer 'emb'",
            module=nn.Identity(),
            batch_major=True,
        )


def _decision(lam: np.ndarray, box: Any = None) -> MixDecision:
    return MixDecision("net.1", 0, torch.arange(4), box, host_lam=lam, device=torch.device("cpu"))


def test_decision_weight_only_for_one_final_lam() -> None:
    assert _decision(np.asarray(0.25, dtype=np.float32)).lam_arg == 0.25
    per_row = _decision(np.full(4, 0.25, dtype=np.float32))
    assert per_row.weight is None and isinstance(per_row.lam_arg, torch.Tensor)
    cutmix = _decision(np.asarray(0.25, dtype=np.float32), box=(0.5, 0.5))
    assert cutmix.weight is None  # CutMix fixes lam in place later: the tensor is the truth
    made = _decision(np.asarray(0.25, dtype=np.float32))
    lam = made.lam  # made for a compiled forward: every later use takes this tensor
    assert made.lam_arg is lam
    with pytest.raises(TypeError):  # the old positional order fails loudly
        MixDecision("net.1", 0, torch.tensor(0.5), torch.arange(4), None)  # type: ignore[call-arg]


def test_default_fit_makes_no_lam_tensor_and_mixes_by_the_formula() -> None:
    """The default run never needs lam on the device; what it mixes is still the paper's."""
    seen: list[dict[str, torch.Tensor]] = []

    class Originals(L.Callback):  # listed before the mixup callback: sees the batch unmixed
        def on_train_batch_start(
            self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int
        ) -> None:
            seen.append({"x": batch[0].clone(), "y": batch[1].clone()})

    class Probe(MLPClassifier):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            seen[-1].update(mixed_x=batch[0], soft=batch[1])
            return super().training_step(batch, batch_idx)

    cb = ManifoldMixupCallback(layers=["input"], seed=0)
    rec = DecisionRecorder(cb)
    quiet_trainer(max_steps=6, callbacks=[Originals(), cb, rec]).fit(Probe(), make_loader(n=48))
    decisions = [d for d in rec.decisions if d is not None]
    assert len(decisions) == 6
    assert all("lam" not in vars(d) for d in decisions)  # the cached tensor was never made
    eye = torch.eye(4)
    for d, row in zip(decisions, seen, strict=True):
        lam, index, x, y = d.lam_arg, d.index, row["x"], row["y"]
        assert isinstance(lam, float)
        torch.testing.assert_close(row["mixed_x"], lam * x + (1 - lam) * x[index])
        torch.testing.assert_close(row["soft"], lam * eye[y] + (1 - lam) * eye[y[index]])
