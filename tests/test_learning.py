"""A real Trainer.fit with the callback learns on real data (digits, MNIST-1D)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import quiet_trainer
from lightning_manifold_mixup import ManifoldMixupCallback, ManifoldMixupMixin
from lightning_manifold_mixup_recipes.experiments import evaluate, train


class DigitsMLP(ManifoldMixupMixin, L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.num_classes = 10
        self.net = nn.Sequential(
            nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
        )
        self.epoch_losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()  # the mixin logs train_loss_epoch here
        self.epoch_losses.append(float(self.trainer.callback_metrics["train_loss_epoch"]))

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=2e-3)


def test_training_with_manifold_mixup_learns_digits() -> None:
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:]
    loader = DataLoader(TensorDataset(x[train], y[train]), batch_size=64, shuffle=True)
    model = DigitsMLP()
    cb = ManifoldMixupCallback(layers=["input", "net.1", "net.3"], alpha=2.0, seed=0)
    quiet_trainer(max_epochs=15, callbacks=[cb]).fit(model, loader)
    model.eval()
    with torch.no_grad():
        accuracy = (model(x[test]).argmax(1) == y[test]).float().mean().item()
    assert model.epoch_losses[-1] < 0.6 * model.epoch_losses[0]
    assert accuracy > 0.9  # chance is 0.1


def test_the_mnist1d_preset_recipe_learns_in_a_shortened_run() -> None:
    # The preset's own recipe (cosine decay, lr, alpha, eligible layers), cut to 500 steps.
    model, dm = train("mnist1d", "manifold", seed=0, steps=500, holdout=True)
    assert evaluate(model, dm, 0.0)["val_err"] < 35.0  # chance is 90; 6000 steps give ~3
