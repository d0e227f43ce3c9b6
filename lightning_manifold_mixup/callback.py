"""``ManifoldMixupCallback``: the Lightning shell around :mod:`lightning_manifold_mixup.mixing`."""

from __future__ import annotations

import functools
import math
import os
import secrets
from collections.abc import Mapping, MutableMapping, MutableSequence, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_manifold_mixup.hf import MaskUnion, check_input_mixable, guard_hf_labels
from lightning_manifold_mixup.layers import INPUT, candidate_layers, named_layers, resolve_layers
from lightning_manifold_mixup.mixin import ManifoldMixupMixin, find_num_classes
from lightning_manifold_mixup.mixing import (
    LamMode,
    MixDecision,
    MixedTarget,
    cutmix_box,
    cutmix_lam,
    cutmix_tensor,
    map_batch,
    mix_batch,
    mix_targets,
    mix_targets_with_partner,
    mix_with_partner,
    sample_decision,
)
from lightning_manifold_mixup.record import MixRecord, step_completes
from lightning_manifold_mixup.stream import KeyedStream

TargetMode = Literal["soft", "pair"]
LamTransform = Literal["none", "max"]
AlphaSchedule = Literal["constant", "linear", "cosine"]
Pairing = Literal["local", "global"]
_STATE_VERSION = 1
# Second word of the shared stream's seed for pairing="global": no rank reaches it, so the
# shared stream never coincides with a rank's own stream [seed, rank, step].
_SHARED_STREAM = 2**32 - 1


class ManifoldMixupCallback(pl.Callback):
    """Manifold Mixup (Verma et al., ICML 2019) as a Lightning callback.

    For every training batch of ``Trainer.fit`` it draws a layer ``k`` uniformly from the
    eligible set, ``lam ~ Beta(alpha, alpha)`` and a permutation ``index`` of the local batch;
    the output ``h`` of layer ``k`` is replaced by ``lam * h + (1 - lam) * h[index]`` and the
    batch's targets are rewritten in place the same way (integer labels become float32 soft
    targets of shape ``(B, num_classes)``). Validation, test, predict and the sanity check are
    never mixed, and every hook is removed when fit ends, normally or not.

    Args:
        layers: submodule names as ``named_modules()`` spells them (wrapper segments removed),
            glob patterns such as ``"net.layer*"``, and ``"input"`` for input mixup. ``None``
            selects block/stage outputs automatically (see :meth:`candidate_layers`).
        alpha: Beta(alpha, alpha) concentration, > 0. The paper uses 2.0 for manifold mixup
            and 1.0 for input mixup on CIFAR.
        probability: chance in [0, 1] that a batch is mixed at all.
        lam_mode: ``"batch"`` (one lam per batch, as the paper) or ``"sample"`` (one per row).
        num_classes: classes for integer targets; defaults to ``pl_module.num_classes`` or
            ``pl_module.hparams.num_classes``.
        input_key: where the input sits in the batch (int for sequences, str for dicts).
        target_key: where the target sits in the batch.
        seed: seed of the mixing stream; ``None`` uses Lightning's global seed
            (``seed_everything``) or else a random seed, taken from rank 0 when there are
            several processes.
        log: log ``mixup/lam`` and ``mixup/layer`` (the position in the eligible set) each step.
        targets: ``"soft"`` rewrites integer labels to ``(B, C)`` soft targets; ``"pair"``
            to a :class:`~lightning_manifold_mixup.mixing.MixedTarget` ``(y_a, y_b, lam)``,
            which :meth:`ManifoldMixupMixin.mixup_loss` consumes without a ``(B, C)`` matrix.
        layer_weights: sampling weights, one per resolved eligible layer (normalized); None
            for the uniform choice of the paper.
        lam_transform: ``"max"`` replaces lam by ``max(lam, 1 - lam)`` so the first sample
            dominates.
        fixed_lam: use this lam for every mixed batch (ablations); None draws from Beta.
        alpha_schedule: ``"constant"``, or ``"linear"``/``"cosine"`` decay of alpha to 0 over
            the run's optimizer steps (``trainer.estimated_stepping_batches``).
        warmup_steps: ramp alpha linearly from 0 over the first optimizer steps.
        stop_epoch: from this epoch on no batch is mixed (mixing off at the end of training).
        cutmix_prob: chance that a mixed batch pastes a box from the partner sample instead of
            blending (CutMix on the input, PatchUp-style on hidden ``(B, C, H, W)`` states); lam
            is then the kept area fraction, and the targets use that lam.
        pairing: ``"local"`` pairs each sample with one of its own rank's batch (each
            data-parallel replica draws its own layer, lam and permutation; the processes of
            one tensor-parallel group read the same batch and draw the same). ``"global"``
            pairs it with a sample of the global batch (every rank's batch, concatenated in
            rank order), for tiny per-device batches: all ranks draw one shared layer, lam and
            permutation of the ``world_size * B`` rows; the hidden states are all-gathered
            with autograd, so gradients flow back to the rank that owns the partner row, and
            inputs and targets are all-gathered too. It costs collectives every training
            batch, needs the same batch size on every rank (``drop_last=True``) and cannot be
            combined with CutMix. ``MixDecision.index`` then holds global row indices. With
            one data-parallel replica it behaves as ``"local"`` (with a warning); with tensor
            parallelism it is refused.
        attention_mask_key: the key of a ``(B, L)`` attention mask in a dict batch or in a
            dict input (``batch[input_key]``); rows of a mixed batch get the union of their
            own and their partner's mask, so the partner's tokens beyond the row's length stay
            visible to later layers (see ``docs/transformers.md``). Ignored when there is no
            such key; None keeps every row's own mask.

    Example:
        >>> cb = ManifoldMixupCallback(layers=["input", "net.layer1"], alpha=2.0)
        >>> cb.current is None
        True
    """

    def __init__(
        self,
        *,
        layers: Sequence[str] | None = None,
        alpha: float = 2.0,
        probability: float = 1.0,
        lam_mode: LamMode = "batch",
        num_classes: int | None = None,
        input_key: int | str = 0,
        target_key: int | str = 1,
        seed: int | None = None,
        log: bool = True,
        targets: TargetMode = "soft",
        layer_weights: Sequence[float] | None = None,
        lam_transform: LamTransform = "none",
        fixed_lam: float | None = None,
        alpha_schedule: AlphaSchedule = "constant",
        warmup_steps: int = 0,
        stop_epoch: int | None = None,
        cutmix_prob: float = 0.0,
        pairing: Pairing = "local",
        attention_mask_key: str | None = "attention_mask",
    ) -> None:
        super().__init__()
        problems: list[str] = []
        if isinstance(layers, str):
            problems.append(f"layers must be a list of names, not the string {layers!r}")
        elif layers is not None and len(layers) == 0:
            problems.append("layers is empty: give at least one name, or None for automatic")
        _check_number(
            problems, "alpha", alpha, "a number > 0 (Beta(alpha, alpha))", lo=0.0, lo_open=True
        )
        _check_number(problems, "probability", probability, "in [0, 1]", lo=0.0, hi=1.0)
        _check_choice(problems, "lam_mode", lam_mode, ("batch", "sample"))
        if num_classes is not None:
            _check_number(
                problems, "num_classes", num_classes, "an integer >= 2", lo=2, integer=True
            )
        if seed is not None:
            _check_number(
                problems, "seed", seed, "a non-negative integer or None", lo=0, integer=True
            )
        _check_choice(problems, "targets", targets, ("soft", "pair"))
        for key_name, key in (("input_key", input_key), ("target_key", target_key)):
            if not isinstance(key, (int, str)) or isinstance(key, bool):
                problems.append(f"{key_name} must be an int or a str, got {key!r}")
        if input_key == target_key:
            problems.append(f"input_key and target_key are both {input_key!r}")
        if layer_weights is not None and (
            isinstance(layer_weights, str)
            or len(layer_weights) == 0
            or not all(_is_number(w) and math.isfinite(w) and w >= 0 for w in layer_weights)
            or sum(layer_weights) <= 0
        ):
            problems.append(
                "layer_weights must be finite non-negative numbers with a positive sum, got "
                f"{layer_weights!r}"
            )
        _check_choice(problems, "lam_transform", lam_transform, ("none", "max"))
        if fixed_lam is not None:
            _check_number(problems, "fixed_lam", fixed_lam, "in [0, 1] or None", lo=0.0, hi=1.0)
        _check_choice(problems, "alpha_schedule", alpha_schedule, ("constant", "linear", "cosine"))
        _check_number(problems, "warmup_steps", warmup_steps, "an integer >= 0", lo=0, integer=True)
        if stop_epoch is not None:
            _check_number(
                problems, "stop_epoch", stop_epoch, "an integer >= 0 or None", lo=0, integer=True
            )
        if _check_number(problems, "cutmix_prob", cutmix_prob, "in [0, 1]", lo=0.0, hi=1.0):
            if cutmix_prob > 0 and lam_mode == "sample":
                problems.append("cutmix_prob > 0 needs lam_mode='batch' (one box per batch)")
            if cutmix_prob > 0 and pairing == "global":
                problems.append(
                    "pairing='global' does not support CutMix: set cutmix_prob=0 or pairing='local'"
                )
        _check_choice(problems, "pairing", pairing, ("local", "global"))
        if attention_mask_key is not None and not isinstance(attention_mask_key, str):
            problems.append(f"attention_mask_key must be a str or None, got {attention_mask_key!r}")
        if problems:
            raise MisconfigurationException("ManifoldMixupCallback: " + "; ".join(problems))

        self.layers = None if layers is None else list(layers)
        self.alpha = float(alpha)
        self.probability = float(probability)
        self.lam_mode: LamMode = lam_mode
        self.num_classes = None if num_classes is None else int(num_classes)
        self.input_key = input_key
        self.target_key = target_key
        self.seed = None if seed is None else int(seed)
        # Lightning assigns `callback.log = pl_module.log` at fit start, so the flag lives here.
        self.log_mixing = log
        self.targets: TargetMode = targets
        self.layer_weights = None if layer_weights is None else [float(w) for w in layer_weights]
        self.lam_transform: LamTransform = lam_transform
        self.fixed_lam = None if fixed_lam is None else float(fixed_lam)
        self.alpha_schedule: AlphaSchedule = alpha_schedule
        self.warmup_steps = int(warmup_steps)
        self.stop_epoch = None if stop_epoch is None else int(stop_epoch)
        self.cutmix_prob = float(cutmix_prob)
        self.pairing: Pairing = pairing
        self.attention_mask_key = attention_mask_key
        self._masks = MaskUnion(attention_mask_key)
        self.summary: dict[str, Any] = {}

        self.current: MixDecision | None = None
        self.eligible: list[str] = []
        self._step = 0
        self._resolved_seed: int | None = None
        self._restored = False
        self._resolved_classes: int | None = None
        self._handles: list[RemovableHandle] = []
        self._calls = 0
        # Forwards are mixed only inside training_step (the window) and during backward
        # (activation checkpointing recomputing them); runs in backward are not counted.
        self._in_step = False
        self._in_backward = False
        # A batch has started and not ended: a checkpoint written now (on an exception)
        # resumes by replaying it, so its draw is not yet consumed.
        self._in_flight = False
        self._automatic = True
        # Runs per eligible layer in the first training step of a fit, when all are checked.
        self._probe: dict[str, int] | None = None
        self._record = MixRecord([])
        self._unwrap_step: Any = None
        self._stream: KeyedStream | None = None
        self._weights: np.ndarray | None = None
        self._target: Any = None
        self._original_target: Any = None
        self._box_lam = 1.0
        # (layer position, lam) of the batch in flight, counted and logged at its end.
        self._pending_record: tuple[int, float] | None = None
        self._batch_size = 0
        self._checked_labels = False
        self._warned_repeat: set[str] = set()
        # Whether this fit pairs across ranks (pairing="global" and more than one process).
        self._global = False
        # This process's data shard: (replica index, number of replicas). Processes that read
        # the same batch (tensor parallelism) share one stream so they mix it the same way.
        self._replica = (0, 1)

    @property
    def mixup_batch_keys(self) -> tuple[int | str, int | str]:
        """``(input_key, target_key)``: where the mixin's default ``training_step`` reads."""
        return self.input_key, self.target_key

    # ------------------------------------------------------------------ helpers for users
    @staticmethod
    def candidate_layers(model: nn.Module) -> list[str]:
        """The layers ``layers=None`` would select for ``model`` (normalized names)."""
        return candidate_layers(model)

    # ------------------------------------------------------------------ fit lifecycle
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if is_param_in_hook_signature(pl_module.training_step, "dataloader_iter", explicit=True):
            raise MisconfigurationException(
                "ManifoldMixupCallback needs to see each training batch, but training_step "
                "takes a dataloader_iter (Lightning passes no batch to callbacks then). Use "
                "training_step(self, batch, batch_idx)."
            )
        self._restored = False  # a state loaded by an earlier validate/test is not this fit's
        # Validate layer names before any training work (strategy setup, sanity check), unless
        # the module builds layers in its own setup or configure_model, which Lightning calls
        # after this hook; on_fit_start checks them then, still before the sanity check.
        if not _builds_layers_later(pl_module):
            resolve_layers(pl_module, self.layers)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        self.eligible = resolve_layers(pl_module, self.layers)
        self._resolved_classes = (
            self.num_classes if self.num_classes is not None else find_num_classes(pl_module)
        )
        if not self._restored and _fresh_run(trainer):
            # A new run (no checkpoint, no progress): start the stream from its beginning with
            # the seed as it stands now, also when this callback object served an earlier fit.
            self._step = 0
            self._resolved_seed = None
        if self._resolved_seed is None:
            self._resolved_seed = self._initial_seed(trainer)
        self._checked_labels = False
        self._warned_repeat = set()
        self._weights = self._layer_weight_array()
        self._replica = _data_parallel_replica(trainer)
        replica_count = self._replica[1]
        if self.pairing == "global" and 1 < replica_count != trainer.world_size:
            raise MisconfigurationException(
                f"pairing='global' gathers hidden states from every process, but this run's "
                f"{trainer.world_size} processes hold {replica_count} data-parallel replicas "
                "(the others split the model, e.g. tensor parallelism). Use pairing='local'."
            )
        self._global = self.pairing == "global" and replica_count > 1
        if self.pairing == "global" and not self._global:
            rank_zero_warn(
                "ManifoldMixupCallback: pairing='global' has no effect with one data-parallel "
                "replica (a single-process run); samples are paired within the batch as with "
                "pairing='local'."
            )
        if self._global and not (dist.is_available() and dist.is_initialized()):
            raise MisconfigurationException(
                "pairing='global' needs torch.distributed, but the "
                f"{type(trainer.strategy).__name__} strategy has not initialised it. Use a "
                "DDP-based strategy or pairing='local'."
            )
        if self.alpha_schedule != "constant" and not np.isfinite(
            trainer.estimated_stepping_batches
        ):
            raise MisconfigurationException(
                f"alpha_schedule={self.alpha_schedule!r} needs a finite run length: set "
                "max_epochs or max_steps on the Trainer, or use alpha_schedule='constant'"
            )
        self._record = MixRecord(self.eligible)
        self._automatic = bool(pl_module.automatic_optimization)
        self._probe = {name: 0 for name in self.eligible if name != INPUT}
        self._wrap_training_step(pl_module)
        for logger in trainer.loggers:
            logger.log_hyperparams({"mixup": self.hparams()})
        if not isinstance(pl_module, ManifoldMixupMixin):
            rank_zero_warn(
                f"ManifoldMixupCallback: {type(pl_module).__name__} does not use "
                "ManifoldMixupMixin, so training_step receives mixed targets as they are: "
                "integer class labels arrive as float (B, num_classes) soft targets (or "
                "MixedTarget pairs). Make sure its loss accepts them (F.cross_entropy does, "
                "F.nll_loss does not), or subclass ManifoldMixupMixin and use mixup_loss."
            )
        modules = named_layers(pl_module)
        for name in self.eligible:
            if name == INPUT:
                continue
            self._handles.append(modules[name].register_forward_hook(self._make_hook(name)))
        self._handles += guard_hf_labels(
            pl_module, lambda: (self._original_target, self._target), self.target_key
        )
        self._masks = MaskUnion(self.attention_mask_key)
        self._handles += self._masks.watch(
            modules, self.eligible, lambda: None if self.current is None else self.current.layer
        )
        rank_zero_info(
            f"ManifoldMixupCallback: mixing at {self.eligible} with alpha={self.alpha}, "
            f"probability={self.probability}, lam_mode={self.lam_mode!r}"
        )

    def hparams(self) -> dict[str, Any]:
        """Every argument and the resolved layers, for loggers and run records."""
        return {
            "layers": list(self.eligible) if self.eligible else self.layers,
            "alpha": self.alpha,
            "probability": self.probability,
            "lam_mode": self.lam_mode,
            "num_classes": self.num_classes,
            "input_key": self.input_key,
            "target_key": self.target_key,
            "seed": self._resolved_seed if self._resolved_seed is not None else self.seed,
            "log": self.log_mixing,
            "targets": self.targets,
            "layer_weights": self.layer_weights,
            "lam_transform": self.lam_transform,
            "fixed_lam": self.fixed_lam,
            "alpha_schedule": self.alpha_schedule,
            "warmup_steps": self.warmup_steps,
            "stop_epoch": self.stop_epoch,
            "cutmix_prob": self.cutmix_prob,
            "pairing": self.pairing,
            "attention_mask_key": self.attention_mask_key,
        }

    def alpha_at(self, trainer: pl.Trainer) -> float:
        """The alpha used for the current batch (schedule, warmup and stop_epoch applied)."""
        if self.stop_epoch is not None and trainer.current_epoch >= self.stop_epoch:
            return 0.0
        scale = 1.0
        if self.alpha_schedule != "constant":
            progress = _run_progress(trainer, batches_done=self._step)
            scale = 1.0 - progress
            if self.alpha_schedule == "cosine":
                scale = 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.warmup_steps:
            scale *= min(1.0, (trainer.global_step + 1) / self.warmup_steps)
        return self.alpha * scale

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._clear_decision()
        assert self._resolved_seed is not None
        if self._stream is None or self._stream.seed != self._resolved_seed:
            self._stream = KeyedStream(self._resolved_seed)
        # With global pairing one stream for every rank: they must agree on the layer (the
        # hook's collectives would otherwise wait for each other forever), lam and the global
        # permutation.
        stream = _SHARED_STREAM if self._global else self._replica[0]
        rng = self._stream.generator(stream, self._step)
        alpha = self.alpha_at(trainer)
        self._step += 1
        self._in_flight = True
        self._in_step = True  # until training_step returns (see _wrap_training_step)
        x = self._get(batch, self.input_key, "input_key")
        y = self._get(batch, self.target_key, "target_key")
        if not isinstance(y, Tensor):
            raise TypeError(
                f"ManifoldMixupCallback: the target at target_key={self.target_key!r} is a "
                f"{type(y).__name__}, not a tensor. With several training dataloaders each batch "
                "holds one batch per loader, which cannot be mixed as one; train on a single "
                "loader (or one dataset), or set target_key to where a (B,) / (B, C) target "
                "tensor sits."
            )
        batch_size = _batch_size(x)
        if y.ndim == 0 or y.shape[0] != batch_size:
            raise ValueError(
                f"input and target batch sizes differ: input has {batch_size} rows, target "
                f"has shape {tuple(y.shape)}. Check input_key={self.input_key!r} and "
                f"target_key={self.target_key!r}."
            )
        self._batch_size = batch_size
        self._original_target = y
        if self._probe is not None and INPUT in self.eligible:
            check_input_mixable(x, self.input_key)
            _check_input_mixable(x, batch_size, self.input_key)
        world = trainer.world_size if self._global else 1
        if self._global:
            _check_equal_batch_sizes(batch_size, y.device)
        draw = sample_decision(
            rng,
            batch_size=world * batch_size,
            num_layers=len(self.eligible),
            alpha=alpha,
            probability=self.probability,
            lam_mode=self.lam_mode,
            layer_weights=self._weights,
            cutmix_prob=self.cutmix_prob,
        )
        if draw is None:
            self._record.add_unmixed()
            return
        lam_np, perm = draw.lam, draw.perm
        if self._global:
            rows = slice(trainer.global_rank * batch_size, (trainer.global_rank + 1) * batch_size)
            perm = perm[rows]
            if lam_np.ndim:
                lam_np = lam_np[rows]
        if self.fixed_lam is not None:
            lam_np = np.full_like(lam_np, self.fixed_lam)
        if self.lam_transform == "max":
            lam_np = np.maximum(lam_np, 1.0 - lam_np)
        layer = self.eligible[draw.layer]
        box_center = draw.box_center if draw.cutmix else None
        # Batch lam before any area correction: the box size derives from it.
        self._box_lam = float(lam_np) if box_center is not None else 1.0
        if box_center is not None and layer == INPUT:
            if not isinstance(x, Tensor) or x.ndim < 3:
                raise ValueError(
                    f"CutMix on the input needs a (B, C, H, W) tensor, got {_describe(x)}; set "
                    "cutmix_prob=0 or remove 'input' from layers"
                )
            box = cutmix_box(x.shape[-2], x.shape[-1], self._box_lam, box_center)
            lam_np = np.asarray(cutmix_lam(x.shape[-2], x.shape[-1], box), dtype=np.float32)
        device = y.device
        lam = _to_device(np.asarray(lam_np, dtype=np.float32), device)
        index = _to_device(perm, device)
        decision = MixDecision(layer, draw.layer, lam, index, box_center)

        partner_y = _global_rows(y).index_select(0, index) if self._global else None
        new_target = self._mix_target(y, decision, partner_y)
        self._masks.apply(batch, x, layer, index, _global_rows if self._global else None)
        if layer == INPUT:
            if box_center is not None:
                mixed: Any = cutmix_tensor(x, index, box)
            else:
                if self._global:
                    mixed, count = map_batch(
                        x,
                        lambda t: mix_with_partner(
                            t,
                            _global_rows(t).index_select(0, index.to(t.device)),
                            lam,
                            overwrite_partner=True,
                        ),
                        batch_size,
                        where=f"the input at input_key={self.input_key!r}",
                    )
                else:
                    mixed, count = mix_batch(
                        x,
                        lam,
                        index,
                        batch_size,
                        where=f"the input at input_key={self.input_key!r}",
                    )
                if count == 0:
                    _check_input_mixable(x, batch_size, self.input_key)
            _set(batch, self.input_key, mixed, pl_module)
        _set(batch, self.target_key, new_target, pl_module)
        self._target = new_target
        self._calls = 0
        self._in_backward = False
        self.current = decision
        # Counted and logged when the batch ends: hidden-state CutMix fixes lam in the hook.
        self._pending_record = (draw.layer, float(lam_np.mean()))

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor
    ) -> None:
        if self._automatic:
            # Every forward of the step has run; with manual optimization more may follow
            # an earlier manual_backward, so the checks wait for the batch's end there.
            self._finish_probe()
            self._check_layer_ran()
        self._in_backward = True

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._in_backward = False

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._in_flight = False
        if self._pending_record is not None:
            self._record.add(*self._pending_record)
        if step_completes(trainer, pl_module):
            self._record.end_step(trainer, self.log_mixing)
        try:
            # outputs is empty when training_step returned None to skip the batch (its forward
            # may not have run); steps that ran backward were checked in on_before_backward.
            # With manual optimization training_step returns None by design.
            ran = outputs is not None and not (isinstance(outputs, Mapping) and not outputs)
            if ran or not self._automatic:
                self._finish_probe()
                self._check_layer_ran()
        finally:
            self._clear_decision()

    def _clear_decision(self) -> None:
        self.current = None
        self._pending_record = None
        self._target = self._original_target = None
        self._in_step = self._in_backward = False

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A batch can end without on_train_batch_end (the module's on_train_batch_start
        # returned -1 to stop the epoch): no later forward may be mixed with its decision.
        self._clear_decision()
        self._in_flight = False

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._clear_decision()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        self._clear_decision()
        self.summary = self._record.summary()
        rank_zero_info(f"ManifoldMixupCallback (rank 0) summary: {self.summary}")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._remove_hooks()

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        # A batch in flight (a checkpoint written on an exception) is replayed on resume.
        step = self._step - 1 if self._in_flight else self._step
        return {"version": _STATE_VERSION, "seed": self._resolved_seed, "step": step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        version = state_dict.get("version")
        if version != _STATE_VERSION or not {"seed", "step"} <= state_dict.keys():
            raise ValueError(
                f"ManifoldMixupCallback cannot read checkpoint state {state_dict!r}: expected "
                f"version {_STATE_VERSION} with 'seed' and 'step'. Resume with the package "
                "version that wrote the checkpoint, or start a new run."
            )
        seed = state_dict["seed"]
        self._resolved_seed = None if seed is None else int(seed)
        self._step = int(state_dict["step"])
        self._restored = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Runs after every restore path (FSDP and DeepSpeed restore after on_fit_start).
        if trainer.ckpt_path is not None and not self._restored:
            self._step = trainer.fit_loop.epoch_loop.batch_progress.total.ready
            rank_zero_warn(
                f"ManifoldMixupCallback: the checkpoint {trainer.ckpt_path} holds no mixup state "
                "(it was written without this callback). Mixing starts here with seed "
                f"{self._resolved_seed} at batch {self._step}; an uninterrupted run with the "
                "callback would have drawn differently before this point."
            )
        self._restored = False

    # ------------------------------------------------------------------ internals
    def _make_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if not (self._in_step or self._in_backward):
                return None  # a forward outside the training step (another hook, a probe)
            if self._probe is not None and not self._in_backward:
                self._probe_run(name, module, output)
            decision = self.current
            if decision is None or decision.layer != name:
                return None
            # Runs during backward are activation checkpointing recomputing the forward: they
            # get the same mix but are neither counted nor warned about.
            self._calls += not self._in_backward
            if self._calls == 2 and not self._in_backward:
                self._warn_repeated({name: 2})
            if decision.box_center is not None:
                return self._cutmix_hidden(name, output, decision)
            batch_size = decision.index.shape[0]
            if self._global:
                mixed, count = map_batch(
                    output,
                    lambda h: _mix_across_ranks(h, decision),
                    batch_size,
                    where=f"layer {name!r}",
                    module=module,
                )
            else:
                mixed, count = mix_batch(
                    output,
                    decision.lam,
                    decision.index,
                    batch_size,
                    where=f"layer {name!r}",
                    module=module,
                )
            if count == 0:
                raise ValueError(
                    f"layer {name!r} returned {_describe(output)}, which holds no floating "
                    f"tensor with batch dimension {batch_size} to mix. Choose a layer whose "
                    "output is a (B, ...) float tensor (or a tuple/dict holding one)."
                )
            return mixed

        return hook

    def _cutmix_hidden(self, name: str, output: Any, decision: MixDecision) -> Tensor:
        if not isinstance(output, Tensor) or output.ndim < 3:
            raise ValueError(
                f"CutMix at layer {name!r} needs a (B, C, H, W) tensor output, got "
                f"{_describe(output)}; set cutmix_prob=0 or choose spatial layers only"
            )
        assert decision.box_center is not None
        height, width = output.shape[-2], output.shape[-1]
        lam_wanted = self._box_lam  # the drawn lam, kept on the host
        box = cutmix_box(height, width, lam_wanted, decision.box_center)
        # The kept area fixes lam only now that H and W are known: correct the decision and
        # the targets in place (training_step holds these very tensors).
        kept = cutmix_lam(height, width, box)
        decision.lam.fill_(kept)
        self._correct_targets(decision)
        if self._pending_record is not None:
            self._pending_record = (self._pending_record[0], kept)
        return cutmix_tensor(output, decision.index, box)

    def _correct_targets(self, decision: MixDecision) -> None:
        target = self._target
        if isinstance(target, MixedTarget):
            target.lam.copy_(decision.lam)
        elif isinstance(target, Tensor):
            target.copy_(self._mix_target(self._original_target, decision))

    def _check_layer_ran(self) -> None:
        decision = self.current
        if decision is not None and decision.layer != INPUT and self._calls == 0:
            self.current = None
            raise RuntimeError(
                f"ManifoldMixupCallback: layer {decision.layer!r} was chosen but did not run "
                "during this training step, so the targets were mixed and the features were "
                "not. Remove it from layers, or make sure training_step calls it."
            )

    def _mix_target(self, y: Tensor, decision: MixDecision, partner: Tensor | None = None) -> Any:
        """Mixed targets; ``partner`` holds the partner rows for global pairing."""
        if partner is not None and y.is_floating_point():
            return mix_targets_with_partner(y, partner, decision.lam)
        if y.is_floating_point():
            return mix_targets(y, decision.lam, decision.index)
        if y.dtype == torch.bool or y.is_complex():
            raise TypeError(
                f"unsupported target dtype {y.dtype}: use int64 class labels or float targets"
            )
        if y.ndim != 1:
            raise ValueError(
                f"integer targets must be class labels of shape (B,), got shape "
                f"{tuple(y.shape)}. Multi-label targets must be float (B, C) tensors."
            )
        if y.dtype != torch.int64:  # uint8/int16/int32 labels: scatter and gather take int64
            y = y.long()
            partner = None if partner is None else partner.long()
        if self.targets == "pair":
            if partner is not None:
                return mix_targets_with_partner(y, partner, decision.lam, pair=True)
            return mix_targets(y, decision.lam, decision.index, pair=True)
        num_classes = self._resolved_classes
        if num_classes is None:
            raise ValueError(
                "integer class labels need num_classes to become soft targets: pass "
                "ManifoldMixupCallback(num_classes=...), set self.num_classes on the "
                "LightningModule, or save it with self.save_hyperparameters()"
            )
        # Partner labels come from other ranks, whose own check runs only after this one.
        labels = y if partner is None else torch.cat([y, partner])
        # Reading the labels on the host synchronises with an accelerator: check the first
        # mixed batch only. Later out-of-range labels fail in the CPU scatter (checked below)
        # or in the loss.
        if not self._checked_labels:
            self._checked_labels = True
            _check_label_range(labels, num_classes)
        try:
            if partner is not None:
                return mix_targets_with_partner(y, partner, decision.lam, num_classes=num_classes)
            return mix_targets(y, decision.lam, decision.index, num_classes=num_classes)
        except RuntimeError:
            _check_label_range(labels, num_classes)
            raise

    def _initial_seed(self, trainer: pl.Trainer) -> int:
        if self.seed is not None:
            return self.seed
        global_seed = os.environ.get("PL_GLOBAL_SEED")
        seed = int(global_seed) if global_seed is not None else secrets.randbits(31)
        if trainer.world_size > 1:
            # Rank 0's seed for every rank: a run seeded per rank (seed_everything(base + rank))
            # must still agree across ranks (global pairing and tensor-parallel groups draw
            # together), and a resumed run loads rank 0's state everywhere.
            seed = int(trainer.strategy.broadcast(seed, src=0))
        return seed

    def _get(self, batch: Any, key: int | str, what: str) -> Any:
        try:
            return batch[key]
        except (KeyError, IndexError, TypeError) as err:
            keys = list(batch.keys()) if isinstance(batch, Mapping) else None
            shape = f"keys {keys}" if keys is not None else f"a {type(batch).__name__}"
            if isinstance(batch, Sequence) and not isinstance(batch, str):
                shape += f" of length {len(batch)}"
            raise ValueError(
                f"ManifoldMixupCallback: no entry at {what}={key!r} in the training batch "
                f"({shape}). Set {what} to the position (int) or key (str) of the "
                f"{'input' if what == 'input_key' else 'target'}."
            ) from err

    def _layer_weight_array(self) -> np.ndarray | None:
        if self.layer_weights is None:
            return None
        if len(self.layer_weights) != len(self.eligible):
            raise MisconfigurationException(
                f"layer_weights has {len(self.layer_weights)} entries but the eligible set has "
                f"{len(self.eligible)}: {self.eligible}. Give one weight per layer, in this order."
            )
        weights = np.asarray(self.layer_weights, dtype=np.float64)
        return weights / weights.sum()

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._unwrap_step is not None:
            self._unwrap_step()
            self._unwrap_step = None
        self.current = None

    def _wrap_training_step(self, pl_module: pl.LightningModule) -> None:
        """Close the mixing window when ``training_step`` returns: later forwards (another
        callback's probe, ``on_before_optimizer_step``) see the unmixed model."""
        original = pl_module.training_step

        @functools.wraps(original)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            try:
                return original(*args, **kwargs)
            finally:
                self._in_step = False

        pl_module.__dict__["training_step"] = training_step

        def unwrap() -> None:
            if pl_module.__dict__.get("training_step") is training_step:
                del pl_module.__dict__["training_step"]

        self._unwrap_step = unwrap

    def _probe_run(self, name: str, module: nn.Module, output: Any) -> None:
        """First training step: count the layer's runs and check its output can be mixed."""
        assert self._probe is not None
        self._probe[name] += 1
        if self._probe[name] > 1:
            return
        where = f"layer {name!r}"
        if map_batch(output, _same, self._batch_size, where=where, module=module)[1] == 0:
            raise ValueError(
                f"ManifoldMixupCallback: layer {name!r} returned {_describe(output)}, which "
                f"holds no floating tensor with batch dimension {self._batch_size} to mix. "
                "Choose layers whose output is a (B, ...) float tensor (or a tuple/dict holding "
                "one)."
            )

    def _finish_probe(self) -> None:
        """After the first training step's forwards: every eligible layer ran, once."""
        probe, self._probe = self._probe, None
        if probe is None:
            return
        silent = [name for name, runs in probe.items() if runs == 0]
        if silent:
            raise RuntimeError(
                f"ManifoldMixupCallback: layers {silent} did not run during the first training "
                "step: mixing there would mix the targets and not the features. Remove them "
                "from layers, or make sure training_step calls them."
            )
        self._warn_repeated({name: runs for name, runs in probe.items() if runs > 1})

    def _warn_repeated(self, runs: dict[str, int]) -> None:
        """Warn once per layer that runs more than once in a training step."""
        fresh = {name: n for name, n in runs.items() if name not in self._warned_repeat}
        if not fresh:
            return
        self._warned_repeat.update(fresh)
        rank_zero_warn(
            f"ManifoldMixupCallback: layers run more than once per training step {fresh} "
            "(weight sharing, recurrence, or several forwards in one step). When one of them "
            "is chosen, every run gets the same mix; leave them out of layers if that is "
            "not intended."
        )


def _is_number(value: Any) -> bool:
    """A real number (Python or numpy scalar); booleans are not numbers here."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


def _check_number(
    problems: list[str],
    name: str,
    value: Any,
    expected: str,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    integer: bool = False,
) -> bool:
    """Append a problem unless ``value`` is a finite number (an integer if asked) in range."""
    kind_ok = _is_number(value) and (not integer or isinstance(value, (int, np.integer)))
    ok = kind_ok and math.isfinite(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value <= hi
    if not ok:
        problems.append(f"{name} must be {expected}, got {value!r}")
    return ok


def _check_choice(problems: list[str], name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        options = ", ".join(repr(c) for c in choices[:-1]) + f" or {choices[-1]!r}"
        problems.append(f"{name} must be {options}, got {value!r}")


def _run_progress(trainer: pl.Trainer, batches_done: int) -> float:
    """Fraction of the run done, in [0, 1]: optimizer steps against ``max_steps`` and
    batches against ``max_epochs`` (a batch may take several optimizer steps, as with two
    optimizers under manual optimization), whichever limit is nearer."""
    fractions = [0.0]
    max_steps = getattr(trainer, "max_steps", -1)
    if max_steps is not None and max_steps > 0:
        fractions.append(trainer.global_step / max_steps)
    fit_loop = getattr(trainer, "fit_loop", None)
    max_epochs = getattr(trainer, "max_epochs", None)
    per_epoch = getattr(trainer, "num_training_batches", math.inf)
    if fit_loop is None:  # a stand-in with only the estimate of the run's optimizer steps
        fractions.append(trainer.global_step / max(trainer.estimated_stepping_batches, 1))
    elif max_epochs is not None and max_epochs > 0 and math.isfinite(per_epoch):
        fractions.append(batches_done / max(max_epochs * per_epoch, 1))
    return min(max(fractions), 1.0)


def _to_device(array: np.ndarray, device: torch.device) -> Tensor:
    """A host array on ``device`` without a synchronising copy: through pinned memory on CUDA
    (the caching host allocator keeps the buffer until the copy has run)."""
    t = torch.from_numpy(array)
    if device.type == "cpu":
        return t
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def _same(t: Tensor) -> Tensor:
    return t


def _check_input_mixable(x: Any, batch_size: int, input_key: int | str) -> None:
    """Input mixup needs every batch-sized tensor of the input to be floating point."""
    _, floats = map_batch(x, _same, batch_size, where=f"the input at input_key={input_key!r}")
    if floats == 0:
        raise ValueError(
            "input mixup needs a floating-point input at "
            f"input_key={input_key!r}, got {_describe(x)}. Remove 'input' from "
            "layers for integer inputs (token ids) and mix a hidden layer instead."
        )


def _set(batch: Any, key: int | str, value: Any, pl_module: pl.LightningModule) -> None:
    """Write ``value`` into the batch in place (Lightning hands this object to training_step)."""
    if isinstance(batch, MutableMapping):
        batch[key] = value
        return
    if isinstance(batch, MutableSequence) and isinstance(key, int):
        batch[key] = value
        return
    kind = f"{type(batch).__name__} batch"
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        kind = f"namedtuple batch ({type(batch).__name__})"
        fix = "Return a list or dict from your collate_fn (the mixin converts only plain tuples)."
    elif isinstance(pl_module, ManifoldMixupMixin):
        fix = (
            "The mixin turns tuples into lists in on_after_batch_transfer, but Lightning calls "
            "a LightningDataModule's on_after_batch_transfer instead when it defines one: "
            "return a list there (list(batch)), or a list or dict from your collate_fn."
        )
    else:
        fix = (
            "Return lists or dicts from your collate_fn, or subclass ManifoldMixupMixin, which "
            "turns tuple batches into lists before the callback sees them."
        )
    raise TypeError(f"ManifoldMixupCallback cannot rewrite a {kind} in place. {fix}")


def _check_label_range(labels: Tensor, num_classes: int) -> None:
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got values in [{lo}, {hi}]. "
            "Fix num_classes or the dataset's labels."
        )


def _builds_layers_later(pl_module: pl.LightningModule) -> bool:
    """Whether the module defines configure_model or a setup of its own (beyond the mixin's),
    where layers may be created after the callback's setup hook."""
    setup = type(pl_module).setup
    own_setup = setup not in (pl.LightningModule.setup, ManifoldMixupMixin.setup)
    return own_setup or is_overridden("configure_model", pl_module)


def _fresh_run(trainer: pl.Trainer) -> bool:
    """No checkpoint to resume and no training progress on this Trainer yet."""
    if getattr(trainer, "ckpt_path", None) is not None:
        return False
    fit_loop = getattr(trainer, "fit_loop", None)
    if fit_loop is None:  # a Trainer stand-in (benchmarks, tests) with only the basics
        return getattr(trainer, "global_step", 0) == 0
    return int(fit_loop.epoch_loop.batch_progress.total.ready) == 0


def _data_parallel_replica(trainer: pl.Trainer) -> tuple[int, int]:
    """(index, count) of the data shard this process trains on.

    Lightning's distributed sampler arguments name it: the global rank under DDP and FSDP,
    the data-parallel rank under ModelParallelStrategy, where the processes of one
    tensor-parallel group read the same batch.
    """
    kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None)
    if isinstance(kwargs, dict) and {"rank", "num_replicas"} <= kwargs.keys():
        return int(kwargs["rank"]), int(kwargs["num_replicas"])
    return trainer.global_rank, trainer.world_size


def _global_rows(t: Tensor) -> Tensor:
    """Every rank's ``t`` concatenated in rank order, without autograd (inputs, targets)."""
    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return torch.cat(parts)


class _GatherRows(torch.autograd.Function):
    """Every rank's ``h`` concatenated in rank order, with gradients sent back to their ranks.

    The gradient of rank ``r``'s rows is the sum over ranks of the gradient each rank's loss
    puts on them; DDP's gradient average then equals the gradient of the mean loss over the
    global batch. Written here because recent torch releases deprecate
    ``torch.distributed.nn.functional.all_gather``: NCCL reduce-scatters the gradient, other
    backends (gloo has no reduce-scatter) all-reduce it and keep their own rows.
    """

    @staticmethod
    def forward(ctx: Any, h: Tensor) -> Tensor:
        return _global_rows(h)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        grad = grad.contiguous()
        rows = grad.shape[0] // world
        if dist.get_backend() == dist.Backend.NCCL:
            out = grad.new_empty((rows, *grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad)
            return out
        total = grad.clone()
        dist.all_reduce(total)
        return total[rank * rows : (rank + 1) * rows]


def _mix_across_ranks(h: Tensor, decision: MixDecision) -> Tensor:
    """``lam * h + (1 - lam) * global_h[index]`` for a hidden state, gradients to every rank."""
    global_h: Tensor = _GatherRows.apply(h) if h.requires_grad else _global_rows(h)
    partner = global_h.index_select(0, decision.index.to(h.device))
    return mix_with_partner(h, partner, decision.lam, overwrite_partner=True)


def _check_equal_batch_sizes(batch_size: int, device: torch.device) -> None:
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([batch_size], dtype=torch.int64, device=device))
    found = [int(s) for s in sizes]
    # Every rank sees the same sizes, so all of them raise together instead of one rank
    # waiting forever in the next collective.
    if len(set(found)) > 1:
        raise ValueError(
            f"pairing='global' needs the same batch size on every rank, got {found} (by rank). "
            "Pass drop_last=True to the training DataLoader (and use a sampler that gives every "
            "rank the same number of samples, as Lightning's DistributedSampler does), or use "
            "pairing='local'."
        )


def _batch_size(x: Any) -> int:
    if isinstance(x, Tensor):
        if x.ndim == 0:
            raise ValueError("the batch input is a 0-d tensor; it needs a batch dimension")
        return int(x.shape[0])
    if isinstance(x, Mapping):
        for value in x.values():
            return _batch_size(value)
    if isinstance(x, (list, tuple)) and x:
        return _batch_size(x[0])
    raise ValueError(f"cannot find the batch size of the input: got {_describe(x)}")


def _describe(obj: Any) -> str:
    if isinstance(obj, Tensor):
        return f"a {obj.dtype} tensor of shape {tuple(obj.shape)}"
    return f"a {type(obj).__name__}"
