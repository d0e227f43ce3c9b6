"""``ManifoldMixupMixin``: the LightningModule side of Manifold Mixup."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from lightning_manifold_mixup.losses import Criterion, Target, mixup_loss
from lightning_manifold_mixup.mixing import MixedTarget


def dominant_class(target: Target) -> Tensor:
    """Class indices ``(B,)`` from labels, soft targets ``(B, C)`` or a :class:`MixedTarget`.

    For a mixed target this is the class with the larger weight, which is what a train
    accuracy on mixed batches can be measured against.

    Example:
        >>> dominant_class(torch.tensor([[0.3, 0.7], [0.9, 0.1]]))
        tensor([1, 0])
    """
    if isinstance(target, MixedTarget):
        lam = target.lam.expand(target.y_a.shape[0])
        return torch.where(lam >= 0.5, target.y_a, target.y_b)
    if target.is_floating_point():
        return target.argmax(dim=-1)
    return target


def mixed_accuracy(logits: Tensor, target: Target) -> Tensor:
    """Per-row credit ``(B,)``: the target's weight on the predicted class.

    For a mix of ``y_a`` and ``y_b`` this is ``lam * [pred == y_a] + (1 - lam) * [pred == y_b]``,
    accuracy against both labels weighted by lam; for class indices it is plain accuracy.

    Example:
        >>> mixed_accuracy(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.7, 0.3]] * 2))
        tensor([0.7000, 0.3000])
    """
    pred = logits.argmax(dim=-1)
    if isinstance(target, MixedTarget):
        lam = target.lam.expand(pred.shape[0]).float()
        return lam * (pred == target.y_a).float() + (1 - lam) * (pred == target.y_b).float()
    if target.is_floating_point():
        return target.gather(-1, pred.unsqueeze(-1)).squeeze(-1).float()
    return (pred == target).float()


def find_num_classes(module: object) -> int | None:
    """``module.num_classes``, else ``module.hparams["num_classes"]``, else None."""
    value = getattr(module, "num_classes", None)
    if value is None:
        hparams = getattr(module, "hparams", None)
        if isinstance(hparams, Mapping):
            value = hparams.get("num_classes")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class ManifoldMixupMixin:
    """Mix into a LightningModule (before ``LightningModule`` in the bases) for Manifold Mixup.

    Supplies :meth:`mixup_loss`, a default :meth:`training_step` for ``(x, y)`` batches, and
    turns tuple batches into lists during training so ``ManifoldMixupCallback`` can rewrite
    them in place.

    Class attributes (override in the subclass or set in ``__init__``):
        mixup_criterion: ``"ce"`` (cross-entropy) or ``"bce"`` (BCE on softmax, as the
            paper's reference code).
        mixup_label_smoothing: label smoothing in ``[0, 1)``.

    Example:
        >>> import lightning as L
        >>> class Lit(ManifoldMixupMixin, L.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.num_classes = 3
        ...         self.net = torch.nn.Linear(4, 3)
        ...     def forward(self, x):
        ...         return self.net(x)
        >>> soft = torch.tensor([[0.5, 0.5, 0.0]])
        >>> float(Lit().mixup_loss(torch.zeros(1, 3), soft))  # log(3)
        1.0986...
    """

    mixup_criterion: Criterion = "ce"
    mixup_label_smoothing: float = 0.0

    def mixup_loss(self, logits: Tensor, target: Target) -> Tensor:
        """Loss for mixed (soft or pair) and unmixed (class index) targets, in float32.

        Args:
            logits: ``(B, C)`` in any floating dtype.
            target: int64 ``(B,)``, float ``(B, C)`` or :class:`MixedTarget`.

        Returns:
            A float32 scalar, computed with autocast disabled.
        """
        return mixup_loss(
            logits,
            target,
            criterion=self.mixup_criterion,
            label_smoothing=self.mixup_label_smoothing,
        )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        batch = super().on_after_batch_transfer(batch, dataloader_idx)  # type: ignore[misc]
        trainer = getattr(self, "_trainer", None)
        # Tuples cannot be rewritten in place; Lightning passes the same list object to the
        # callback's on_train_batch_start and to training_step.
        if trainer is not None and trainer.training and type(batch) is tuple:
            batch = list(batch)
        return batch

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Default step for ``(x, y)`` classification batches: loss and train accuracy.

        Logs ``train_loss``, ``train_acc`` (accuracy against the dominant class of the mixed
        target) and ``train_mixed_acc`` (against both labels, weighted by lam) per step and per
        epoch; epoch values are reduced across processes by torchmetrics, so no collective
        runs per step.
        """
        x, y = batch[0], batch[1]
        logits = self(x)  # type: ignore[operator]
        loss = self.mixup_loss(logits, y)
        self._log_train_metrics(loss, logits, y)
        return loss

    def setup(self, stage: str) -> None:
        super().setup(stage)  # type: ignore[misc]
        # Lightning warns whenever a module overrides on_after_batch_transfer and a datamodule
        # is used; here the module's hook is the intended one (it only turns tuples into lists).
        warnings.filterwarnings(
            "ignore", message=r".*overridden `on_after_batch_transfer` in `LightningModule` but"
        )
        # Build the metrics outside training_step, so a compiled training_step does not trace
        # their construction; the lazy path in _log_train_metrics covers unknown class counts.
        num_classes = find_num_classes(self)
        if stage == "fit" and num_classes is not None and not self._has_train_metrics():
            self._build_train_metrics(num_classes)

    def _has_train_metrics(self) -> bool:
        # Rebuilding on a second fit would orphan the objects Lightning has already logged.
        return isinstance(getattr(self, "train_acc", None), MulticlassAccuracy)

    def _build_train_metrics(self, num_classes: int) -> None:
        if num_classes < 2:
            rank_zero_warn("train_acc needs at least 2 classes; it is measured over 2")
        # No input checks: they read the tensors on the host, which would synchronise with
        # the GPU every step (a NaN loss still shows as a NaN mean).
        self.train_loss_mean = MeanMetric(nan_strategy="disable")
        self.train_acc = MulticlassAccuracy(
            num_classes=max(num_classes, 2), average="micro", validate_args=False
        )
        self.train_mixed_acc = MeanMetric(nan_strategy="disable")

    def _log_train_metrics(self, loss: Tensor, logits: Tensor, target: Target) -> None:
        if not self._has_train_metrics():
            self._build_train_metrics(logits.shape[-1])
            self.train_loss_mean.to(logits.device)
            self.train_acc.to(logits.device)
            self.train_mixed_acc.to(logits.device)
        self.train_loss_mean(loss.detach())
        self.train_acc(logits.detach(), dominant_class(target))
        self.train_mixed_acc(mixed_accuracy(logits.detach(), target))
        log = self.log  # type: ignore[attr-defined]
        log("train_loss", self.train_loss_mean, on_step=True, on_epoch=True, prog_bar=True)
        log("train_acc", self.train_acc, on_step=True, on_epoch=True, prog_bar=True)
        log("train_mixed_acc", self.train_mixed_acc, on_step=True, on_epoch=True)
