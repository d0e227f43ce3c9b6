"""CIFAR-10/100 through torchvision, with the Manifold Mixup paper's augmentation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets import CIFAR10, CIFAR100, FakeData, VisionDataset
from torchvision.transforms import v2

from lightning_manifold_mixup_recipes.data._base import (
    SplitDataModule,
    check_fraction,
    stratified_split,
)

__all__ = ["CIFARDataModule"]

# Per-channel training-set mean and std in 0..255 units, as used by the paper's code.
CIFAR_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((125.3, 123.0, 113.9), (63.0, 62.1, 66.7)),
    "cifar100": ((129.3, 124.1, 112.4), (68.2, 65.4, 70.4)),
}
FAKE_TRAIN_SIZE = 200
FAKE_TEST_SIZE = 100
IMAGE_SHAPE = (3, 32, 32)


class TransformedSubset(Dataset[tuple[Tensor, int]]):
    """The items ``dataset[i]`` for ``i`` in ``indices`` with ``transform`` applied to the image.

    Lets the training and validation splits share one copy of the images while using different
    transforms.
    """

    def __init__(
        self, dataset: Dataset[Any], indices: Sequence[int], transform: Callable[[Any], Tensor]
    ) -> None:
        self.dataset = dataset
        self.indices = indices
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, target = self.dataset[self.indices[index]]
        return self.transform(image), int(target)


def _labels(dataset: VisionDataset) -> np.ndarray:
    """Class index of every item, shape (N,)."""
    if isinstance(dataset, CIFAR10):  # CIFAR100 subclasses CIFAR10
        return np.asarray(dataset.targets, dtype=np.int64)
    # FakeData draws labels on the fly; its sizes are small enough to read them all.
    return np.array([dataset[i][1] for i in range(len(dataset))], dtype=np.int64)


class CIFARDataModule(SplitDataModule):
    """CIFAR-10 or CIFAR-100, batches ``[x (B, 3, 32, 32) float32, y (B,) int64]``.

    Training images get ``RandomCrop(32, padding=2)`` and ``RandomHorizontalFlip``; all images are
    then normalised with the per-channel CIFAR mean and std. Validation and test images are not
    augmented. ``val_fraction`` of the training images (stratified, chosen by ``seed``) form the
    validation split; ``val_fraction=0`` trains on all 50k images and validates on the test set,
    the paper's protocol.

    Args:
        batch_size: samples per batch (the paper uses 100).
        num_workers: dataloader worker processes.
        seed: chooses the validation images.
        dataset: ``"cifar10"`` or ``"cifar100"``.
        data_dir: folder holding (or receiving) torchvision's CIFAR files.
        download: download the files in ``prepare_data`` if missing.
        val_fraction: share of the training images used for validation.
        fake_data: use small random ``FakeData`` sets of the same shapes instead (offline tests).
    """

    def __init__(
        self,
        batch_size: int = 100,
        num_workers: int = 0,
        seed: int = 0,
        dataset: Literal["cifar10", "cifar100"] = "cifar10",
        data_dir: str = "data",
        download: bool = False,
        val_fraction: float = 0.1,
        fake_data: bool = False,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        if dataset not in CIFAR_STATS:
            raise ValueError(f"dataset must be one of {sorted(CIFAR_STATS)}, got {dataset!r}")
        check_fraction("val_fraction", val_fraction, allow_zero=True)
        self.save_hyperparameters()
        self.dataset = dataset
        self.data_dir = data_dir
        self.download = download
        self.val_fraction = val_fraction
        self.fake_data = fake_data
        self.num_classes = 10 if dataset == "cifar10" else 100
        self.input_shape = IMAGE_SHAPE
        self.train_indices: np.ndarray | None = None
        self.val_indices: np.ndarray | None = None

        mean, std = (tuple(v / 255.0 for v in values) for values in CIFAR_STATS[dataset])
        to_tensor = [
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
            v2.ToPureTensor(),
        ]
        self.train_transform = v2.Compose(
            [v2.RandomCrop(IMAGE_SHAPE[-1], padding=2), v2.RandomHorizontalFlip(), *to_tensor]
        )
        self.eval_transform = v2.Compose(to_tensor)

    def _dataset_class(self) -> type[CIFAR10]:
        return CIFAR10 if self.dataset == "cifar10" else CIFAR100

    def prepare_data(self) -> None:
        """Download the files when asked to (Lightning runs this on a single process)."""
        if self.download and not self.fake_data:
            for train in (True, False):
                self._dataset_class()(self.data_dir, train=train, download=True)

    def build_splits(self) -> tuple[Dataset, Dataset | None, Dataset]:
        """Datasets of ``(x (3, 32, 32) float32, y int)``; ``train_indices``/``val_indices``
        index the training images."""
        train_images: VisionDataset
        test_images: VisionDataset
        if self.fake_data:
            train_images = FakeData(FAKE_TRAIN_SIZE, IMAGE_SHAPE, self.num_classes)
            # FakeData seeds item i with i + random_offset: offset the test set past the
            # training items so the two never share an image.
            test_images = FakeData(
                FAKE_TEST_SIZE, IMAGE_SHAPE, self.num_classes, random_offset=FAKE_TRAIN_SIZE
            )
        else:
            train_images = self._dataset_class()(self.data_dir, train=True)
            test_images = self._dataset_class()(self.data_dir, train=False)

        rng = np.random.default_rng(self.seed)
        train_idx, val_idx = stratified_split(_labels(train_images), self.val_fraction, rng)
        self.train_indices, self.val_indices = train_idx, val_idx
        val = None
        if len(val_idx) > 0:
            val = TransformedSubset(train_images, val_idx.tolist(), self.eval_transform)
        return (
            TransformedSubset(train_images, train_idx.tolist(), self.train_transform),
            val,
            TransformedSubset(test_images, range(len(test_images)), self.eval_transform),
        )
