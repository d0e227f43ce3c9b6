"""MNIST-1D (Greydanus & Kobak), generated locally with the ``mnist1d`` package."""

from __future__ import annotations

import functools
import os
import random
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from lightning_manifold_mixup_recipes.data._base import (
    InMemoryDataset,
    SplitDataModule,
    check_fraction,
    stratified_split,
)

__all__ = ["MNIST1DDataModule"]

# mnist1d's defaults (`get_dataset_args`): the generator seed and the total sample count.
OFFICIAL_SEED = 42
OFFICIAL_NUM_SAMPLES = 5000
SEQUENCE_LENGTH = 40
NUM_CLASSES = 10


class MNIST1DArrays(NamedTuple):
    """Read-only arrays: ``x_*`` (N, 40) float32 and ``y_*`` (N,) int64."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def _freeze(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray
) -> MNIST1DArrays:
    arrays = MNIST1DArrays(
        x_train.astype(np.float32),
        y_train.astype(np.int64),
        x_test.astype(np.float32),
        y_test.astype(np.int64),
    )
    # Cached arrays are shared by every caller, so an in-place edit would leak across runs.
    for array in arrays:
        array.flags.writeable = False
    return arrays


@functools.lru_cache(maxsize=4)
def generate_mnist1d(num_samples: int, generation_seed: int) -> MNIST1DArrays:
    """Generate MNIST-1D with the package's default recipe (80/20 train/test), cached per process.

    ``num_samples`` is the total before the split; it is rounded down to a multiple of 10.
    """
    # Imported lazily: mnist1d is an optional dependency and pulls in matplotlib on import.
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = generation_seed
    # make_dataset reseeds the global `random` and NumPy RNGs; restore them so that building a
    # datamodule does not change the random draws of the code around it.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return _freeze(data["x"], data["y"], data["x_test"], data["y_test"])


def load_mnist1d(num_samples: int, generation_seed: int, cache_dir: str | None) -> MNIST1DArrays:
    """Return the arrays from ``cache_dir`` when present, else generate (and store them there)."""
    if cache_dir is None:
        return generate_mnist1d(num_samples, generation_seed)
    path = Path(cache_dir) / f"mnist1d_n{num_samples}_seed{generation_seed}.npz"
    if path.exists():
        with np.load(path) as stored:
            return _freeze(*(stored[name] for name in MNIST1DArrays._fields))
    arrays = generate_mnist1d(num_samples, generation_seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so a concurrent reader never sees a half-written file.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as handle:
        np.savez(handle, **arrays._asdict())
    os.replace(tmp, path)
    return arrays


class MNIST1DDataModule(SplitDataModule):
    """MNIST-1D: 10 classes of length-40 signals, batches ``[x (B, 1, 40) float32, y (B,) int64]``.

    The data are generated locally (never downloaded); the defaults give the official 4000 train /
    1000 test samples. ``val_fraction`` of the training samples (stratified, chosen by ``seed``)
    are held out for validation. Inputs are standardised with the mean and standard deviation of
    the remaining training samples.

    Args:
        batch_size: samples per batch.
        num_workers: dataloader worker processes.
        seed: chooses the validation samples.
        val_fraction: share of the training samples used for validation; 0 validates on test.
        num_samples: total samples generated before the 80/20 train/test split.
        generation_seed: seed of the generator; the default is the official dataset's.
        cache_dir: optional folder to store the generated arrays in, shared across processes.
    """

    def __init__(
        self,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
        val_fraction: float = 0.1,
        num_samples: int = OFFICIAL_NUM_SAMPLES,
        generation_seed: int = OFFICIAL_SEED,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        check_fraction("val_fraction", val_fraction, allow_zero=True)
        # make_dataset draws num_samples // 10 signals per class, so fewer than 10 gives nothing.
        if num_samples < NUM_CLASSES:
            raise ValueError(f"num_samples must be at least {NUM_CLASSES}, got {num_samples}")
        self.save_hyperparameters()
        self.val_fraction = val_fraction
        self.num_samples = num_samples
        self.generation_seed = generation_seed
        self.cache_dir = cache_dir
        self.num_classes = NUM_CLASSES
        self.input_shape = (1, SEQUENCE_LENGTH)
        self.mean: float | None = None
        self.std: float | None = None
        self.train_indices: np.ndarray | None = None
        self.val_indices: np.ndarray | None = None

    def prepare_data(self) -> None:
        """Fill the disk cache once (Lightning runs this on a single process)."""
        if self.cache_dir is not None:
            load_mnist1d(self.num_samples, self.generation_seed, self.cache_dir)

    def build_splits(self) -> tuple[Dataset, Dataset | None, Dataset]:
        """Datasets of ``(x (1, 40) float32, y int64)``; ``train_indices``/``val_indices`` index
        the generated training arrays."""
        arrays = load_mnist1d(self.num_samples, self.generation_seed, self.cache_dir)
        rng = np.random.default_rng(self.seed)
        train_idx, val_idx = stratified_split(arrays.y_train, self.val_fraction, rng)
        self.train_indices, self.val_indices = train_idx, val_idx
        train_x = arrays.x_train[train_idx]
        mean, std = float(train_x.mean()), float(train_x.std())
        self.mean, self.std = mean, std

        def dataset(x: np.ndarray, y: np.ndarray) -> InMemoryDataset:
            inputs = (torch.tensor(x) - mean) / std
            return InMemoryDataset(inputs.unsqueeze(1), torch.tensor(y))

        val = None
        if len(val_idx) > 0:
            val = dataset(arrays.x_train[val_idx], arrays.y_train[val_idx])
        return (
            dataset(train_x, arrays.y_train[train_idx]),
            val,
            dataset(arrays.x_test, arrays.y_test),
        )
