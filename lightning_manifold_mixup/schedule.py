"""Owns alpha over a run: the schedule, warmup and ``stop_epoch`` of the mixing strength."""

from __future__ import annotations

import math

import numpy as np

from lightning_manifold_mixup._lightning import MisconfigurationException, pl
from lightning_manifold_mixup.config import MixupConfig


def alpha_at(config: MixupConfig, trainer: pl.Trainer, batches_done: int) -> float:
    """alpha for the next batch: the schedule, warmup and stop_epoch applied."""
    if config.stop_epoch is not None and trainer.current_epoch >= config.stop_epoch:
        return 0.0
    scale = 1.0
    if config.alpha_schedule != "constant":
        progress = _run_progress(trainer, batches_done)
        scale = 1.0 - progress
        if config.alpha_schedule == "cosine":
            scale = 0.5 * (1.0 + math.cos(math.pi * progress))
    if config.warmup_steps:
        scale *= min(1.0, (trainer.global_step + 1) / config.warmup_steps)
    return config.alpha * scale


def _run_progress(trainer: pl.Trainer, batches_done: int) -> float:
    """Fraction of the run done, in [0, 1]: optimizer steps against ``max_steps`` and
    batches against ``max_epochs`` (a batch may take several optimizer steps, as with two
    optimizers under manual optimization), whichever limit is nearer."""
    fractions = [0.0]
    max_steps = trainer.max_steps
    if max_steps is not None and max_steps > 0:
        fractions.append(trainer.global_step / max_steps)
    max_epochs, per_epoch = trainer.max_epochs, trainer.num_training_batches
    if max_epochs is not None and max_epochs > 0 and math.isfinite(per_epoch):
        fractions.append(batches_done / max(max_epochs * per_epoch, 1))
    return min(max(fractions), 1.0)


def check_run_length(config: MixupConfig, trainer: pl.Trainer) -> None:
    if config.alpha_schedule != "constant" and not np.isfinite(trainer.estimated_stepping_batches):
        raise MisconfigurationException(
            f"alpha_schedule={config.alpha_schedule!r} needs a finite run length: set "
            "max_epochs or max_steps on the Trainer, or use alpha_schedule='constant'"
        )
