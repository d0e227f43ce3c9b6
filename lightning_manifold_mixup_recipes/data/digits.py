"""scikit-learn's 8x8 handwritten digits (UCI optical digits test set), shipped with sklearn."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from lightning_manifold_mixup_recipes.data._base import (
    InMemoryDataset,
    SplitDataModule,
    check_fraction,
    stratified_split,
)

__all__ = ["DigitsDataModule"]


class DigitsDataModule(SplitDataModule):
    """1797 digits, 10 classes, batches ``[x (B, 1, 8, 8) float32 in [0, 1], y (B,) int64]``.

    ``test_fraction`` of all samples form the test split, then ``val_fraction`` of the rest the
    validation split; both splits are stratified by class and chosen by ``seed``.

    Args:
        batch_size: samples per batch.
        num_workers: dataloader worker processes.
        seed: chooses the split.
        test_fraction: share of all samples used for testing.
        val_fraction: share of the non-test samples used for validation; 0 validates on test.
    """

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        test_fraction: float = 0.2,
        val_fraction: float = 0.1,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        check_fraction("test_fraction", test_fraction, allow_zero=False)
        check_fraction("val_fraction", val_fraction, allow_zero=True)
        self.save_hyperparameters()
        self.test_fraction = test_fraction
        self.val_fraction = val_fraction
        self.num_classes = 10
        self.input_shape = (1, 8, 8)
        self.train_indices: np.ndarray | None = None
        self.val_indices: np.ndarray | None = None
        self.test_indices: np.ndarray | None = None

    def build_splits(self) -> tuple[Dataset, Dataset | None, Dataset]:
        """Datasets of ``(x (1, 8, 8) float32, y int64)``; ``*_indices`` index ``load_digits``."""
        # Imported lazily: scikit-learn is an optional dependency.
        from sklearn.datasets import load_digits

        digits = load_digits()
        # Pixels are counts 0..16 of set bits in 4x4 blocks of the original 32x32 bitmaps.
        images = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
        labels = np.asarray(digits.target, dtype=np.int64)
        targets = torch.tensor(labels)

        rng = np.random.default_rng(self.seed)
        rest, test_idx = stratified_split(labels, self.test_fraction, rng)
        train_pos, val_pos = stratified_split(labels[rest], self.val_fraction, rng)
        train_idx, val_idx = rest[train_pos], rest[val_pos]
        self.train_indices, self.val_indices, self.test_indices = train_idx, val_idx, test_idx

        def subset(indices: np.ndarray) -> InMemoryDataset:
            index = torch.from_numpy(indices)
            return InMemoryDataset(images[index], targets[index])

        val = subset(val_idx) if len(val_idx) > 0 else None
        return subset(train_idx), val, subset(test_idx)
