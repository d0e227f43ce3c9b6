"""What the tests (and the benchmarks) share to watch the callback.

- ``DecisionRecorder``: every training batch's ``MixDecision`` (``decisions``, ``last_decision``,
  ``draws``), wherever it stands in the callback list. The mixup callback clears ``current``
  when the batch ends, so the recorder reads it at every hook where it is set (batch start,
  before backward, batch end) and keeps the last one. ``RunRecorder`` adds each batch's hook-run
  count, ``StepRecorder`` a row per batch with the raw batch, weights, target and loss.
- ``draw`` / ``draws``: ``(layer, lam, index)`` of decisions or saved rows, comparable with ``==``.
- ``KeepsTargets``: a module mixin keeping the targets training_step receives.
- ``fake_trainer``: the stand-in Trainer for driving the hooks by hand; the benchmarks'
  ``ManualDriver`` uses it too (they import this module by putting ``tests/`` on ``sys.path``).
- ``mixup_of``: the trainer's mixup callback.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from types import SimpleNamespace
from typing import Any

import lightning as L
import torch

from lightning_manifold_mixup import ManifoldMixupCallback, MixDecision

Draw = tuple[str, float, tuple[int, ...]]
"""One batch's draw, comparable with ``==``: ``(layer, lam, index)``."""


def fake_trainer(**fields: Any) -> Any:
    """A stand-in for the Trainer with what the callback reads, for driving its hooks by hand:
    one process, no logger, step 0, an unbounded run; ``fields`` override any of these."""
    progress = SimpleNamespace(total=SimpleNamespace(ready=0))
    fit_loop = SimpleNamespace(
        epoch_loop=SimpleNamespace(
            batch_progress=progress,
            _batches_that_stepped=0,
            automatic_optimization=SimpleNamespace(_skip_backward=False),
        ),
        _should_accumulate=lambda: False,
    )
    defaults: dict[str, Any] = {
        "global_rank": 0,
        "world_size": 1,
        "strategy": fake_strategy(),
        "loggers": [],
        "global_step": 0,
        "current_epoch": 0,
        "ckpt_path": None,
        "fit_loop": fit_loop,
        "max_steps": -1,
        "max_epochs": None,
        "num_training_batches": float("inf"),
        "estimated_stepping_batches": float("inf"),
    }
    return SimpleNamespace(**{**defaults, **fields})


def fake_strategy(**fields: Any) -> Any:
    """A stand-in for the Trainer's strategy: a ``training_step`` (which the callback wraps to
    close its mixing window) and ``fields``."""
    return SimpleNamespace(training_step=lambda *args, **kwargs: None, **fields)


def mixup_of(trainer: L.Trainer) -> ManifoldMixupCallback:
    """The trainer's mixup callback."""
    return next(c for c in trainer.callbacks if isinstance(c, ManifoldMixupCallback))  # type: ignore[attr-defined]


def draw(decision: MixDecision | Mapping[str, Any] | None) -> Draw:
    """``(layer, lam, index)`` of a decision, or of a saved row with those keys."""
    assert decision is not None, "an unmixed batch has no draw"
    if isinstance(decision, Mapping):
        layer, lam, index = decision["layer"], decision["lam"], decision["index"]
    else:
        layer, lam, index = decision.layer, decision.lam, decision.index
    if isinstance(index, torch.Tensor):
        index = index.tolist()
    return (layer, float(lam), tuple(index))


def draws(decisions: Iterable[MixDecision | Mapping[str, Any] | None]) -> list[Draw]:
    """The draws of a run, batch by batch (see :func:`draw`)."""
    return [draw(d) for d in decisions]


class DecisionRecorder(L.Callback):
    """Keeps each training batch's ``MixDecision`` (None for an unmixed batch) in
    ``decisions``, and the latest in ``last_decision``; its place in the callback list does not
    matter. ``mixup`` defaults to the trainer's mixup callback.

    The decision is the callback's own object, so a lam fixed during the forward (hidden-layer
    CutMix) reads as fixed once the batch has ended.
    """

    def __init__(self, mixup: ManifoldMixupCallback | None = None) -> None:
        self.mixup = mixup
        self.decisions: list[MixDecision | None] = []
        self.last_decision: MixDecision | None = None
        self._batch: MixDecision | None = None

    @property
    def draws(self) -> list[Draw]:
        return draws(self.decisions)

    def _look(self, trainer: L.Trainer) -> None:
        current = (self.mixup or mixup_of(trainer)).current
        if current is not None:
            self._batch = current

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._batch = None
        self._look(trainer)  # set when listed after the mixup callback

    def on_before_backward(self, trainer: L.Trainer, *args: Any) -> None:
        self._look(trainer)  # set in any place, after the forward (and a CutMix lam fix)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self._look(trainer)  # set when listed before the mixup callback
        self.last_decision = self._batch
        self.decisions.append(self._batch)


class RunRecorder(DecisionRecorder):
    """A ``DecisionRecorder`` that also keeps, per batch, how many times the chosen layer's
    hook mixed during the forward (``runs``; 0 for input mixup). The count is the callback's
    private state: this is the one place the tests read it."""

    def __init__(self, mixup: ManifoldMixupCallback | None = None) -> None:
        super().__init__(mixup)
        self.runs: list[int] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_batch_end(trainer)
        self.runs.append((self.mixup or mixup_of(trainer))._hooks.calls)


def copied_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class StepRecorder(DecisionRecorder):
    """A ``DecisionRecorder`` that also keeps a row per batch in ``rows``: the raw batch (``x``,
    ``y``), the ``weights`` before the step, the ``step``, the decision (``layer``, ``lam``,
    ``index``), the ``target`` as training_step got it and the ``loss``.

    It copies the raw batch when the batch starts, before the mixup callback rewrites it, so it
    must be listed before the mixup callback (checked). Every batch must be mixed.
    """

    def __init__(
        self,
        mixup: ManifoldMixupCallback | None = None,
        weights: Callable[[torch.nn.Module], dict[str, torch.Tensor]] = copied_weights,
    ) -> None:
        super().__init__(mixup)
        self.weights = weights
        self.rows: list[dict[str, Any]] = []
        self.row: dict[str, Any] = {}  # the batch in flight

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        assert (self.mixup or mixup_of(trainer)).current is None, (
            "StepRecorder copies the raw batch: list it before the mixup callback"
        )
        super().on_train_batch_start(trainer)
        self.row = {
            "x": batch[0].clone(),
            "y": batch[1].clone(),
            "weights": self.weights(pl_module),
        }

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer)
        d = self.last_decision
        assert d is not None
        self.row.update(
            step=trainer.global_step,
            layer=d.layer,
            lam=d.lam.clone(),
            index=d.index.clone(),
            target=batch[1].clone(),
            loss=outputs["loss"].detach(),
        )
        self.rows.append(self.row)


class KeepsTargets:
    """Listed before a LightningModule among a test module's bases: ``targets`` keeps
    ``batch[1]`` as each training_step receives it (rewritten by the mixup callback)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.targets: list[Any] = []

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        self.targets.append(batch[1])
        return super().training_step(batch, batch_idx)  # type: ignore[misc]
