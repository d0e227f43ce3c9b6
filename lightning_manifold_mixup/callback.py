"""``ManifoldMixupCallback``: Lightning's hooks wired to the parts that mix a batch.

The parts: :class:`~lightning_manifold_mixup.config.MixupConfig` (arguments),
:class:`~lightning_manifold_mixup.stream.DecisionStream` (seed, batch counter, checkpoints),
:mod:`~lightning_manifold_mixup.pairing` (local or global partners),
:func:`~lightning_manifold_mixup.mixing.sample_decision` (the draw),
:class:`~lightning_manifold_mixup.targets.TargetMixer`,
:class:`~lightning_manifold_mixup.hooks.HookSet` (forward hooks, the mixing window, checks),
:class:`~lightning_manifold_mixup.record.MixRecord` (counts and logging). See docs/design.md.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from torch import Tensor, nn

from lightning_manifold_mixup.batch import describe, input_and_target, set_entry
from lightning_manifold_mixup.config import (
    AlphaSchedule,
    LamTransform,
    MixupConfig,
    Pairing,
    TargetMode,
)
from lightning_manifold_mixup.hf import MaskUnion, check_input_mixable, guard_hf_labels
from lightning_manifold_mixup.hooks import HookSet
from lightning_manifold_mixup.layers import (
    INPUT,
    candidate_layers,
    named_layers,
    resolve_layers,
    uses_compile,
)
from lightning_manifold_mixup.mixin import ManifoldMixupMixin, find_num_classes
from lightning_manifold_mixup.mixing import (
    Draw,
    LamMode,
    MixDecision,
    cutmix_box,
    cutmix_lam,
    cutmix_tensor,
    host_to_device,
    is_batch_major,
    map_batch,
    sample_decision,
)
from lightning_manifold_mixup.pairing import LocalPairing, make_pairing
from lightning_manifold_mixup.record import MixRecord, step_completes
from lightning_manifold_mixup.stream import DecisionStream
from lightning_manifold_mixup.targets import TargetMixer


class _ArgumentAttributes:
    """The arguments read and set as attributes (``cb.alpha``, ``cb.seed = 3``) through the
    validated config; a new value takes effect at the next fit. Not ``log``: Lightning assigns
    ``callback.log = pl_module.log`` at fit start."""

    config: MixupConfig

    def __getattr__(self, name: str) -> Any:
        config = self.__dict__.get("config")
        if config is not None and name in MixupConfig.__dataclass_fields__ and name != "log":
            return getattr(config, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        config = self.__dict__.get("config")
        if config is not None and name in MixupConfig.__dataclass_fields__ and name != "log":
            self.config = config.replace(**{name: value})
            return
        super().__setattr__(name, value)


class ManifoldMixupCallback(_ArgumentAttributes, pl.Callback):
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
        arguments = dict(locals())
        del arguments["self"], arguments["__class__"]
        self.config = MixupConfig.from_arguments(**arguments)
        self.current: MixDecision | None = None  # the decision of the batch in flight
        self.eligible: list[str] = []
        self.summary: dict[str, Any] = {}
        self._stream = DecisionStream(self.config.seed)
        self._hooks = HookSet()
        self._batch_major: dict[str, bool] = {}  # per hooked layer: outputs batch on axis 0
        self._compiled = False  # compiled forwards take lam as a tensor, made before they run
        self._record = MixRecord([])
        self._pairing = LocalPairing(0)
        self._targets = TargetMixer(self.config.targets, self.config.num_classes)
        self._masks = MaskUnion(self.config.attention_mask_key)
        self._batch: InFlight | None = None
        self._weights: np.ndarray | None = None
        self._automatic = True

    @property
    def mixup_batch_keys(self) -> tuple[int | str, int | str]:
        """``(input_key, target_key)``: where the mixin's default ``training_step`` reads."""
        return self.config.input_key, self.config.target_key

    @staticmethod
    def candidate_layers(model: nn.Module) -> list[str]:
        """The layers ``layers=None`` would select for ``model`` (normalized names)."""
        return candidate_layers(model)

    def hparams(self) -> dict[str, Any]:
        """Every argument, with the layers and seed as resolved for the fit."""
        return self.config.hparams(self.eligible, self._stream.seed)

    def alpha_at(self, trainer: pl.Trainer) -> float:
        """The alpha used for the current batch (schedule, warmup and stop_epoch applied)."""
        return alpha_at(self.config, trainer, batches_done=self._stream.step)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if is_param_in_hook_signature(pl_module.training_step, "dataloader_iter", explicit=True):
            raise MisconfigurationException(
                "ManifoldMixupCallback needs to see each training batch, but training_step "
                "takes a dataloader_iter (Lightning passes no batch to callbacks then). Use "
                "training_step(self, batch, batch_idx)."
            )
        self._stream.restored = False  # a state loaded by validate/test is not this fit's
        # Validate layer names before any training work (strategy setup, sanity check), unless
        # the module builds layers in its own setup or configure_model, which Lightning calls
        # after this hook; on_fit_start checks them then, still before the sanity check.
        if not _builds_layers_later(pl_module):
            resolve_layers(pl_module, self.config.layers)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        config = self.config
        self.eligible = resolve_layers(pl_module, config.layers)
        self._weights = _layer_weight_array(config.layer_weights, self.eligible)
        self._pairing = make_pairing(config.pairing, trainer)
        _check_run_length(config, trainer)
        self._stream.configured_seed = config.seed
        self._stream.start_fit(trainer)
        classes = config.num_classes
        if classes is None:
            classes = find_num_classes(pl_module)
        self._targets = TargetMixer(config.targets, classes)
        self._record = MixRecord(self.eligible)
        self._automatic = bool(pl_module.automatic_optimization)
        self._install_hooks(pl_module)
        for logger in trainer.loggers:
            logger.log_hyperparams({"mixup": self.hparams()})
        if not isinstance(pl_module, ManifoldMixupMixin):
            rank_zero_warn(_NO_MIXIN.format(name=type(pl_module).__name__))
        rank_zero_info(
            f"ManifoldMixupCallback: mixing at {self.eligible} with alpha={config.alpha}, "
            f"probability={config.probability}, lam_mode={config.lam_mode!r}"
        )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stream.start_training(trainer)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._end_batch()
        alpha = self.alpha_at(trainer)
        rng = self._stream.next(self._pairing.stream_key)
        x, y, rows = input_and_target(batch, self.config.input_key, self.config.target_key)
        self._batch = InFlight(original=y, rows=rows)
        self._hooks.arm()
        if self._hooks.probe is not None and INPUT in self.eligible:
            _check_input(x, rows, self.config.input_key)
        draw = self._draw(rng, alpha, rows, y.device)
        if draw is None:
            self._record.add_unmixed()
            return
        decision, box, self._batch.box_lam = decide(draw, self.eligible, x, y, self._compiled)
        partner = self._pairing.partner_targets(y, decision.index)
        target = self._targets.mix(y, decision.lam_arg, decision.index, partner)
        self._masks.apply(batch, x, decision.layer, decision.index, self._pairing.gather)
        if decision.layer == INPUT:
            set_entry(batch, self.config.input_key, self._mix_input(x, decision, box), pl_module)
        set_entry(batch, self.config.target_key, target, pl_module)
        self._batch.target = target
        lam = draw.lam  # host numbers: counting and logging never read the device
        self._batch.record = (decision.layer_index, float(lam if lam.ndim == 0 else lam.mean()))
        self.current = decision

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor
    ) -> None:
        if self._automatic:
            # Every forward of the step has run; with manual optimization more may follow
            # an earlier manual_backward, so the checks wait for the batch's end there.
            self._hooks.finish_probe()
            self._check_chosen_ran()
        self._hooks.in_backward = True

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._hooks.in_backward = False

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._stream.in_flight = False
        if self._batch is not None and self._batch.record is not None:
            self._record.add(*self._batch.record)
        if step_completes(trainer, pl_module):
            self._record.end_step(trainer, self.config.log)
        try:
            # outputs is empty when training_step returned None to skip the batch (its forward
            # may not have run); with manual optimization it returns None by design.
            ran = outputs is not None and not (isinstance(outputs, Mapping) and not outputs)
            if ran or not self._automatic:
                self._hooks.finish_probe()
                self._check_chosen_ran()
        finally:
            self._end_batch()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A batch can end without on_train_batch_end (the module's on_train_batch_start
        # returned -1 to stop the epoch): no later forward may be mixed with its decision.
        self._end_batch()
        self._stream.in_flight = False

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end_batch()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        self.summary = self._record.summary()
        rank_zero_info(f"ManifoldMixupCallback (rank 0) summary: {self.summary}")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._remove_hooks()

    def state_dict(self) -> dict[str, Any]:
        return self._stream.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._stream.load_state_dict(state_dict)

    def _draw(self, rng: np.random.Generator, alpha: float, rows: int, device: Any) -> Any:
        """The host-side draw for this batch (this rank's rows of it under global pairing)."""
        config = self.config
        total, mine = self._pairing.draw_rows(rows, device)
        return sample_decision(
            rng,
            batch_size=total,
            num_layers=len(self.eligible),
            alpha=alpha,
            probability=config.probability,
            lam_mode=config.lam_mode,
            layer_weights=self._weights,
            cutmix_prob=config.cutmix_prob,
            fixed_lam=config.fixed_lam,
            lam_transform=config.lam_transform,
            rows=mine,
        )

    def _mix_input(self, x: Any, decision: MixDecision, box: Any) -> Any:
        if box is not None:
            return cutmix_tensor(x, decision.index, box)
        assert self._batch is not None
        where = f"the input at input_key={self.config.input_key!r}"
        mixed, count = self._pairing.mix(x, decision, self._batch.rows, where)
        if count == 0:
            _check_input(x, self._batch.rows, self.config.input_key)
        return mixed

    def _mix_output(self, name: str, module: nn.Module, output: Any) -> Any:
        """The forward hook's work for the chosen layer: its output, mixed."""
        decision = self.current
        assert decision is not None and self._batch is not None
        # Traced (e.g. a forward compiled as a function): later batches make lam a tensor first.
        self._compiled = self._compiled or torch.compiler.is_compiling()
        if decision.box_center is not None:
            return self._cutmix_output(name, output, decision)
        rows, where, major = decision.index.shape[0], f"layer {name!r}", self._batch_major[name]
        mixed, count = self._pairing.mix(output, decision, rows, where, module, major)
        if count == 0:
            raise ValueError(_no_float_output(name, output, rows))
        return mixed

    def _check_output(self, name: str, module: nn.Module, output: Any) -> None:
        """First training step: every eligible layer's output holds something to mix."""
        assert self._batch is not None
        rows = self._batch.rows
        if map_batch(output, _same, rows, where=f"layer {name!r}", module=module)[1] == 0:
            raise ValueError(_no_float_output(name, output, rows))

    def _cutmix_output(self, name: str, output: Any, decision: MixDecision) -> Tensor:
        batch = self._batch
        assert batch is not None and decision.box_center is not None
        if not isinstance(output, Tensor) or output.ndim < 3:
            raise ValueError(
                f"CutMix at layer {name!r} needs a (B, C, H, W) tensor output, got "
                f"{describe(output)}; set cutmix_prob=0 or choose spatial layers only"
            )
        height, width = output.shape[-2], output.shape[-1]
        box = cutmix_box(height, width, batch.box_lam, decision.box_center)
        # The kept area fixes lam only now that H and W are known: correct the decision and
        # the targets in place (training_step holds these very tensors).
        kept = cutmix_lam(height, width, box)
        decision.lam.fill_(kept)
        self._targets.correct(batch.target, batch.original, decision.lam, decision.index)
        if batch.record is not None:
            batch.record = (batch.record[0], kept)
        return cutmix_tensor(output, decision.index, box)

    def _check_chosen_ran(self) -> None:
        layer = self._mixing_at()
        try:
            self._hooks.check_chosen_ran(None if layer == INPUT else layer)
        except RuntimeError:
            self.current = None
            raise

    def _end_batch(self) -> None:
        self.current = None
        self._batch = None
        self._hooks.disarm()

    def _install_hooks(self, pl_module: pl.LightningModule) -> None:
        modules = named_layers(pl_module)
        hooked = {name: modules[name] for name in self.eligible if name != INPUT}
        self._batch_major = {name: is_batch_major(module) for name, module in hooked.items()}
        self._compiled = uses_compile(pl_module)
        self._hooks.install(
            pl_module, hooked, self._mix_output, self._check_output, self._mixing_at
        )
        self._hooks.handles += guard_hf_labels(
            pl_module, self._targets_in_flight, self.config.target_key
        )
        self._masks = MaskUnion(self.config.attention_mask_key)
        self._hooks.handles += self._masks.watch(modules, self.eligible, self._mixing_at)

    def _targets_in_flight(self) -> tuple[Any, Any]:
        batch = self._batch
        return (None, None) if batch is None else (batch.original, batch.target)

    def _mixing_at(self) -> str | None:
        return None if self.current is None else self.current.layer

    def _remove_hooks(self) -> None:
        self._hooks.remove()
        self._end_batch()


@dataclasses.dataclass
class InFlight:
    """The training batch between its start and its end: what later hooks need of it."""

    original: Tensor  # the target as the batch brought it
    rows: int  # local batch size
    target: Any = None  # the mixed target handed to training_step
    box_lam: float = 1.0  # CutMix: the drawn lam, which sets the box size
    record: tuple[int, float] | None = None  # (layer position, lam) to count at the end


_NO_MIXIN = (
    "ManifoldMixupCallback: {name} does not use ManifoldMixupMixin, so training_step receives "
    "mixed targets as they are: integer class labels arrive as float (B, num_classes) soft "
    "targets (or MixedTarget pairs). Make sure its loss accepts them (F.cross_entropy does, "
    "F.nll_loss does not), or subclass ManifoldMixupMixin and use mixup_loss."
)


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
    max_steps = getattr(trainer, "max_steps", -1)
    if max_steps is not None and max_steps > 0:
        fractions.append(trainer.global_step / max_steps)
    max_epochs = getattr(trainer, "max_epochs", None)
    per_epoch = getattr(trainer, "num_training_batches", math.inf)
    if getattr(trainer, "fit_loop", None) is None:  # a stand-in with only the step estimate
        fractions.append(trainer.global_step / max(trainer.estimated_stepping_batches, 1))
    elif max_epochs is not None and max_epochs > 0 and math.isfinite(per_epoch):
        fractions.append(batches_done / max(max_epochs * per_epoch, 1))
    return min(max(fractions), 1.0)


def _check_run_length(config: MixupConfig, trainer: pl.Trainer) -> None:
    if config.alpha_schedule != "constant" and not np.isfinite(trainer.estimated_stepping_batches):
        raise MisconfigurationException(
            f"alpha_schedule={config.alpha_schedule!r} needs a finite run length: set "
            "max_epochs or max_steps on the Trainer, or use alpha_schedule='constant'"
        )


def _layer_weight_array(weights: Sequence[float] | None, eligible: list[str]) -> Any:
    if weights is None:
        return None
    if len(weights) != len(eligible):
        raise MisconfigurationException(
            f"layer_weights has {len(weights)} entries but the eligible set has "
            f"{len(eligible)}: {eligible}. Give one weight per layer, in this order."
        )
    array = np.asarray(weights, dtype=np.float64)
    return array / array.sum()


def _builds_layers_later(pl_module: pl.LightningModule) -> bool:
    """Whether the module defines configure_model or a setup of its own (beyond the mixin's),
    where layers may be created after the callback's setup hook."""
    setup = type(pl_module).setup
    own_setup = setup not in (pl.LightningModule.setup, ManifoldMixupMixin.setup)
    return own_setup or is_overridden("configure_model", pl_module)


def decide(
    draw: Draw, eligible: list[str], x: Any, y: Tensor, compiled: bool
) -> tuple[MixDecision, tuple[int, int, int, int] | None, float]:
    """The decision of a draw on the targets' device, the input CutMix box (or None) and the
    drawn lam that sets a CutMix box's size (1.0 without CutMix). ``compiled``: the lam tensor
    is made now, before a compiled forward reads it (inside, it would be traced)."""
    device = y.device
    layer = eligible[draw.layer]
    center = draw.box_center if draw.cutmix else None
    lam, box, box_lam = draw.lam, None, 1.0
    if center is not None:
        # The drawn lam sets the box size; lam becomes the kept area once H, W are known.
        box_lam = float(lam)
        if layer == INPUT:
            box = _input_box(x, box_lam, center)
            lam = np.asarray(cutmix_lam(x.shape[-2], x.shape[-1], box), dtype=np.float32)
    index = host_to_device(draw.perm, device)
    decision = MixDecision(layer, draw.layer, index, center, host_lam=lam, device=device)
    if compiled:
        decision.lam  # noqa: B018 (a cached property: this makes it)
    return decision, box, box_lam


def _input_box(x: Any, lam: float, center: tuple[float, float]) -> tuple[int, int, int, int]:
    if not isinstance(x, Tensor) or x.ndim < 3:
        raise ValueError(
            f"CutMix on the input needs a (B, C, H, W) tensor, got {describe(x)}; set "
            "cutmix_prob=0 or remove 'input' from layers"
        )
    return cutmix_box(x.shape[-2], x.shape[-1], lam, center)


def _same(t: Tensor) -> Tensor:
    return t


def _check_input(x: Any, rows: int, input_key: int | str) -> None:
    """Input mixup needs a floating-point tensor to mix (token ids get the way out) and no
    batch tensor beside it that cannot be mixed (``map_batch`` refuses those)."""
    check_input_mixable(x, input_key)
    map_batch(x, _same, rows, where=f"the input at input_key={input_key!r}")


def _no_float_output(name: str, output: Any, rows: int) -> str:
    return (
        f"ManifoldMixupCallback: layer {name!r} returned {describe(output)}, which holds no "
        f"floating tensor with batch dimension {rows} to mix. Choose layers whose output is a "
        "(B, ...) float tensor (or a tuple/dict holding one)."
    )
