"""Shared fixtures: small LightningModules and a quiet CPU Trainer factory."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_manifold_mixup import ManifoldMixupMixin


class MLPClassifier(ManifoldMixupMixin, L.LightningModule):
    """A 2-hidden-layer MLP; defined at module level so ddp_spawn can pickle it."""

    def __init__(self, in_features: int = 8, num_classes: int = 4, hidden: int = 16) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class LateMLP(ManifoldMixupMixin, L.LightningModule):
    """Builds its network in configure_model, as Lightning recommends for sharded training."""

    def __init__(self) -> None:
        super().__init__()
        self.num_classes = 4
        self.net: nn.Sequential | None = None
        self.losses: list[torch.Tensor] = []

    def configure_model(self) -> None:
        if self.net is None:
            torch.manual_seed(3)
            self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.net is not None
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.losses.append(loss.detach())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)  # weights stay put for the check


class PlainModule(L.LightningModule):
    """A user's module without ManifoldMixupMixin: plain cross-entropy on class labels."""

    def __init__(self) -> None:
        super().__init__()
        self.num_classes = 4
        self.net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Holder(nn.Module):
    """Holds a network as ``net``, so its layers are named ``net.<name>``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net


class TimeMajor(nn.Module):
    """Returns its (B, T, ...) input time-major, (T, B, ...), without declaring batch_first."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(0, 1)


def make_loader(
    n: int = 64, in_features: int = 8, num_classes: int = 4, batch_size: int = 16, seed: int = 0
) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_features, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def tuple_collate(samples: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    xs, ys = zip(*samples, strict=True)
    return torch.stack(xs), torch.stack(ys)


def mlp_with(weights: dict[str, torch.Tensor]) -> MLPClassifier:
    model = MLPClassifier()
    model.load_state_dict(weights)
    return model


def hand_mlp_loss(model: MLPClassifier, row: dict[str, Any]) -> torch.Tensor:
    """The paper's mixup loss for one recorded step of an ``MLPClassifier``, by hand.

    ``row`` holds the raw batch (``x``, ``y``) and the decision (``layer``, ``lam``,
    ``index``); the mix ``lam * h + (1 - lam) * h[index]`` is applied after the chosen
    module of ``net`` (or to the input), and the targets are mixed the same way.
    """
    lam, index, y = row["lam"], row["index"], row["y"]
    h = row["x"]
    if row["layer"] == "input":
        h = lam * h + (1 - lam) * h[index]
    for i, module in enumerate(model.net):
        h = module(h)
        if row["layer"] == f"net.{i}":
            h = lam * h + (1 - lam) * h[index]
    eye = torch.eye(model.num_classes)
    target = lam * eye[y] + (1 - lam) * eye[y[index]]
    return -(target * torch.log_softmax(h, -1)).sum(-1).mean()


class RecordingLogger(Logger):
    """A logger that keeps every ``log_metrics`` call as ``(step, metrics)``."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def values(self, key: str) -> list[float]:
        return [float(m[key]) for _, m in self.rows if key in m]


def quiet_trainer(**kwargs: Any) -> L.Trainer:
    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def hook_counts(model: nn.Module) -> dict[str, int]:
    return {
        name: len(m._forward_hooks) + len(m._forward_pre_hooks) for name, m in model.named_modules()
    }


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
