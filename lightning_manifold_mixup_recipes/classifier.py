"""``MixupClassifier``: a ready LightningModule for the built-in models, configs and CLI."""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

from lightning_manifold_mixup.losses import Criterion
from lightning_manifold_mixup.mixin import ManifoldMixupMixin


class MixupClassifier(ManifoldMixupMixin, L.LightningModule):
    """Classifier around any backbone ``nn.Module`` mapping ``(B, ...)`` inputs to ``(B, C)``.

    The backbone is stored as ``self.net``, so its layers are named ``net.<name>`` for the
    callback. Validation and test log loss (NLL), accuracy, error and expected calibration
    error (15 bins, torchmetrics).

    Args:
        backbone: the network; ``num_classes`` must match its output width.
        num_classes: number of classes.
        optimizer: ``"sgd"`` (Nesterov momentum, as the paper) or ``"adam"``.
        lr: learning rate.
        momentum: SGD momentum.
        weight_decay: L2 weight decay.
        milestones: epochs at which the learning rate is divided by ``gamma`` (step schedule).
        gamma: learning-rate decay factor at each milestone.
        cosine: decay the learning rate to 0 along a half cosine over the run's optimizer steps
            (``trainer.estimated_stepping_batches``: ``max_steps``, or ``max_epochs`` times the
            batches per epoch), updated every step; not combined with ``milestones``.
        criterion: ``"ce"`` or ``"bce"`` (BCE on softmax, the paper's reference criterion).
        label_smoothing: label smoothing for ``"ce"``.
        train_metrics: log train loss and accuracies as the mixin's default ``training_step``
            does (an in-place loss sum per step, batch values on logging steps); ``False``
            only computes the loss.

    Example:
        >>> model = MixupClassifier(nn.Linear(4, 3), num_classes=3)
        >>> model(torch.zeros(2, 4)).shape
        torch.Size([2, 3])
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        *,
        optimizer: Literal["sgd", "adam"] = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        milestones: tuple[int, ...] = (),
        gamma: float = 0.1,
        cosine: bool = False,
        criterion: Criterion = "ce",
        label_smoothing: float = 0.0,
        train_metrics: bool = True,
    ) -> None:
        super().__init__()
        if cosine and milestones:
            raise ValueError(
                f"choose one learning-rate schedule: cosine=True or milestones={milestones}"
            )
        self.save_hyperparameters(ignore=["backbone"])
        self.net = backbone
        self.num_classes = num_classes
        self.mixup_criterion = criterion
        self.mixup_label_smoothing = label_smoothing
        self.val_metrics = _EvalMetrics(num_classes)
        self.test_metrics = _EvalMetrics(num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        if self.hparams.get("train_metrics", True):
            return super().training_step(batch, batch_idx)
        input_key, target_key = self.mixup_batch_keys()
        return self.mixup_loss(self(batch[input_key]), batch[target_key])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return torch.softmax(self(x).float(), dim=-1)

    def _eval_step(self, batch: Any, metrics: _EvalMetrics, stage: str) -> None:
        x, y = batch[0], batch[1]
        logits = self(x).float()
        metrics.update(logits, y)
        self.log_dict(metrics.as_dict(stage), on_step=False, on_epoch=True, prog_bar=stage == "val")

    def configure_optimizers(self) -> Any:
        hp: Any = self.hparams
        opt: torch.optim.Optimizer
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(
                self.parameters(),
                lr=hp.lr,
                momentum=hp.momentum,
                nesterov=hp.momentum > 0,
                weight_decay=hp.weight_decay,
            )
        else:
            opt = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.get("cosine", False):
            total = int(self.trainer.estimated_stepping_batches)
            cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total, 1))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": cosine, "interval": "step"}}
        if not hp.milestones:
            return opt
        sched = torch.optim.lr_scheduler.MultiStepLR(
            opt, milestones=list(hp.milestones), gamma=hp.gamma
        )
        return {"optimizer": opt, "lr_scheduler": sched}


class _EvalMetrics(nn.Module):
    """NLL, accuracy, error and ECE; each a torchmetrics object reduced across processes."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.nll = MeanMetric()
        self.acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.ece = MulticlassCalibrationError(num_classes=num_classes, n_bins=15, norm="l1")

    def update(self, logits: Tensor, y: Tensor) -> None:
        nll = nn.functional.cross_entropy(logits, y, reduction="none")
        self.nll.update(nll)
        self.acc.update(logits, y)
        self.ece.update(torch.softmax(logits, dim=-1), y)

    def as_dict(self, stage: str) -> dict[str, Any]:
        return {f"{stage}_nll": self.nll, f"{stage}_acc": self.acc, f"{stage}_ece": self.ece}
