"""``fit``/``validate``/``test``/``predict``: LightningCLI for :class:`MixupClassifier`.

Configure the callback in YAML or with ``--trainer.callbacks+=ManifoldMixupCallback``.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_manifold_mixup import ManifoldMixupCallback
from lightning_manifold_mixup_recipes.classifier import MixupClassifier

__all__ = ["ManifoldMixupCallback", "MixupCLI", "run_lightning_cli"]


class MixupCLI(LightningCLI):
    """LightningCLI for :class:`MixupClassifier` and any LightningDataModule."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")


def run_lightning_cli(args: list[str] | None) -> None:
    """Run LightningCLI on ``args`` (None: the process's arguments)."""
    MixupCLI(
        MixupClassifier,
        L.LightningDataModule,
        subclass_mode_data=True,
        args=args,
        save_config_kwargs={"overwrite": True},
    )
