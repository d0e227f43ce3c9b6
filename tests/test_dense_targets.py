"""Dense and sequence targets: segmentation masks, token labels, multi-label with logits.

Every mixed batch is recomputed by hand from the raw batch and the decision: the pair of class
maps, the loss ``lam * CE(logits, y_a) + (1 - lam) * CE(logits, y_b)`` with torch's mean
reduction and ``ignore_index``, CutMix boxes pasted into the maps at their own resolution.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.multiprocessing.spawn import ProcessExitedException
from torch.utils.data import DataLoader, TensorDataset

from conftest import quiet_trainer
from helpers import DecisionRecorder
from lightning_manifold_mixup import (
    ManifoldMixupCallback,
    ManifoldMixupMixin,
    MixedTarget,
    cutmix_box,
    cutmix_tensor,
    mixup_loss,
    sample_decision,
)
from lightning_manifold_mixup.losses import dense_cross_entropy

IGNORE = -100


class Raw(L.Callback):
    """Copies each training batch before the mixup callback rewrites it (list it first)."""

    def __init__(self) -> None:
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, idx: int) -> None:
        self.batches.append((batch[0].clone(), batch[1].clone()))


class Recording(ManifoldMixupMixin, L.LightningModule):
    """Keeps what training_step saw: the (mixed) target, the logits and the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict[str, Any]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self.mixup_loss(logits, y)
        self.seen.append({"x": x, "target": y, "logits": logits.detach(), "loss": loss.detach()})
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


class SegNet(Recording):
    """(B, 1, 8, 8) images to (B, 3, 8, 8) logits; net.1 is a (B, 4, 4, 4) hidden state."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Upsample(scale_factor=2.0),
            nn.Conv2d(4, 3, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TokenNet(Recording):
    """(B, T, 6) token features to (B, T, 5) logits (token classification)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MultiLabelNet(Recording):
    mixup_criterion = "bce_with_logits"

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _masks(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.randint(0, 3, (n, 8, 8), generator=g)
    y[torch.rand(n, 8, 8, generator=g) < 0.2] = IGNORE  # unlabelled pixels
    return x, y


def _tokens(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 7, 6, generator=g)
    y = torch.randint(0, 5, (n, 7), generator=g)
    y[:, 5:] = IGNORE  # padding positions
    y[0, :] = IGNORE  # a sequence with no labelled token (its partner's term still counts)
    return x, y


def _loader(x: torch.Tensor, y: torch.Tensor, batch_size: int = 4) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def _fit(model: Recording, data: tuple[torch.Tensor, torch.Tensor], **kwargs: Any) -> Any:
    trainer_kwargs = {
        k: kwargs.pop(k) for k in ("precision", "accumulate_grad_batches") if k in kwargs
    }
    raw, cb = Raw(), ManifoldMixupCallback(seed=kwargs.pop("seed", 0), **kwargs)
    rec = DecisionRecorder(cb)
    quiet_trainer(max_epochs=1, callbacks=[raw, cb, rec], **trainer_kwargs).fit(
        model, _loader(*data)
    )
    return raw.batches, rec.decisions


def _hand_loss(
    logits: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor, lam: torch.Tensor, axis: int
) -> torch.Tensor:
    z = logits.float().movedim(axis, 1)
    if lam.ndim == 0:
        ce_a = F.cross_entropy(z, y_a, ignore_index=IGNORE)
        ce_b = F.cross_entropy(z, y_b, ignore_index=IGNORE)
        return lam * ce_a + (1 - lam) * ce_b
    # Per-sample lam: each sample's entries weighted before torch's division by the count.
    w = lam.view(-1, *([1] * (y_a.ndim - 1)))
    ce_a = F.cross_entropy(z, y_a, ignore_index=IGNORE, reduction="none")
    ce_b = F.cross_entropy(z, y_b, ignore_index=IGNORE, reduction="none")
    return (w * ce_a).sum() / (y_a != IGNORE).sum() + ((1 - w) * ce_b).sum() / (y_b != IGNORE).sum()


@pytest.mark.parametrize("lam_mode", ["batch", "sample"])
@pytest.mark.parametrize(
    ("make", "data", "layers", "axis"),
    [
        (SegNet, _masks, ["input", "net.1"], 1),
        (TokenNet, _tokens, ["input", "net.1"], 2),
    ],
    ids=["segmentation", "tokens"],
)
def test_class_maps_become_a_pair_and_the_loss_is_lam_weighted_cross_entropy(
    make: Any, data: Any, layers: list[str], axis: int, lam_mode: str
) -> None:
    model = make()
    batches, decisions = _fit(model, data(), layers=layers, lam_mode=lam_mode)
    assert len(model.seen) == 4
    inputs = 0
    for (x, y), d, seen in zip(batches, decisions, model.seen, strict=True):
        target = seen["target"]
        assert isinstance(target, MixedTarget)  # never a (B, C, ...) float map
        assert target.y_a.dtype == torch.int64 and torch.equal(target.y_a, y)
        assert torch.equal(target.y_b, y[d.index])
        assert target.lam.shape == (() if lam_mode == "batch" else (4,))
        torch.testing.assert_close(target.lam, d.lam, rtol=0, atol=0)
        expected = _hand_loss(seen["logits"], y, y[d.index], d.lam, axis)
        torch.testing.assert_close(seen["loss"], expected)
        if d.layer == "input":
            lam = d.lam.view(-1, *([1] * (x.ndim - 1))) if d.lam.ndim else d.lam
            torch.testing.assert_close(seen["x"], lam * x + (1 - lam) * x[d.index])
            inputs += 1
    assert inputs > 0


def test_hidden_mix_of_a_segmentation_net_equals_the_paper_formula() -> None:
    x, y = _masks(n=8)
    model = SegNet()
    weights: list[dict[str, torch.Tensor]] = []

    class Weights(L.Callback):
        def on_train_batch_start(self, trainer: Any, pl_module: Any, b: Any, i: int) -> None:
            weights.append({k: v.clone() for k, v in pl_module.state_dict().items()})

    cb = ManifoldMixupCallback(layers=["net.1"], seed=2)
    rec = DecisionRecorder(cb)
    quiet_trainer(max_epochs=1, callbacks=[Weights(), cb, rec]).fit(model, _loader(x, y))
    for step, (d, seen, w) in enumerate(zip(rec.decisions, model.seen, weights, strict=True)):
        net = SegNet().net
        net.load_state_dict({k.removeprefix("net."): v for k, v in w.items()})
        xb = x[4 * step : 4 * step + 4]
        with torch.no_grad():
            h = net[1](net[0](xb))
            mixed = d.lam * h + (1 - d.lam) * h[d.index]
            logits = net[3](net[2](mixed))
        torch.testing.assert_close(seen["logits"], logits)


def test_pixels_ignored_in_one_partner_count_in_the_other_partners_term_only() -> None:
    logits = torch.randn(2, 3, 2, 2)
    y_a = torch.tensor([[[0, 1], [2, IGNORE]], [[1, 1], [0, 2]]])
    y_b = torch.tensor([[[IGNORE, IGNORE], [1, 0]], [[2, 0], [1, 1]]])
    lam = torch.tensor(0.3)
    got = dense_cross_entropy(logits, MixedTarget(y_a, y_b, lam))
    logp = logits.log_softmax(1)
    cells = [(b, i, j) for b in range(2) for i in range(2) for j in range(2)]
    picks_a = [c for c in cells if y_a[c] != IGNORE]
    picks_b = [c for c in cells if y_b[c] != IGNORE]
    ce_a = -sum(logp[b, y_a[b, i, j], i, j] for b, i, j in picks_a) / len(picks_a)
    ce_b = -sum(logp[b, y_b[b, i, j], i, j] for b, i, j in picks_b) / len(picks_b)
    assert len(picks_a) == 7 and len(picks_b) == 6
    torch.testing.assert_close(got, lam * ce_a + (1 - lam) * ce_b)
    # The gradient is that of the same hand formula.
    z = logits.clone().requires_grad_()
    (grad,) = torch.autograd.grad(dense_cross_entropy(z, MixedTarget(y_a, y_b, lam)), z)
    z2 = logits.clone().requires_grad_()
    hand = lam * F.cross_entropy(z2, y_a) + (1 - lam) * F.cross_entropy(z2, y_b)
    (grad_hand,) = torch.autograd.grad(hand, z2)
    torch.testing.assert_close(grad, grad_hand)


def test_multi_label_targets_are_blended_and_trained_with_bce_on_logits() -> None:
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(16, 6, generator=g), (torch.rand(16, 4, generator=g) > 0.5).float()
    model = MultiLabelNet()
    batches, decisions = _fit(model, (x, y), layers=["input", "net.1"])
    for (_, yb), d, seen in zip(batches, decisions, model.seen, strict=True):
        soft = d.lam * yb + (1 - d.lam) * yb[d.index]
        torch.testing.assert_close(seen["target"], soft)
        expected = F.binary_cross_entropy_with_logits(seen["logits"].float(), soft)
        torch.testing.assert_close(seen["loss"], expected)


def test_bce_with_logits_of_labels_and_pairs_uses_their_one_hot_rows() -> None:
    logits = torch.randn(3, 4)
    y_a, y_b, lam = torch.tensor([0, 3, 1]), torch.tensor([2, 3, 0]), torch.tensor(0.25)
    got = mixup_loss(logits, MixedTarget(y_a, y_b, lam), criterion="bce_with_logits")
    soft = lam * F.one_hot(y_a, 4) + (1 - lam) * F.one_hot(y_b, 4)
    torch.testing.assert_close(got, F.binary_cross_entropy_with_logits(logits, soft.float()))
    plain = mixup_loss(logits, y_a, criterion="bce_with_logits")
    expected = F.binary_cross_entropy_with_logits(logits, F.one_hot(y_a, 4).float())
    torch.testing.assert_close(plain, expected)


def test_class_maps_under_bf16_mixed_give_a_float32_loss_equal_to_the_hand_formula() -> None:
    model = SegNet()
    batches, decisions = _fit(model, _masks(), layers=["net.1"], precision="bf16-mixed")
    for (_, y), d, seen in zip(batches, decisions, model.seen, strict=True):
        assert seen["logits"].dtype == torch.bfloat16 and seen["loss"].dtype == torch.float32
        expected = _hand_loss(seen["logits"], y, y[d.index], d.lam, 1)
        torch.testing.assert_close(seen["loss"], expected)


def test_class_maps_with_gradient_accumulation_draw_per_micro_batch() -> None:
    model = TokenNet()
    batches, decisions = _fit(
        model, _tokens(n=32), layers=["input", "net.1"], accumulate_grad_batches=2
    )
    assert len(decisions) == 8 and len({float(d.lam) for d in decisions}) == 8
    for (_, y), d, seen in zip(batches, decisions, model.seen, strict=True):
        assert torch.equal(seen["target"].y_b, y[d.index])
        torch.testing.assert_close(
            seen["loss"], _hand_loss(seen["logits"], y, y[d.index], d.lam, 2)
        )


def _expected_cut(y: torch.Tensor, d: Any, drawn_lam: float, height: int, width: int) -> Any:
    """The map with the partner's labels pasted in the box placed on a (height, width) grid,
    scaled to the map's own resolution."""
    y0, y1, x0, x1 = cutmix_box(height, width, drawn_lam, d.box_center)
    sy, sx = y.shape[-2] / height, y.shape[-1] / width
    box = (round(y0 * sy), round(y1 * sy), round(x0 * sx), round(x1 * sx))
    return cutmix_tensor(y, d.index, box), (y0, y1, x0, x1)


@pytest.mark.parametrize(("layer", "grid"), [("input", 8), ("net.1", 4)])
def test_cutmix_pastes_the_partners_mask_in_the_same_box(layer: str, grid: int) -> None:
    model = SegNet()
    drawn: list[float] = []

    class Drawn(L.Callback):  # the drawn lam that sets the box's area, listed after mixup
        def on_train_batch_start(self, trainer: Any, pl_module: Any, b: Any, i: int) -> None:
            drawn.append(cb.current.policy.area_lam)

    raw, cb = Raw(), ManifoldMixupCallback(layers=[layer], cutmix_prob=1.0, seed=5)
    rec = DecisionRecorder(cb)
    x, y = _masks()
    quiet_trainer(max_epochs=1, callbacks=[raw, cb, Drawn(), rec]).fit(model, _loader(x, y))
    pasted = 0
    for (xb, yb), d, lam, seen in zip(raw.batches, rec.decisions, drawn, model.seen, strict=True):
        expected, box = _expected_cut(yb, d, lam, grid, grid)
        target = seen["target"]
        assert isinstance(target, torch.Tensor) and target.dtype == torch.int64
        assert torch.equal(target, expected)  # an exact integer map: no lam
        torch.testing.assert_close(
            seen["loss"], F.cross_entropy(seen["logits"], expected, ignore_index=IGNORE)
        )
        pasted += int((box[1] - box[0]) * (box[3] - box[2]) > 0)
        if layer == "input":
            assert torch.equal(seen["x"], cutmix_tensor(xb, d.index, box))
    assert pasted > 0


def test_cutmix_on_token_labels_is_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match=r"token labels \(B, T\).*cutmix_prob=0"):
        _fit(TokenNet(), _tokens(), layers=["net.1"], cutmix_prob=1.0)


def test_cutmix_alpha_draws_the_box_area_from_its_own_beta() -> None:
    kwargs: dict[str, Any] = {
        "batch_size": 8,
        "num_layers": 2,
        "alpha": 2.0,
        "probability": 1.0,
        "lam_mode": "batch",
    }
    same, other, blend = [], [], []
    for seed in range(200):
        a = sample_decision(np.random.default_rng(seed), cutmix_prob=1.0, **kwargs)
        b = sample_decision(
            np.random.default_rng(seed), cutmix_prob=1.0, cutmix_alpha=0.2, **kwargs
        )
        c = sample_decision(
            np.random.default_rng(seed), cutmix_prob=0.0, cutmix_alpha=0.2, **kwargs
        )
        assert a is not None and b is not None and c is not None
        # Everything else is drawn as before: layer, permutation and box centre.
        assert (a.layer, a.perm.tolist(), a.box_center) == (b.layer, b.perm.tolist(), b.box_center)
        same.append(float(a.lam)), other.append(float(b.lam)), blend.append(float(c.lam))
    assert blend == same  # a blended batch keeps Beta(alpha, alpha)
    # Beta(0.2, 0.2) puts most of its mass near 0 and 1; Beta(2, 2) near 0.5.
    extreme = [sum(v < 0.1 or v > 0.9 for v in vals) for vals in (same, other)]
    assert extreme[1] > 100 > 40 > extreme[0]


def test_cutmix_alpha_is_validated_and_logged() -> None:
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    with pytest.raises(MisconfigurationException, match="cutmix_alpha must be a number > 0"):
        ManifoldMixupCallback(cutmix_alpha=0.0, cutmix_prob=0.5)
    with pytest.raises(MisconfigurationException, match="cutmix_prob=0, so no batch uses CutMix"):
        ManifoldMixupCallback(cutmix_alpha=1.0)
    assert ManifoldMixupCallback(cutmix_alpha=1.0, cutmix_prob=0.5).hparams()["cutmix_alpha"] == 1.0


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize(
    ("make", "data", "match"),
    [
        (
            SegNet,
            "out_of_range",
            r"labels must lie in \[0, 3\) or equal ignore_index=-100; found 3",
        ),
        (SegNet, "wrong_resolution", r"do not fit integer targets of shape \(4, 4, 4\)"),
        (SegNet, "float_mask", r"look like a mask of class indices stored as floats"),
    ],
)
def test_bad_class_maps_fail_before_any_optimizer_step(make: Any, data: str, match: str) -> None:
    x, y = _masks()
    if data == "out_of_range":
        y[3, 2, 2] = 3  # one pixel; the -100 pixels beside it are fine
    elif data == "wrong_resolution":
        y = y[:, ::2, ::2].contiguous()
    else:
        y = y.clamp(min=0).float()
    model = make()
    before = _weights(model)
    with pytest.raises(ValueError, match=match):
        _fit(model, (x, y), layers=["net.1"])
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(model), strict=True))


def test_an_ambiguous_class_axis_is_refused_and_settled_by_mixup_class_axis() -> None:
    logits, y = torch.randn(2, 3, 3), torch.randint(0, 3, (2, 3))
    with pytest.raises(ValueError, match=r"never guessed: set mixup_class_axis = 1"):
        mixup_loss(logits, y)
    torch.testing.assert_close(
        mixup_loss(logits, y, class_axis=-1), F.cross_entropy(logits.movedim(-1, 1), y)
    )
    torch.testing.assert_close(mixup_loss(logits, y, class_axis=1), F.cross_entropy(logits, y))


def test_mixin_loss_attributes_are_checked_before_training() -> None:
    class Bad(TokenNet):
        mixup_criterion = "focal"  # type: ignore[assignment]
        mixup_class_axis = 2

    with pytest.raises(ValueError, match=r"mixup_criterion must be .*; mixup_class_axis must be"):
        _fit(Bad(), _tokens(), layers=["net.1"])


def test_the_mixin_ignore_index_reaches_the_loss() -> None:
    class Void(TokenNet):
        mixup_ignore_index = 255

    x, y = _tokens()
    y[y == IGNORE] = 255
    model = Void()
    batches, decisions = _fit(model, (x, y), layers=["net.1"])
    for (_, yb), d, seen in zip(batches, decisions, model.seen, strict=True):
        z = seen["logits"].movedim(2, 1)
        expected = d.lam * F.cross_entropy(z, yb, ignore_index=255) + (1 - d.lam) * F.cross_entropy(
            z, yb[d.index], ignore_index=255
        )
        torch.testing.assert_close(seen["loss"], expected)


class RankRows(L.Callback):
    """Per rank: raw batch, decision, target and loss of each step, saved at the end."""

    def __init__(self, out: Path) -> None:
        self.out, self.rows = out, []
        self.raw: Any = None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, idx: int) -> None:
        self.raw = (batch[0].clone(), batch[1].clone())

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
        d = next(c for c in trainer.callbacks if isinstance(c, ManifoldMixupCallback)).current
        seen = pl_module.seen[-1]
        self.rows.append({"y": self.raw[1], "lam": d.lam, "index": d.index, **seen})

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        torch.save(self.rows, self.out / f"rank{trainer.global_rank}.pt")


def test_token_labels_on_two_ddp_processes_match_the_hand_computation(tmp_path: Path) -> None:
    x, y = _tokens(n=32)

    def run() -> None:
        trainer = quiet_trainer(
            strategy="ddp_spawn",
            devices=2,
            max_steps=3,
            callbacks=[
                RankRows(tmp_path),
                ManifoldMixupCallback(layers=["input", "net.1"], seed=3),
            ],
        )
        trainer.fit(TokenNet(), _loader(x, y))

    try:
        run()
    except ProcessExitedException as err:  # gloo's rare abort at a spawned rank's exit
        if err.signal_name != "SIGABRT":
            raise
        run()
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [len(rows) for rows in ranks] == [3, 3]
    assert not torch.equal(ranks[0][0]["y"], ranks[1][0]["y"])  # each rank its own shard
    for rows in ranks:
        for row in rows:
            y_b = row["y"][row["index"]]
            assert torch.equal(row["target"].y_a, row["y"]) and torch.equal(row["target"].y_b, y_b)
            torch.testing.assert_close(
                row["loss"], _hand_loss(row["logits"], row["y"], y_b, row["lam"], 2)
            )


@pytest.mark.parametrize("section", ["Segmentation", "Token classification", "Multi-label"])
def test_the_documented_examples_run(section: str) -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "targets.md").read_text()
    part = doc.split(f"## {section}", 1)[1]
    code = re.search(r"```python\n(.*?)```", part, re.S)
    assert code is not None
    namespace: dict[str, Any] = {"__name__": "docs_targets"}
    exec(compile(code.group(1), "docs/targets.md", "exec"), namespace)
    trainer, mixup = namespace["trainer"], namespace["mixup"]
    assert trainer.global_step == 4
    assert sum(mixup.summary["layers"].values()) == 4  # every batch mixed


def test_class_maps_with_the_softmax_bce_criterion_are_refused() -> None:
    with pytest.raises(ValueError, match=r"criterion='bce' takes \(B, C\) targets"):
        mixup_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long), criterion="bce")


def test_boolean_targets_are_refused_with_the_supported_kinds() -> None:
    ds = TensorDataset(torch.randn(8, 6), torch.rand(8, 4) > 0.5)
    with pytest.raises(TypeError, match=r"unsupported target dtype torch\.bool: .*float targets"):
        quiet_trainer(max_steps=1, callbacks=[ManifoldMixupCallback(layers=["net.1"])]).fit(
            MultiLabelNet(), DataLoader(ds, batch_size=4)
        )
