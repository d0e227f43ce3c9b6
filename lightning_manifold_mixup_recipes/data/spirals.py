"""Synthetic 2D spirals: a toy problem for looking at learned representations."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset

from lightning_manifold_mixup_recipes.data._base import InMemoryDataset, SplitDataModule

__all__ = ["SpiralsDataModule", "make_spirals"]


def make_spirals(
    num_samples: int, num_arms: int, noise: float, turns: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Sample points on ``num_arms`` interleaved spiral arms.

    Returns ``x`` (N, 2) float32 and ``y`` (N,) int64 with balanced classes. Arm ``k`` is
    ``r * (cos a, sin a)`` with ``a = 2 pi (turns * r + k / num_arms)`` and ``r ~ U(0, 1)``, plus
    isotropic Gaussian noise of standard deviation ``noise``.

    >>> x, y = make_spirals(6, 3, 0.0, 1.0, np.random.default_rng(0))
    >>> x.shape, np.bincount(y).tolist(), bool(np.all(np.linalg.norm(x, axis=1) <= 1.0))
    ((6, 2), [2, 2, 2], True)
    """
    labels = np.arange(num_samples) % num_arms
    radius = rng.uniform(0.0, 1.0, num_samples)
    angle = 2.0 * math.pi * (turns * radius + labels / num_arms)
    points = radius[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    points += noise * rng.standard_normal((num_samples, 2))
    return points.astype(np.float32), labels.astype(np.int64)


class SpiralsDataModule(SplitDataModule):
    """Noisy 2D spirals, batches ``[x (B, 2) float32, y (B,) int64]``.

    Each split is sampled independently from its own stream derived from ``seed``, so changing
    one split's size leaves the others unchanged.

    Args:
        batch_size: samples per batch.
        num_workers: dataloader worker processes.
        seed: seeds the generation of all splits.
        num_classes: number of spiral arms (one class each).
        num_train: training samples.
        num_val: validation samples; 0 validates on test.
        num_test: test samples.
        noise: standard deviation of the Gaussian noise added to each coordinate.
        turns: revolutions each arm makes between radius 0 and 1.
    """

    def __init__(
        self,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
        num_classes: int = 3,
        num_train: int = 3000,
        num_val: int = 600,
        num_test: int = 1500,
        noise: float = 0.05,
        turns: float = 1.0,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        if num_train < 1 or num_test < 1 or num_val < 0:
            raise ValueError("num_train and num_test must be positive and num_val non-negative")
        if noise < 0:
            raise ValueError(f"noise must be non-negative, got {noise}")
        self.save_hyperparameters()
        self.num_classes = num_classes
        self.num_train = num_train
        self.num_val = num_val
        self.num_test = num_test
        self.noise = noise
        self.turns = turns
        self.input_shape = (2,)

    def build_splits(self) -> tuple[Dataset, Dataset | None, Dataset]:
        """Datasets of ``(x (2,) float32, y int64)``."""
        train_rng, val_rng, test_rng = (
            np.random.default_rng(child) for child in np.random.SeedSequence(self.seed).spawn(3)
        )

        def dataset(num_samples: int, rng: np.random.Generator) -> InMemoryDataset:
            x, y = make_spirals(num_samples, self.num_classes, self.noise, self.turns, rng)
            return InMemoryDataset(torch.from_numpy(x), torch.from_numpy(y))

        val = dataset(self.num_val, val_rng) if self.num_val > 0 else None
        return dataset(self.num_train, train_rng), val, dataset(self.num_test, test_rng)
