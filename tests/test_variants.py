"""Variants beyond the paper: schedules, lam options, layer weights, hidden CutMix, metrics."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import MLPClassifier, RecordingLogger, make_loader, quiet_trainer
from helpers import DecisionRecorder, KeepsTargets, fake_trainer
from lightning_manifold_mixup import (
    ManifoldMixupCallback,
    ManifoldMixupMixin,
    MixedTarget,
    cutmix_box,
    cutmix_lam,
    cutmix_tensor,
    mixed_accuracy,
    sample_decision,
)


def _fit(cb: ManifoldMixupCallback, model: L.LightningModule | None = None, **kw: Any) -> list[Any]:
    rec = DecisionRecorder()
    loader = kw.pop("loader", None) or make_loader(n=128)
    quiet_trainer(callbacks=[rec, cb], **{"max_epochs": 1, **kw}).fit(
        model or MLPClassifier(), loader
    )
    return rec.decisions


def test_layer_weights_steer_the_layer_choice() -> None:
    cb = ManifoldMixupCallback(layers=["input", "net.1", "net.3"], layer_weights=[0, 1, 0], seed=0)
    assert {d.layer for d in _fit(cb)} == {"net.1"}
    rng = np.random.default_rng(0)
    weights = np.array([0.8, 0.2])
    picks = [
        sample_decision(
            rng,
            batch_size=2,
            num_layers=2,
            alpha=1.0,
            probability=1.0,
            lam_mode="batch",
            layer_weights=weights,
        ).layer  # type: ignore[union-attr]
        for _ in range(4000)
    ]
    assert abs(np.mean(np.array(picks) == 0) - 0.8) < 0.03


def test_max_lam_transform_keeps_the_first_sample_dominant() -> None:
    cb = ManifoldMixupCallback(layers=["net.1"], lam_transform="max", alpha=1.0, seed=0)
    lams = [float(d.lam) for d in _fit(cb)]
    assert min(lams) >= 0.5 and len(set(lams)) > 1


def test_fixed_lam_is_used_for_every_batch_and_in_the_targets() -> None:
    class Spy(KeepsTargets, MLPClassifier):
        pass

    model = Spy()
    cb = ManifoldMixupCallback(layers=["net.1"], fixed_lam=0.7, seed=0)
    decisions = _fit(cb, model)
    assert all(float(d.lam) == pytest.approx(0.7) for d in decisions)
    for t in model.targets:
        assert sorted(set(np.round(t.max(1).values.numpy(), 4))) <= [0.7, 1.0]


def _trainer_at(step: int, epoch: int = 0, total: int = 100) -> Any:
    return fake_trainer(global_step=step, current_epoch=epoch, max_steps=total)


@pytest.mark.parametrize(
    ("kwargs", "step", "epoch", "expected"),
    [
        ({}, 50, 0, 2.0),
        ({"alpha_schedule": "linear"}, 25, 0, 1.5),
        ({"alpha_schedule": "cosine"}, 50, 0, 1.0),
        ({"alpha_schedule": "cosine"}, 100, 0, 0.0),
        ({"warmup_steps": 10}, 4, 0, 1.0),
        ({"warmup_steps": 10}, 40, 0, 2.0),
        ({"stop_epoch": 3}, 40, 2, 2.0),
        ({"stop_epoch": 3}, 40, 3, 0.0),
    ],
)
def test_alpha_schedule_values(
    kwargs: dict[str, Any], step: int, epoch: int, expected: float
) -> None:
    cb = ManifoldMixupCallback(alpha=2.0, **kwargs)
    assert cb.alpha_at(_trainer_at(step, epoch)) == pytest.approx(expected)


def test_stop_epoch_switches_mixing_off_in_a_real_fit() -> None:
    cb = ManifoldMixupCallback(layers=["net.1"], stop_epoch=1, seed=0)
    decisions = _fit(cb, max_epochs=2, loader=make_loader(n=64))
    assert all(d is not None for d in decisions[:4]) and all(d is None for d in decisions[4:])
    assert cb.summary["unmixed_batches"] == 4


def test_cutmix_box_and_lam_follow_the_pasted_area() -> None:
    assert cutmix_box(8, 8, 0.75, (0.5, 0.5)) == (2, 6, 2, 6)
    assert cutmix_lam(8, 8, (2, 6, 2, 6)) == 0.75
    box = cutmix_box(8, 8, 0.1, (0.95, 0.95))  # clipped at the corner
    assert cutmix_lam(8, 8, box) > 0.1
    h = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    out = cutmix_tensor(h, torch.tensor([1, 0]), (1, 3, 0, 2))
    torch.testing.assert_close(out[0, :, 1:3, 0:2], h[1, :, 1:3, 0:2])
    torch.testing.assert_close(out[0, :, 0, :], h[0, :, 0, :])


class ConvNet(ManifoldMixupMixin, L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.num_classes = 3
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(4 * 4 * 4, 3),
        )
        self.records: list[dict[str, Any]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        cb = next(c for c in self.trainer.callbacks if isinstance(c, ManifoldMixupCallback))  # type: ignore[attr-defined]
        x, y = batch
        d = cb.current
        cb.current = None
        with torch.no_grad():
            h = self.net[1](self.net[0](x))
        cb.current = d
        seen: list[torch.Tensor] = []
        handle = self.net[2].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
        logits = self(x)
        handle.remove()
        # A box placed in the forward fixes lam: the decision is replaced by one with the
        # kept area; the policy keeps the drawn lam that set the box's size.
        drawn = cb.current.policy.area_lam
        record = {"d": cb.current, "x": x, "y": y, "h": h, "seen": seen[0], "drawn_lam": drawn}
        self.records.append(record)
        return self.mixup_loss(logits, y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _images() -> tuple[torch.Tensor, torch.Tensor, DataLoader]:
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))
    return x, y, DataLoader(TensorDataset(x, y), batch_size=4)


def test_hidden_cutmix_pastes_a_box_and_targets_use_the_kept_area() -> None:
    _, y, loader = _images()
    model = ConvNet()
    cb = ManifoldMixupCallback(layers=["net.1"], cutmix_prob=1.0, seed=0)
    _fit(cb, model, loader=loader)
    eye = torch.eye(3)
    for step, r in enumerate(model.records):
        d = r["d"]
        box = cutmix_box(8, 8, r["drawn_lam"], d.box_center)
        torch.testing.assert_close(r["seen"], cutmix_tensor(r["h"], d.index, box))
        assert float(d.lam) == pytest.approx(cutmix_lam(8, 8, box))
        y_b = y[4 * step : 4 * step + 4]
        torch.testing.assert_close(r["y"], d.lam * eye[y_b] + (1 - d.lam) * eye[y_b[d.index]])


def test_hidden_cutmix_logs_and_counts_the_kept_area_lam() -> None:
    _, _, loader = _images()
    cb = ManifoldMixupCallback(layers=["net.1"], cutmix_prob=1.0, seed=0)
    logger = RecordingLogger()
    rec = DecisionRecorder()
    trainer = quiet_trainer(callbacks=[cb, rec], max_epochs=1, logger=logger, log_every_n_steps=1)
    trainer.fit(ConvNet(), loader)
    kept = [float(d.lam) for d in rec.decisions]  # type: ignore[union-attr]
    logged = logger.values("mixup/lam")
    assert logged == pytest.approx(kept) and len(kept) == 4
    bins = [min(int(lam * 10), 9) for lam in kept]
    assert list(cb.summary["lam_histogram"].values()) == [bins.count(i) for i in range(10)]


def test_input_cutmix_logs_and_counts_the_kept_area_lam() -> None:
    _, _, loader = _images()
    cb = ManifoldMixupCallback(layers=["input"], cutmix_prob=1.0, seed=1)
    logger = RecordingLogger()
    rec = DecisionRecorder()
    trainer = quiet_trainer(callbacks=[cb, rec], max_epochs=1, logger=logger, log_every_n_steps=1)
    trainer.fit(ConvNet(), loader)
    kept = [float(d.lam) for d in rec.decisions]  # type: ignore[union-attr]
    assert logger.values("mixup/lam") == pytest.approx(kept) and len(kept) == 4
    bins = [min(int(lam * 10), 9) for lam in kept]
    assert list(cb.summary["lam_histogram"].values()) == [bins.count(i) for i in range(10)]


def test_input_cutmix_matches_the_hand_computation() -> None:
    x, y, loader = _images()
    model = ConvNet()
    cb = ManifoldMixupCallback(layers=["input"], cutmix_prob=1.0, seed=1)
    _fit(cb, model, loader=loader)
    eye, boxes = torch.eye(3), 0
    for step, r in enumerate(model.records):
        d = r["d"]
        x_b, y_b = x[4 * step : 4 * step + 4], y[4 * step : 4 * step + 4]
        box = cutmix_box(8, 8, r["drawn_lam"], d.box_center)
        torch.testing.assert_close(r["x"], cutmix_tensor(x_b, d.index, box))
        assert float(d.lam) == pytest.approx(cutmix_lam(8, 8, box))
        torch.testing.assert_close(r["y"], d.lam * eye[y_b] + (1 - d.lam) * eye[y_b[d.index]])
        boxes += box[1] > box[0] and box[3] > box[2]
    assert boxes > 0


def test_mixed_accuracy_weights_both_labels_by_lam() -> None:
    logits = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    pair = MixedTarget(torch.tensor([0, 1]), torch.tensor([1, 2]), torch.tensor(0.6))
    torch.testing.assert_close(mixed_accuracy(logits, pair), torch.tensor([0.6, 0.4]))
    soft = torch.tensor([[0.6, 0.4, 0.0], [0.0, 0.6, 0.4]])
    torch.testing.assert_close(mixed_accuracy(logits, soft), torch.tensor([0.6, 0.4]))


def test_runs_describe_themselves_in_hparams_and_summary(tmp_path: Path) -> None:
    cb = ManifoldMixupCallback(layers=["input", "net.1"], seed=4)
    logger = L.pytorch.loggers.CSVLogger(tmp_path)
    _fit(cb, logger=logger)
    text = (tmp_path / "lightning_logs" / "version_0" / "hparams.yaml").read_text()
    assert "net.1" in text and "alpha: 2.0" in text and "seed: 4" in text
    arguments = inspect.signature(ManifoldMixupCallback.__init__).parameters.keys() - {"self"}
    assert arguments == cb.hparams().keys()  # every argument is recorded
    assert all(f"{name}:" in text for name in arguments)
    assert sum(cb.summary["layers"].values()) == 8
    assert sum(cb.summary["lam_histogram"].values()) == 8
