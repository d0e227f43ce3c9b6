"""Owns the record of what was mixed (``MixRecord``): counted on the host, logged by Lightning.

Every number here comes from the host-side draw (layer position, lam), so recording and
logging never read device memory. Values reach the Trainer's loggers directly on Lightning's
logging steps (``log_every_n_steps``), as ``LearningRateMonitor`` does, averaged over the
micro-batches of the optimizer step being logged.
"""

from __future__ import annotations

from typing import Any

from lightning_manifold_mixup._lightning import pl

LAM_BINS = 10


class MixRecord:
    """Counts per layer, a lam histogram, unmixed batches, and the per-step log.

    Example:
        >>> record = MixRecord(["input", "net.1"])
        >>> record.add(1, 0.25); record.add_unmixed()
        >>> record.summary()["layers"], record.summary()["unmixed_batches"]
        ({'input': 0, 'net.1': 1}, 1)
    """

    def __init__(self, layers: list[str]) -> None:
        self.layers = list(layers)
        self.layer_counts = [0] * len(layers)
        self.lam_counts = [0] * LAM_BINS
        self.unmixed = 0
        # Sums over the micro-batches of the optimizer step in progress.
        self._lam_sum = self._layer_sum = 0.0
        self._mixed = 0

    def add(self, layer: int, lam_mean: float) -> None:
        """Record a mixed batch: the layer's position and its (mean) lam."""
        self.layer_counts[layer] += 1
        self.lam_counts[min(int(lam_mean * LAM_BINS), LAM_BINS - 1)] += 1
        self._lam_sum += lam_mean
        self._layer_sum += layer
        self._mixed += 1

    def add_unmixed(self) -> None:
        self.unmixed += 1

    def end_step(self, trainer: pl.Trainer, log: bool) -> None:
        """Close the optimizer step: log its mean lam and layer position on logging steps."""
        if log and self._mixed and trainer.loggers and _is_logging_step(trainer):
            metrics = {
                "mixup/lam": self._lam_sum / self._mixed,
                "mixup/layer": self._layer_sum / self._mixed,
            }
            step = trainer.fit_loop.epoch_loop._batches_that_stepped
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
        self._lam_sum = self._layer_sum = 0.0
        self._mixed = 0

    def summary(self) -> dict[str, Any]:
        return {
            "layers": dict(zip(self.layers, self.layer_counts, strict=True)),
            "lam_histogram": {
                f"{i / LAM_BINS:.1f}-{(i + 1) / LAM_BINS:.1f}": n
                for i, n in enumerate(self.lam_counts)
            },
            "unmixed_batches": self.unmixed,
        }


def _is_logging_step(trainer: pl.Trainer) -> bool:
    """Whether Lightning writes this step's metrics to the loggers (``log_every_n_steps``)."""
    return bool(trainer._logger_connector.should_update_logs)


def step_completes(trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
    """Whether the batch in flight ends an optimizer step (not a gradient-accumulation one)."""
    if not pl_module.automatic_optimization:
        return True
    return not trainer.fit_loop._should_accumulate()
