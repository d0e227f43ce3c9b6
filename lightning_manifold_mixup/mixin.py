"""Owns the LightningModule side: ``ManifoldMixupMixin`` and the checks of a fitted module."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any, TypeGuard

import torch
from torch import Tensor

from lightning_manifold_mixup._lightning import (
    MODULE_BASES,
    MisconfigurationException,
    is_param_in_hook_signature,
    overrides,
    pl,
    rank_zero_warn,
)
from lightning_manifold_mixup.losses import Criterion, Target, class_axis, mixup_loss
from lightning_manifold_mixup.targets import MAPS, MixedTarget, check_labels, kind_of


def dominant_class(target: Target) -> Tensor:
    """Class indices ``(B,)`` from labels, soft targets ``(B, C)`` or a :class:`MixedTarget`.

    For a mixed target this is the class with the larger weight, which is what a train
    accuracy on mixed batches can be measured against: ``(logits.argmax(1) ==
    dominant_class(y)).float().mean()``. Binary float labels ``(B,)`` or ``(B, 1)`` give 1 where
    the label is at least 0.5 (int64, same shape); class maps give maps.

    Example:
        >>> dominant_class(torch.tensor([[0.3, 0.7], [0.9, 0.1]]))
        tensor([1, 0])
    """
    if isinstance(target, MixedTarget):
        return torch.where(_rows(target.lam, target.y_a) >= 0.5, target.y_a, target.y_b)
    if _is_binary(target):
        return (target >= 0.5).long()  # the side weighing more
    if target.is_floating_point():
        return target.argmax(dim=-1)
    return target


def mixed_accuracy(logits: Tensor, target: Target, class_axis: int = -1) -> Tensor:
    """Per-row credit ``(B,)``: the target's weight on the predicted class.

    For a mix of ``y_a`` and ``y_b`` this is ``lam * [pred == y_a] + (1 - lam) * [pred == y_b]``,
    accuracy against both labels weighted by lam; for class indices it is plain accuracy. For
    class maps ``(B, d1, ...)`` (``class_axis`` of the logits given) the credit is per entry.

    Binary float labels ``(B,)`` or ``(B, 1)`` with one logit per row: the class predicted is
    ``logit > 0``, credited ``y`` when 1 and ``1 - y`` when 0.

    Example:
        >>> mixed_accuracy(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.7, 0.3]] * 2))
        tensor([0.7000, 0.3000])
    """
    if _is_binary(target):
        side = predicted_class(logits, target).float()
        return (side * target + (1 - side) * (1 - target)).reshape(-1).float()
    pred = logits.argmax(dim=class_axis)
    if isinstance(target, MixedTarget):
        lam = _rows(target.lam, pred).float()
        return lam * (pred == target.y_a).float() + (1 - lam) * (pred == target.y_b).float()
    if target.is_floating_point():
        return target.gather(-1, pred.unsqueeze(-1)).squeeze(-1).float()
    return (pred == target).float()


def _is_binary(target: Target) -> TypeGuard[Tensor]:
    """Float binary labels ``(B,)`` or ``(B, 1)`` (for one logit per row)."""
    return (
        isinstance(target, Tensor)
        and target.is_floating_point()
        and (target.ndim == 1 or target.shape[-1] == 1)
    )


def predicted_class(logits: Tensor, target: Target, class_axis: int = -1) -> Tensor:
    """The class ``logits`` predict, in the form of ``dominant_class(target)``: ``logit > 0``
    as int64 of the target's shape for binary labels, else the argmax over ``class_axis``."""
    if _is_binary(target) and logits.numel() == target.numel():
        return (logits > 0).long().reshape(target.shape)
    return logits.argmax(dim=class_axis)


def _check_maps(logits: Tensor, target: Target, ignore_index: int, axis: int | None) -> None:
    """Check class maps' labels against the logits' classes (other targets need no check)."""
    if kind_of(target) is not MAPS:
        return
    maps = target.y_a if isinstance(target, MixedTarget) else target
    num_classes = logits.shape[class_axis(logits, tuple(maps.shape), axis)]
    for labels in (target.y_a, target.y_b) if isinstance(target, MixedTarget) else (maps,):
        check_labels(labels, num_classes, ignore_index)


def _rows(lam: Tensor, like: Tensor) -> Tensor:
    """lam ``()`` or ``(B,)`` broadcast over ``like`` ``(B, d1, ...)``."""
    lam = lam.expand(like.shape[0])
    return lam.view(-1, *([1] * (like.ndim - 1)))


def find_num_classes(module: object) -> int | None:
    """``module.num_classes``, else ``module.hparams["num_classes"]``, else
    ``hparams["num_labels"]`` (Hugging Face's name), else the ``config.num_labels`` of a
    Hugging Face classifier inside the module (a ``*For...Classification`` model: other models'
    configs default num_labels to 2 whatever the task), else None."""
    hparams = getattr(module, "hparams", None)
    hparams = hparams if isinstance(hparams, Mapping) else {}
    candidates = [getattr(module, "num_classes", None), *map(hparams.get, _CLASS_KEYS)]
    if isinstance(module, torch.nn.Module):
        candidates += [
            getattr(m.config, "num_labels", None) for m in module.modules() if _is_hf_classifier(m)
        ]
    for value in candidates:
        if value is not None:
            return value if isinstance(value, int) and not isinstance(value, bool) else None
    return None


_CLASS_KEYS = ("num_classes", "num_labels")


def _is_hf_classifier(module: torch.nn.Module) -> bool:
    name = type(module).__name__
    return hasattr(getattr(module, "config", None), "num_labels") and (
        "For" in name and name.endswith("Classification")
    )


def missing_classes_hint(module: object) -> str:
    """Where num_classes can be given for ``module``, for the error when none was found: no
    advice to call ``save_hyperparameters()`` when the module already has saved ones."""
    hparams = getattr(module, "hparams", None)
    if isinstance(hparams, Mapping) and hparams:
        return (
            "pass ManifoldMixupCallback(num_classes=...), set self.num_classes on the "
            f"LightningModule, or add num_classes (or num_labels) to its saved hyperparameters "
            f"(self.hparams has {sorted(map(str, hparams))})"
        )
    return (
        "pass ManifoldMixupCallback(num_classes=...), set self.num_classes on the "
        "LightningModule, or save it with self.save_hyperparameters()"
    )


class ManifoldMixupMixin:
    """Mix into a LightningModule (before ``LightningModule`` in the bases) for Manifold Mixup.

    Supplies :meth:`mixup_loss`, a default :meth:`training_step` for ``(x, y)`` batches, and
    turns tuple batches into lists during training so ``ManifoldMixupCallback`` can rewrite
    them in place.

    Class attributes (override in the subclass or set in ``__init__``):
        mixup_criterion: ``"ce"`` (cross-entropy), ``"bce"`` (BCE on softmax, as the
            paper's reference code) or ``"bce_with_logits"`` (multi-label float targets).
        mixup_label_smoothing: label smoothing in ``[0, 1)``.
        mixup_ignore_index: label that class maps (segmentation masks, token labels) leave
            out of the loss; ``-100`` as torch's cross-entropy.
        mixup_class_axis: ``None`` finds the class axis of class-map logits from the shapes;
            ``1`` (``(B, C, ...)``) or ``-1`` (``(B, ..., C)``) for shapes that fit both.

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
    mixup_ignore_index: int = -100
    mixup_class_axis: int | None = None

    def mixup_loss(self, logits: Tensor, target: Target) -> Tensor:
        """Loss for mixed (soft or pair) and unmixed (class index) targets, in float32.

        Args:
            logits: ``(B, C)`` in any floating dtype; ``(B, C, d1, ...)`` or
                ``(B, d1, ..., C)`` for class maps.
            target: int64 ``(B,)``, float ``(B, C)``, int64 class maps ``(B, d1, ...)`` or a
                :class:`MixedTarget` of labels or maps.

        Returns:
            A float32 scalar, computed with autocast disabled. The first class maps of a fit
            are checked to lie in ``[0, C)`` or equal ``mixup_ignore_index`` (one host read),
            so bad labels fail before any optimizer step.
        """
        if not getattr(self, "_mixup_maps_checked", False):
            _check_maps(logits, target, self.mixup_ignore_index, self.mixup_class_axis)
            self._mixup_maps_checked = True
        return mixup_loss(
            logits,
            target,
            criterion=self.mixup_criterion,
            label_smoothing=self.mixup_label_smoothing,
            ignore_index=self.mixup_ignore_index,
            class_axis=self.mixup_class_axis,
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
        """Default step for classification batches: ``mixup_loss`` of ``self(x)`` and ``y``.

        ``x`` and ``y`` are read at the callback's ``input_key`` and ``target_key`` (0 and 1
        without the callback). Logging costs no host-device synchronisation per step: see
        :meth:`log_train_metrics`. With ``Trainer(barebones=True)`` nothing is logged.
        """
        input_key, target_key = self.mixup_batch_keys()
        try:
            x, y = batch[input_key], batch[target_key]
        except TypeError:
            if not is_dataclass_batch(batch):
                raise
            x, y = getattr(batch, input_key), getattr(batch, target_key)
        logits = self(x)  # type: ignore[operator]
        loss = self.mixup_loss(logits, y)
        self.log_train_metrics(loss, logits, y)
        return loss

    def mixup_batch_keys(self) -> tuple[Any, Any]:
        """``(input_key, target_key)`` of the fit's ``ManifoldMixupCallback``, else ``(0, 1)``."""
        return _batch_keys(self)

    @torch.compiler.disable
    def log_train_metrics(self, loss: Tensor, logits: Tensor, target: Target) -> None:
        """Train metrics the Lightning way, without a per-step host read.

        Runs eagerly under ``torch.compile`` (its step counters and logging-step test would
        otherwise be guards of the compiled step, recompiling it at every step).

        Every step adds the loss to a device-side epoch sum (one in-place add). On Lightning's
        logging steps (``log_every_n_steps``) it logs that batch's ``train_loss_step`` and
        ``train_acc_step`` (progress bar) and ``train_mixed_acc_step``: accuracy against the
        dominant class of the mixed target and against both labels weighted by lam. At the end
        of each training epoch :meth:`on_train_epoch_end` logs ``train_loss_epoch``, the mean
        over the epoch's rows, reduced across processes.
        """
        rows = logits.shape[0]
        sums = getattr(self, "_train_loss_sum", None)
        if sums is None or sums.device != loss.device:
            sums = self._train_loss_sum = torch.zeros((), device=loss.device)
            self._train_rows = 0
        sums.add_(loss.detach().float(), alpha=rows)
        self._train_rows += rows
        trainer = getattr(self, "_trainer", None)
        if trainer is None or trainer.barebones or not trainer._logger_connector.should_update_logs:
            return
        detached = logits.detach()
        dominant = dominant_class(target)
        axis, valid = -1, None
        if kind_of(target) is MAPS:  # class maps: per entry
            maps = target.y_a if isinstance(target, MixedTarget) else target
            axis = class_axis(detached, tuple(maps.shape), self.mixup_class_axis)
            valid = (dominant != self.mixup_ignore_index).float()
        hits = (predicted_class(detached, target, axis) == dominant).float()
        credit = mixed_accuracy(detached, target, axis).float()
        if valid is None:
            accuracy, mixed = hits.mean(), credit.mean()
        else:
            count = valid.sum().clamp(min=1.0)
            accuracy, mixed = (hits * valid).sum() / count, (credit * valid).sum() / count
        values = torch.stack([loss.detach().float(), accuracy, mixed])
        # One device-to-host copy on logging steps: Lightning re-reads progress-bar values at
        # every later step, which must then be host tensors, not device ones.
        loss_v, acc_v, mixed_v = values.to("cpu", copy=True).unbind()
        log_dict = self.log_dict  # type: ignore[attr-defined]
        log_dict(
            {"train_loss_step": loss_v, "train_acc_step": acc_v},
            on_step=True,
            on_epoch=False,
            prog_bar=True,
            batch_size=rows,
        )
        log_dict({"train_mixed_acc_step": mixed_v}, on_step=True, on_epoch=False, batch_size=rows)

    def on_train_epoch_end(self) -> None:
        """Log ``train_loss_epoch``; subclasses that override this hook call ``super()``."""
        super().on_train_epoch_end()  # type: ignore[misc]
        rows = getattr(self, "_train_rows", 0)
        if rows and not self.trainer.barebones:  # type: ignore[attr-defined]
            mean = self._train_loss_sum / rows
            self.log("train_loss_epoch", mean, prog_bar=True, sync_dist=True)  # type: ignore[attr-defined]
            self._train_loss_sum.zero_()
            self._train_rows = 0

    def setup(self, stage: str) -> None:
        super().setup(stage)  # type: ignore[misc]
        check_loss_attributes(self)
        self._mixup_maps_checked = False  # each fit checks its first class maps
        # Lightning warns whenever a module overrides on_after_batch_transfer and a datamodule
        # is used; here the module's hook is the intended one (it only turns tuples into lists).
        warnings.filterwarnings(
            "ignore", message=r".*overridden `on_after_batch_transfer` in `LightningModule` but"
        )


def is_dataclass_batch(batch: Any) -> bool:
    """A dataclass instance as the batch: its fields are read and written by name."""
    return dataclasses.is_dataclass(batch) and not isinstance(batch, type)


def _batch_keys(module: object) -> tuple[Any, Any]:
    """``(input_key, target_key)`` of the fit's ``ManifoldMixupCallback``, else ``(0, 1)``."""
    trainer = getattr(module, "_trainer", None)
    for callback in getattr(trainer, "callbacks", ()):
        keys = getattr(callback, "mixup_batch_keys", None)
        if keys is not None:
            return keys
    return 0, 1


NO_MIXIN = (
    "ManifoldMixupCallback: {name} does not use ManifoldMixupMixin, so training_step receives "
    "the targets as the callback writes them, on every training batch (unmixed ones with "
    "lam 1): {arrive}. Make sure its loss accepts them (F.cross_entropy takes soft targets, "
    "F.nll_loss does not), or subclass ManifoldMixupMixin and use mixup_loss. Training "
    "metrics (torchmetrics Accuracy, argmax == y) need class indices: compare with "
    "lightning_manifold_mixup.dominant_class(y), e.g. "
    "self.train_acc(logits, dominant_class(y))."
)

ARRIVE = {
    "soft": "integer class labels (B,) arrive as float32 (B, num_classes) soft targets, "
    "integer class maps (B, d1, ...) as MixedTarget pairs, and float targets (binary, "
    "one-hot, multi-label, regression) keep their shape and dtype, blended",
    "pair": "integer class labels (B,) and class maps (B, d1, ...) arrive as MixedTarget "
    "pairs (y_a, y_b, lam), and float targets (binary, one-hot, multi-label, regression) "
    "keep their shape and dtype, blended",
}


def builds_layers_later(pl_module: pl.LightningModule) -> bool:
    """Whether the module defines configure_model or a setup of its own (beyond the mixin's),
    where layers may be created after the callback's setup hook."""
    setup = type(pl_module).setup
    own_setup = setup not in (*(b.setup for b in MODULE_BASES), ManifoldMixupMixin.setup)
    return own_setup or overrides(pl_module, "configure_model")


def check_training_step(pl_module: pl.LightningModule) -> None:
    """The callback sees each training batch only if ``training_step`` takes one."""
    if is_param_in_hook_signature(pl_module.training_step, "dataloader_iter", explicit=True):
        raise MisconfigurationException(
            "ManifoldMixupCallback needs to see each training batch, but training_step "
            "takes a dataloader_iter (Lightning passes no batch to callbacks then). Use "
            "training_step(self, batch, batch_idx)."
        )


def check_loss_attributes(module: object) -> None:
    """The mixin's loss attributes, checked before training starts."""
    criterion = getattr(module, "mixup_criterion", "ce")
    smoothing = getattr(module, "mixup_label_smoothing", 0.0)
    ignore = getattr(module, "mixup_ignore_index", -100)
    axis = getattr(module, "mixup_class_axis", None)
    problems = []
    if criterion not in ("ce", "bce", "bce_with_logits"):
        problems.append(
            f"mixup_criterion must be 'ce', 'bce' or 'bce_with_logits', got {criterion!r}"
        )
    if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)):
        problems.append(f"mixup_label_smoothing must be a number in [0, 1), got {smoothing!r}")
    elif not 0.0 <= smoothing < 1.0:
        problems.append(f"mixup_label_smoothing must be in [0, 1), got {smoothing!r}")
    if isinstance(ignore, bool) or not isinstance(ignore, int):
        problems.append(f"mixup_ignore_index must be an int (e.g. -100 or 255), got {ignore!r}")
    if axis not in (None, 1, -1):
        problems.append(f"mixup_class_axis must be None, 1 or -1, got {axis!r}")
    if problems:
        raise ValueError(
            f"{type(module).__name__}: " + "; ".join(problems) + ". Set these class "
            "attributes of the LightningModule (or assign them in __init__)."
        )


# torch.compile of the mixing hooks fails in dynamo on torch 2.4.1 and 2.6.0 and works from
# 2.7.1 on (docs/scale.md).
COMPILE_MIN_TORCH = (2, 7)
TORCH_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])


def check_compile(pl_module: torch.nn.Module) -> None:
    """A compiled module (``trainer.fit(torch.compile(model))``, ``torch.compile(submodule)``,
    ``m.compile()``) needs a torch whose dynamo traces the mixing hooks."""
    compiled = getattr(pl_module, "_compiler_ctx", None) is not None or any(
        isinstance(getattr(m, "_orig_mod", None), torch.nn.Module)
        or getattr(m, "_compiled_call_impl", None) is not None
        for m in pl_module.modules()
    )
    if compiled and TORCH_VERSION < COMPILE_MIN_TORCH:
        raise MisconfigurationException(
            f"ManifoldMixupCallback: torch.compile with the mixing hooks needs torch >= "
            f"{'.'.join(map(str, COMPILE_MIN_TORCH))} (dynamo fails on them before), but torch "
            f"{torch.__version__} is installed. Upgrade torch, or fit the module uncompiled."
        )


def check_module(pl_module: torch.nn.Module, targets: str = "soft") -> None:
    """At fit start: a compiled module needs a recent torch; a module without the mixin is
    warned what its loss and metrics receive (``targets``: the callback's target mode)."""
    check_compile(pl_module)
    if not isinstance(pl_module, ManifoldMixupMixin):
        rank_zero_warn(NO_MIXIN.format(name=type(pl_module).__name__, arrive=ARRIVE[targets]))
