"""Datamodules: batch shapes and dtypes, deterministic disjoint splits, CIFAR augmentation."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from jsonargparse import ArgumentParser
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.transforms.v2.functional import pil_to_tensor

from lightning_manifold_mixup_recipes.data import (
    CIFARDataModule,
    DigitsDataModule,
    MNIST1DDataModule,
    SpiralsDataModule,
)
from lightning_manifold_mixup_recipes.data._base import SplitDataModule
from lightning_manifold_mixup_recipes.data.cifar import CIFAR_STATS, FAKE_TEST_SIZE, FAKE_TRAIN_SIZE
from lightning_manifold_mixup_recipes.data.mnist_1d import generate_mnist1d, load_mnist1d


@pytest.fixture(scope="module")
def mnist1d() -> MNIST1DDataModule:
    """The official MNIST-1D, generated once for this module (later setups hit the cache)."""
    dm = MNIST1DDataModule()
    dm.setup("fit")
    return dm


def first_batch(dm: SplitDataModule, split: str = "train") -> list[torch.Tensor]:
    return next(iter(getattr(dm, f"{split}_dataloader")()))


def tensors(dataset: Any) -> tuple[torch.Tensor, ...]:
    assert isinstance(dataset, TensorDataset)
    return dataset.tensors


def assert_batch(
    batch: list[torch.Tensor], batch_size: int, input_shape: tuple[int, ...], num_classes: int
) -> None:
    x, y = batch
    assert x.shape == (batch_size, *input_shape)
    assert x.dtype == torch.float32
    assert y.shape == (batch_size,)
    assert y.dtype == torch.int64
    assert int(y.min()) >= 0 and int(y.max()) < num_classes


@pytest.mark.parametrize(
    ("dm", "input_shape", "num_classes"),
    [
        (MNIST1DDataModule(), (1, 40), 10),
        (DigitsDataModule(), (1, 8, 8), 10),
        (SpiralsDataModule(num_classes=5), (2,), 5),
        (CIFARDataModule(fake_data=True), (3, 32, 32), 10),
        (CIFARDataModule(dataset="cifar100", fake_data=True), (3, 32, 32), 100),
    ],
    ids=["mnist1d", "digits", "spirals", "cifar10", "cifar100"],
)
def test_metadata_is_known_before_setup(
    dm: SplitDataModule, input_shape: tuple[int, ...], num_classes: int
) -> None:
    assert dm.input_shape == input_shape
    assert dm.num_classes == num_classes
    assert dm.train_set is None
    with pytest.raises(RuntimeError, match="setup"):
        dm.train_dataloader()


# --- MNIST-1D ---------------------------------------------------------------------------------


def test_mnist1d_batches_and_official_sizes(mnist1d: MNIST1DDataModule) -> None:
    for split in ("train", "val", "test", "predict"):
        assert_batch(first_batch(mnist1d, split), 128, (1, 40), 10)
    assert mnist1d.train_indices is not None and mnist1d.val_indices is not None
    assert len(mnist1d.train_indices) == 3600
    assert len(mnist1d.val_indices) == 400
    assert len(tensors(mnist1d.test_set)[0]) == 1000
    # 10% of each class is held out, rounded up or down.
    class_sizes = np.bincount(generate_mnist1d(5000, 42).y_train, minlength=10)
    val_class_sizes = torch.bincount(tensors(mnist1d.val_set)[1], minlength=10).numpy()
    assert np.all(np.abs(val_class_sizes - 0.1 * class_sizes) < 1)


def test_mnist1d_splits_are_disjoint_and_seeded(mnist1d: MNIST1DDataModule) -> None:
    train, val = mnist1d.train_indices, mnist1d.val_indices
    assert train is not None and val is not None
    assert np.intersect1d(train, val).size == 0
    assert np.array_equal(np.union1d(train, val), np.arange(4000))

    same, other = MNIST1DDataModule(seed=0), MNIST1DDataModule(seed=1)
    same.setup()
    other.setup()
    assert np.array_equal(same.val_indices, val)  # type: ignore[arg-type]
    assert not np.array_equal(other.val_indices, val)  # type: ignore[arg-type]
    # The test split is the official one whatever the seed.
    assert torch.equal(tensors(same.test_set)[1], tensors(other.test_set)[1])


def test_mnist1d_is_standardised_with_train_statistics(mnist1d: MNIST1DDataModule) -> None:
    train_x = tensors(mnist1d.train_set)[0]
    assert abs(float(train_x.mean())) < 1e-4
    assert float(train_x.std()) == pytest.approx(1.0, abs=1e-3)
    assert mnist1d.mean is not None and mnist1d.std is not None
    arrays = generate_mnist1d(5000, 42)
    expected = (arrays.x_test[:5] - mnist1d.mean) / mnist1d.std
    torch.testing.assert_close(tensors(mnist1d.test_set)[0][:5, 0], torch.tensor(expected))


def test_mnist1d_custom_size_keeps_global_rng_state() -> None:
    random.seed(123)
    np.random.seed(123)
    expected = (random.random(), np.random.rand())
    random.seed(123)
    np.random.seed(123)
    dm = MNIST1DDataModule(num_samples=100, val_fraction=0.0)
    dm.setup()  # make_dataset reseeds both global generators internally
    assert (random.random(), np.random.rand()) == expected
    assert len(tensors(dm.train_set)[0]) == 80
    # With no validation split the test split is used for validation.
    assert dm.val_set is dm.test_set
    assert len(tensors(dm.test_set)[0]) == 20


def test_mnist1d_disk_cache_round_trips(tmp_path: Path, mnist1d: MNIST1DDataModule) -> None:
    dm = MNIST1DDataModule(cache_dir=str(tmp_path / "cache"))
    dm.prepare_data()
    files = list((tmp_path / "cache").iterdir())
    assert [f.name for f in files] == ["mnist1d_n5000_seed42.npz"]
    stored = load_mnist1d(5000, 42, str(tmp_path / "cache"))
    for name, array in generate_mnist1d(5000, 42)._asdict().items():
        assert np.array_equal(getattr(stored, name), array)
        assert getattr(stored, name).dtype == array.dtype
    dm.setup()
    assert torch.equal(tensors(dm.train_set)[0], tensors(mnist1d.train_set)[0])


def test_mnist1d_cached_arrays_are_read_only() -> None:
    arrays = generate_mnist1d(5000, 42)
    with pytest.raises(ValueError, match="read-only"):
        arrays.x_train[0, 0] = 1.0


# --- digits -----------------------------------------------------------------------------------


def test_digits_batches_and_pixel_range() -> None:
    dm = DigitsDataModule(batch_size=32)
    dm.setup()
    for split in ("train", "val", "test", "predict"):
        assert_batch(first_batch(dm, split), 32, (1, 8, 8), 10)
    all_x = torch.cat([tensors(s)[0] for s in (dm.train_set, dm.val_set, dm.test_set)])
    assert float(all_x.min()) == 0.0 and float(all_x.max()) == 1.0


def test_digits_split_is_stratified_disjoint_and_seeded() -> None:
    dm, again, other = DigitsDataModule(), DigitsDataModule(), DigitsDataModule(seed=1)
    for d in (dm, again, other):
        d.setup()
    train, val, test = dm.train_indices, dm.val_indices, dm.test_indices
    assert train is not None and val is not None and test is not None
    everything = np.concatenate([train, val, test])
    assert np.array_equal(np.sort(everything), np.arange(1797))  # disjoint and complete
    assert len(test) == round(0.2 * 1797)
    assert len(val) == round(0.1 * (1797 - len(test)))
    class_sizes = np.bincount(load_digits().target)
    test_class_sizes = torch.bincount(tensors(dm.test_set)[1], minlength=10).numpy()
    assert np.all(np.abs(test_class_sizes - 0.2 * class_sizes) < 1)

    assert np.array_equal(again.test_indices, test)  # type: ignore[arg-type]
    assert np.array_equal(again.val_indices, val)  # type: ignore[arg-type]
    assert not np.array_equal(other.test_indices, test)  # type: ignore[arg-type]


@pytest.mark.parametrize("kwargs", [{"test_fraction": 0.0}, {"val_fraction": 1.0}])
def test_digits_rejects_bad_fractions(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="fraction"):
        DigitsDataModule(**kwargs)


# --- spirals ----------------------------------------------------------------------------------


def test_spirals_batches_and_split_sizes() -> None:
    dm = SpiralsDataModule(num_classes=4, num_train=400, num_val=40, num_test=80, batch_size=16)
    dm.setup()
    for split in ("train", "val", "test", "predict"):
        assert_batch(first_batch(dm, split), 16, (2,), 4)
    sizes = [len(tensors(s)[0]) for s in (dm.train_set, dm.val_set, dm.test_set)]
    assert sizes == [400, 40, 80]
    assert torch.bincount(tensors(dm.train_set)[1]).tolist() == [100] * 4


def test_spirals_points_lie_on_their_arms_without_noise() -> None:
    dm = SpiralsDataModule(num_classes=3, num_train=300, noise=0.0, turns=1.5)
    dm.setup()
    x, y = tensors(dm.train_set)
    radius = x.norm(dim=1)
    angle = 2 * math.pi * (1.5 * radius + y / 3)
    on_arm = radius[:, None] * torch.stack([angle.cos(), angle.sin()], dim=1)
    torch.testing.assert_close(x, on_arm, atol=1e-5, rtol=0)


def test_spirals_are_seeded_and_splits_independent() -> None:
    def build(**kwargs: Any) -> SpiralsDataModule:
        dm = SpiralsDataModule(**kwargs)
        dm.setup()
        return dm

    dm = build()
    again = build()
    bigger_train = build(num_train=5000)
    other = build(seed=1)
    for split in ("train_set", "val_set", "test_set"):
        assert torch.equal(tensors(getattr(dm, split))[0], tensors(getattr(again, split))[0])
    # The test split does not depend on how many training points were drawn.
    assert torch.equal(tensors(dm.test_set)[0], tensors(bigger_train.test_set)[0])
    assert not torch.equal(tensors(dm.test_set)[0], tensors(other.test_set)[0])
    train_points = {tuple(p) for p in tensors(dm.train_set)[0].tolist()}
    assert train_points.isdisjoint(tuple(p) for p in tensors(dm.test_set)[0].tolist())


# --- CIFAR (FakeData only: no network, no files) ----------------------------------------------


@pytest.fixture
def cifar() -> CIFARDataModule:
    dm = CIFARDataModule(fake_data=True, batch_size=50)
    dm.setup()
    return dm


def test_cifar_fake_batches_and_splits(cifar: CIFARDataModule) -> None:
    val_size = len(cifar.val_set)  # type: ignore[arg-type]
    for split, batch_size in [("train", 50), ("val", val_size), ("test", 50), ("predict", 50)]:
        assert_batch(first_batch(cifar, split), batch_size, (3, 32, 32), 10)
    train, val = cifar.train_indices, cifar.val_indices
    assert train is not None and val is not None
    assert np.intersect1d(train, val).size == 0
    assert len(train) + len(val) == FAKE_TRAIN_SIZE
    assert len(val) == 0.1 * FAKE_TRAIN_SIZE
    assert len(cifar.test_set) == FAKE_TEST_SIZE  # type: ignore[arg-type]

    again = CIFARDataModule(fake_data=True)
    again.setup()
    assert np.array_equal(again.val_indices, val)  # type: ignore[arg-type]


def test_cifar100_fake_labels_cover_100_classes() -> None:
    dm = CIFARDataModule(dataset="cifar100", fake_data=True, batch_size=FAKE_TEST_SIZE)
    dm.setup()
    # About 2 images per class: the split still holds out 10% of them, not 0 per class.
    assert dm.val_indices is not None and len(dm.val_indices) == 0.1 * FAKE_TRAIN_SIZE
    _, y = first_batch(dm, "test")
    assert int(y.max()) >= 10  # labels are drawn from all 100 classes, not just 10
    assert int(y.max()) < 100


def test_cifar_augments_only_training_images(cifar: CIFARDataModule) -> None:
    train_draws = [cifar.train_set[0][0] for _ in range(8)]  # type: ignore[index]
    assert any(not torch.equal(train_draws[0], d) for d in train_draws[1:])
    for split in (cifar.val_set, cifar.test_set):
        first = split[0][0]  # type: ignore[index]
        assert all(torch.equal(first, split[0][0]) for _ in range(3))  # type: ignore[index]


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """(3, H, W) values in [0, 1] -> standardised with the CIFAR-10 channel statistics."""
    mean, std = (torch.tensor(v).view(3, 1, 1) / 255 for v in CIFAR_STATS["cifar10"])
    return (pixels - mean) / std


def test_cifar_eval_images_are_normalised_with_cifar_stats(cifar: CIFARDataModule) -> None:
    val_set = cifar.val_set
    image, _ = val_set.dataset[val_set.indices[0]]  # type: ignore[union-attr]
    expected = normalise(pil_to_tensor(image).float() / 255)
    torch.testing.assert_close(val_set[0][0], expected)  # type: ignore[index]


def test_cifar_training_images_are_padded_crops_or_their_mirrors(cifar: CIFARDataModule) -> None:
    train_set = cifar.train_set
    image, _ = train_set.dataset[train_set.indices[0]]  # type: ignore[union-attr]
    padded = nn.functional.pad(pil_to_tensor(image).float() / 255, (2, 2, 2, 2))
    crops = [padded[:, dy : dy + 32, dx : dx + 32] for dy in range(5) for dx in range(5)]
    candidates = torch.stack([normalise(c) for crop in crops for c in (crop, crop.flip(-1))])
    for _ in range(5):
        draw = train_set[0][0]  # type: ignore[index]
        errors = (candidates - draw).abs().flatten(1).amax(dim=1)
        assert float(errors.min()) < 1e-5


def test_cifar_fake_test_images_differ_from_train_images(cifar: CIFARDataModule) -> None:
    train_image, _ = cifar.train_set.dataset[0]  # type: ignore[union-attr]
    test_image, _ = cifar.test_set.dataset[0]  # type: ignore[union-attr]
    assert not torch.equal(pil_to_tensor(train_image), pil_to_tensor(test_image))


def test_cifar_full_training_set_validates_on_test() -> None:
    dm = CIFARDataModule(fake_data=True, val_fraction=0.0)
    dm.setup()
    assert len(dm.train_set) == FAKE_TRAIN_SIZE  # type: ignore[arg-type]
    assert dm.val_set is dm.test_set


def test_cifar_without_files_or_download_fails_offline(tmp_path: Path) -> None:
    dm = CIFARDataModule(data_dir=str(tmp_path))
    dm.prepare_data()  # download=False: must not touch the network
    with pytest.raises(RuntimeError, match="not found"):
        dm.setup()


# --- shared behaviour -------------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
def test_persistent_workers_only_with_workers(num_workers: int) -> None:
    dm = SpiralsDataModule(num_workers=num_workers, num_train=8, num_val=8, num_test=8)
    dm.setup()
    # Building the loaders starts no worker processes; only iterating would.
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        assert loader.num_workers == num_workers
        assert loader.persistent_workers == (num_workers > 0)


def test_setup_is_idempotent() -> None:
    dm = SpiralsDataModule()
    dm.setup("fit")
    train = dm.train_set
    dm.setup("test")
    assert dm.train_set is train


@pytest.mark.parametrize(
    ("cls", "args"),
    [
        (MNIST1DDataModule, ["--data.cache_dir=/tmp/somewhere", "--data.val_fraction=0.2"]),
        (DigitsDataModule, ["--data.test_fraction=0.25"]),
        (SpiralsDataModule, ["--data.num_classes=4", "--data.noise=0.1"]),
        (CIFARDataModule, ["--data.dataset=cifar100", "--data.fake_data=true"]),
    ],
)
def test_datamodules_are_cli_parsable(cls: type[SplitDataModule], args: list[str]) -> None:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "data")
    cfg = parser.parse_args(args)
    dm = cls(**cfg.data.as_dict())
    for arg in args:
        key, value = arg.removeprefix("--data.").split("=")
        assert str(getattr(dm, key)).lower() == value


class _LinearClassifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(2, 3)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self.net(x), y))

    def test_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_runs_every_stage_on_a_datamodule() -> None:
    dm = SpiralsDataModule(num_train=64, num_val=32, num_test=32, batch_size=16)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = _LinearClassifier()
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 4
    (result,) = trainer.test(model, datamodule=dm, verbose=False)
    assert math.isfinite(result["val_loss"])


def test_in_memory_batches_equal_the_per_sample_batches_of_a_tensor_dataset() -> None:
    dm = SpiralsDataModule(num_train=100, num_val=8, num_test=8, batch_size=32)
    dm.setup("fit")
    plain = DataLoader(TensorDataset(*tensors(dm.train_set)), batch_size=32, shuffle=True)
    torch.manual_seed(0)
    fast = list(dm.train_dataloader())
    torch.manual_seed(0)
    slow = list(plain)
    assert [len(b[0]) for b in fast] == [32, 32, 32, 4]
    for (x, y), (x_ref, y_ref) in zip(fast, slow, strict=True):
        assert isinstance(x, torch.Tensor) and torch.equal(x, x_ref) and torch.equal(y, y_ref)
