"""LightningDataModules for the datasets used in the examples and benchmarks."""

from lightning_manifold_mixup.data.cifar import CIFARDataModule
from lightning_manifold_mixup.data.digits import DigitsDataModule
from lightning_manifold_mixup.data.mnist_1d import MNIST1DDataModule
from lightning_manifold_mixup.data.spirals import SpiralsDataModule

__all__ = ["CIFARDataModule", "DigitsDataModule", "MNIST1DDataModule", "SpiralsDataModule"]
