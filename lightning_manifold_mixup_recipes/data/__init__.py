"""LightningDataModules for the datasets used in the examples and benchmarks."""

from lightning_manifold_mixup_recipes.data.cifar import CIFARDataModule
from lightning_manifold_mixup_recipes.data.digits import DigitsDataModule
from lightning_manifold_mixup_recipes.data.mnist import MNISTDataModule
from lightning_manifold_mixup_recipes.data.mnist_1d import MNIST1DDataModule
from lightning_manifold_mixup_recipes.data.spirals import SpiralsDataModule

__all__ = [
    "CIFARDataModule",
    "DigitsDataModule",
    "MNIST1DDataModule",
    "MNISTDataModule",
    "SpiralsDataModule",
]
