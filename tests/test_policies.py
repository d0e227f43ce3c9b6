"""The mixing policies beside manifold mixup's blend, each against a hand computation from
``callback.current``: Noisy Feature Mixup, MixStyle and soft PatchUp, chosen by name or object."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import MLPClassifier, make_loader, quiet_trainer
from helpers import DecisionRecorder, copied_weights, mixup_of
from lightning_manifold_mixup import (
    ManifoldMixupCallback,
    ManifoldMixupMixin,
    MixStyle,
    NoisyFeatureMixup,
    PatchUpSoft,
)


class ConvNet(ManifoldMixupMixin, L.LightningModule):
    """Records, per step, a (B, 4, 8, 8) layer's clean output ``h``, what the next layer saw,
    the decision and the targets training_step received."""

    def __init__(self) -> None:
        super().__init__()
        self.num_classes = 3
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1),
            nn.Flatten(),
            nn.Linear(4 * 8 * 8, 3),
        )
        self.records: list[dict[str, Any]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        cb = mixup_of(self.trainer)
        x, y = batch
        d = cb.current
        cb.current = None  # the clean output, unmixed
        with torch.no_grad():
            h = self.net[1](self.net[0](x))
        cb.current = d
        seen: list[torch.Tensor] = []
        handle = self.net[2].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
        logits = self(x)
        handle.remove()
        self.records.append({"d": cb.current, "h": h, "seen": seen[0], "y": y})
        return self.mixup_loss(logits, y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _images(n: int = 16) -> tuple[torch.Tensor, torch.Tensor, DataLoader]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)
    return x, y, DataLoader(TensorDataset(x, y), batch_size=4)


def _fit_conv(cb: ManifoldMixupCallback) -> tuple[ConvNet, torch.Tensor]:
    _, y, loader = _images()
    model = ConvNet()
    quiet_trainer(max_epochs=1, callbacks=[cb]).fit(model, loader)
    return model, y


def _fit_mlp(policy: Any, seed: int = 0) -> tuple[dict[str, torch.Tensor], DecisionRecorder]:
    torch.manual_seed(0)
    model = MLPClassifier()
    cb = ManifoldMixupCallback(layers=["input", "net.1", "net.3"], seed=seed, policy=policy)
    rec = DecisionRecorder(cb)
    quiet_trainer(max_epochs=1, callbacks=[cb, rec]).fit(model, make_loader(n=128))
    return copied_weights(model), rec


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ choosing a policy


def test_policies_are_chosen_by_name_with_their_default_arguments() -> None:
    assert ManifoldMixupCallback().config.mix_policy().name == "blend"
    nfm = ManifoldMixupCallback(policy="nfm").config.mix_policy()
    assert nfm == NoisyFeatureMixup(add_noise_level=0.4, mult_noise_level=0.2)
    assert ManifoldMixupCallback(policy="mixstyle").config.mix_policy() == MixStyle(
        p=0.5, alpha=0.1, eps=1e-6
    )
    assert isinstance(ManifoldMixupCallback(policy="patchup-soft").config.mix_policy(), PatchUpSoft)


def test_a_policy_object_is_used_as_given_and_recorded_in_hparams() -> None:
    policy = NoisyFeatureMixup(add_noise_level=0.1, mult_noise_level=0.0)
    cb = ManifoldMixupCallback(policy=policy)
    assert cb.config.mix_policy() is policy
    assert cb.hparams()["policy"] == repr(policy)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: NoisyFeatureMixup(add_noise_level=-1.0), "add_noise_level must be"),
        (lambda: MixStyle(p=2.0), r"p must be in \[0, 1\], got 2.0"),
        (lambda: PatchUpSoft(area_alpha=0.0), "area_alpha must be > 0"),
    ],
)
def test_policy_arguments_are_checked(make: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


# ------------------------------------------------------------------ Noisy Feature Mixup


def test_nfm_with_both_levels_zero_trains_manifold_mixups_weights_bit_for_bit() -> None:
    blend, _ = _fit_mlp("blend")
    quiet, _ = _fit_mlp(NoisyFeatureMixup(add_noise_level=0.0, mult_noise_level=0.0))
    assert _same(blend, quiet)


def test_nfm_draws_the_layers_lams_and_partners_of_manifold_mixup() -> None:
    _, blend = _fit_mlp("blend")
    _, nfm = _fit_mlp("nfm")
    assert blend.draws == nfm.draws and len(nfm.draws) == 8


def test_nfm_noise_is_the_same_for_the_same_seed_and_not_for_another() -> None:
    first, _ = _fit_mlp("nfm", seed=3)
    again, _ = _fit_mlp("nfm", seed=3)
    other, _ = _fit_mlp("nfm", seed=4)
    assert _same(first, again) and not _same(first, other)


def test_nfm_mixes_then_adds_noise_as_the_hand_computation_from_current() -> None:
    cb = ManifoldMixupCallback(layers=["net.1"], seed=0, policy="nfm")
    model, _ = _fit_conv(cb)
    assert len(model.records) == 4
    for r in model.records:
        d, h = r["d"], r["h"]
        p = d.policy
        assert (
            0 < p.b1 < 1
            and 0 < p.b2 < 1
            and (p.add_noise_level, p.mult_noise_level)
            == (
                0.4,
                0.2,
            )
        )
        blend = d.lam * h + (1 - d.lam) * h[d.index]
        gen = torch.Generator().manual_seed(p.seed)
        u = 2 * torch.rand(h.shape, generator=gen) - 1
        n = torch.randn(h.shape, generator=gen)
        expected = (1 + 0.2 * p.b1 * u) * blend + 0.4 * p.b2 * n
        torch.testing.assert_close(r["seen"], expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(r["seen"], blend)


# ------------------------------------------------------------------ MixStyle


def test_mixstyle_mixes_channel_statistics_as_the_hand_computation_and_keeps_targets() -> None:
    cb = ManifoldMixupCallback(layers=["net.1"], seed=0, policy=MixStyle(p=1.0))
    model, y = _fit_conv(cb)
    for step, r in enumerate(model.records):
        d, h = r["d"], r["h"]
        assert d.lam.shape == (4,)
        mu = h.mean((2, 3), keepdim=True)
        sig = (h.var((2, 3), keepdim=True) + 1e-6).sqrt()
        lam = d.lam.view(4, 1, 1, 1)
        mu_mix = lam * mu + (1 - lam) * mu[d.index]
        sig_mix = lam * sig + (1 - lam) * sig[d.index]
        torch.testing.assert_close(r["seen"], (h - mu) / sig * sig_mix + mu_mix)
        # the labels untouched: in the form of an unmixed batch's (lam 1)
        assert torch.equal(r["y"], torch.eye(3)[y[4 * step : 4 * step + 4]])


def test_mixstyle_statistics_are_detached() -> None:
    h = torch.randn(4, 2, 3, 3, requires_grad=True)
    lam = torch.full((4,), 0.5)
    out = MixStyle().combine(h, h.detach()[torch.tensor([1, 0, 3, 2])], lam)
    (grad,) = torch.autograd.grad(out.sum(), h)
    sig = (h.detach().var((2, 3), keepdim=True) + 1e-6).sqrt()
    sig_mix = 0.5 * sig + 0.5 * sig[torch.tensor([1, 0, 3, 2])]
    torch.testing.assert_close(grad, (sig_mix / sig).expand_as(h))


def test_mixstyle_restyles_a_batch_with_chance_p() -> None:
    never = ManifoldMixupCallback(layers=["net.1"], seed=0, policy=MixStyle(p=0.0))
    model, _ = _fit_conv(never)
    assert all(r["d"] is None for r in model.records) and never.summary["unmixed_batches"] == 4
    torch.testing.assert_close(model.records[0]["seen"], model.records[0]["h"])


def test_mixstyle_refuses_features_without_an_axis_after_the_channels() -> None:
    with pytest.raises(ValueError, match=r"MixStyle needs \(B, C, \.\.\.\) features"):
        MixStyle().combine(torch.randn(4, 3), torch.randn(4, 3), torch.full((4,), 0.5))


# ------------------------------------------------------------------ soft PatchUp


@pytest.mark.parametrize("layer", ["net.1", "input"])
def test_soft_patchup_blends_inside_the_box_and_targets_use_the_matching_lam(layer: str) -> None:
    cb = ManifoldMixupCallback(layers=[layer], seed=0, policy="patchup-soft")
    model, y = _fit_conv(cb)
    eye = torch.eye(3)
    for step, r in enumerate(model.records):
        d = r["d"]
        box, lam = d.box, d.policy.lam
        assert box is not None and (box.height, box.width) == (8, 8)
        area = 1 - box.kept
        assert float(d.lam) == pytest.approx(1 - area * (1 - lam))
        if layer == "net.1":
            h = r["h"]
            inside = (..., slice(box.y0, box.y1), slice(box.x0, box.x1))
            expected = h.clone()
            expected[inside] = lam * h[inside] + (1 - lam) * h[d.index][inside]
            torch.testing.assert_close(r["seen"], expected)
        y_b = y[4 * step : 4 * step + 4]
        soft = d.lam * eye[y_b] + (1 - d.lam) * eye[y_b[d.index]]
        torch.testing.assert_close(r["y"], soft)


def test_soft_patchup_keeps_the_layer_lam_and_partner_draws_of_manifold_mixup() -> None:
    _, _, loader = _images()
    recs = []
    for policy in ("blend", "patchup-soft"):
        cb = ManifoldMixupCallback(layers=["input", "net.1"], seed=2, policy=policy)
        rec = DecisionRecorder(cb)
        quiet_trainer(max_epochs=1, callbacks=[cb, rec]).fit(ConvNet(), loader)
        recs.append(rec)
    blend, patchup = recs
    for a, b in zip(blend.decisions, patchup.decisions, strict=True):
        assert a is not None and b is not None
        assert (a.layer, a.index.tolist()) == (b.layer, b.index.tolist())
        assert b.policy.lam == pytest.approx(float(a.lam))
