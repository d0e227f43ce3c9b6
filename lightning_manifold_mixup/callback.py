"""``ManifoldMixupCallback``: Lightning's hooks wired to the parts that mix a batch (config,
stream, draw, policies, targets, pairing, hooks, record; see docs/design.md)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from torch import Tensor, nn

from lightning_manifold_mixup._lightning import (
    CallbackBase,
    pl,
    rank_zero_info,
)
from lightning_manifold_mixup.batch import InFlight, check_input, input_and_target, set_entry
from lightning_manifold_mixup.config import (
    AlphaSchedule,
    ConfigAttributes,
    LamTransform,
    MixupConfig,
    Pairing,
    TargetMode,
    layer_weight_array,
)
from lightning_manifold_mixup.draw import LamMode, MixDecision
from lightning_manifold_mixup.hf import MaskUnion, guard_hf_labels
from lightning_manifold_mixup.hooks import HookSet, check_output, no_float_output
from lightning_manifold_mixup.layers import INPUT, candidate_layers, named_layers, resolve_layers
from lightning_manifold_mixup.layout import describe, is_batch_major
from lightning_manifold_mixup.mixin import (
    builds_layers_later,
    check_module,
    check_training_step,
    find_num_classes,
    missing_classes_hint,
)
from lightning_manifold_mixup.pairing import LocalPairing, make_pairing
from lightning_manifold_mixup.policies import Blender, Box, make_policy
from lightning_manifold_mixup.record import MixRecord, step_completes
from lightning_manifold_mixup.schedule import alpha_at, check_run_length
from lightning_manifold_mixup.stream import DecisionStream, warn_restarted_loader
from lightning_manifold_mixup.targets import TargetMixer


class ManifoldMixupCallback(ConfigAttributes, CallbackBase):
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
        probability: chance in [0, 1] that a batch is mixed at all. An unmixed batch's
            targets take the mixed form with lam 1 (one format for the whole fit).
        lam_mode: ``"batch"`` (one lam per batch, as the paper) or ``"sample"`` (one per row).
        num_classes: classes for integer targets; defaults to ``pl_module.num_classes``,
            ``pl_module.hparams.num_classes`` or ``.num_labels``, or the ``config.num_labels``
            of a Hugging Face classifier in the module.
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
            is then the kept area fraction, and the targets use that lam (integer class maps
            get the partner's labels pasted in the same box instead).
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
        cutmix_alpha: ``Beta(cutmix_alpha, cutmix_alpha)`` for the box area of CutMix batches
            (CutMix is usually run with 1.0 while manifold mixup uses 2.0); None uses
            ``alpha``. The alpha schedule scales both alike.

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
        cutmix_alpha: float | None = None,
    ) -> None:
        super().__init__()
        arguments = dict(locals())
        del arguments["self"], arguments["__class__"]
        self.config = MixupConfig.from_arguments(**arguments)
        self._current: MixDecision | None = None
        self.eligible: list[str] = []
        self.summary: dict[str, Any] = {}
        self._stream = DecisionStream(self.config.seed)
        self._hooks = HookSet()
        self._batch_major: dict[str, bool] = {}  # per hooked layer: outputs batch on axis 0
        self._record = MixRecord([])
        self._pairing = LocalPairing(0)
        self._targets = TargetMixer(self.config.targets, self.config.num_classes)
        self._masks = MaskUnion(self.config.attention_mask_key)
        self._batch: InFlight | None = None
        self._weights: np.ndarray | None = None
        self._automatic = True
        self._resumed = False  # the next batch is the first after a resume

    @property
    def current(self) -> MixDecision | None:
        """The decision of the training batch in flight (None outside one, or when the batch
        is not mixed): ``layer``, ``layer_index``, ``lam`` (``()`` or ``(B,)``), ``index``."""
        return self._current

    @current.setter
    def current(self, decision: MixDecision | None) -> None:
        self._current = decision
        self._hooks.chosen = None if decision is None else decision.layer

    @property
    def clean_input(self) -> Any:
        """The input of the training batch in flight as the batch brought it, before input
        mixup rewrote ``batch[input_key]`` (a teacher for distillation runs on it); None outside
        a training batch."""
        return None if self._batch is None else self._batch.clean_input

    def mix_like(self, t: Tensor) -> Tensor:
        """``t`` mixed exactly as the training batch in flight: the same lam and partner rows.

        ``t`` is ``(B, ...)``, a float tensor with the batch's rows (a teacher's logits or
        features, say). A blended batch gives ``lam * t + (1 - lam) * t[index]`` (lam of shape
        ``()`` or ``(B,)``, broadcast); on a CutMix batch a ``(B, C, H, W)`` ``t`` gets the
        partner's box pasted in, scaled to ``t``'s ``(H, W)``, and other shapes are blended
        with the kept-area lam. Outside a mixed training batch ``t`` is returned unchanged.
        With CutMix at a hidden layer, the box exists once that layer has run: call this after
        the model's forward.

        Example (distillation, inside ``training_step``)::

            with torch.no_grad():
                teacher_logits = self.teacher(mixup.clean_input)
            soft = mixup.mix_like(teacher_logits.softmax(-1))
        """
        decision, batch = self._current, self._batch
        if decision is None or batch is None:
            return t
        rows = batch.rows
        if (
            not isinstance(t, Tensor)
            or not t.is_floating_point()
            or t.ndim == 0
            or (t.shape[0] != rows)
        ):
            raise ValueError(
                f"ManifoldMixupCallback.mix_like needs a float tensor of {rows} rows (the "
                f"batch's), got {describe(t)}."
            )
        if batch.policy is not None and batch.policy.pastes:
            if batch.box is None:
                raise RuntimeError(
                    "ManifoldMixupCallback.mix_like: this CutMix batch is boxed at layer "
                    f"{decision.layer!r}, whose box is placed when it runs; call mix_like after "
                    "the model's forward."
                )
            if t.ndim >= 3:
                return batch.box.scaled(t.shape[-2], t.shape[-1]).paste(t, decision.index)
        mixed, _ = self._pairing.mix(t, decision, rows, "mix_like(t)")
        return mixed

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
        check_training_step(pl_module)
        self._stream.restored = False  # a state loaded by validate/test is not this fit's
        # Validate layer names before any training work (strategy setup, sanity check), unless
        # the module builds layers in its own setup or configure_model, which Lightning calls
        # after this hook; on_fit_start checks them then, still before the sanity check.
        if not builds_layers_later(pl_module):
            resolve_layers(pl_module, self.config.layers)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        config = self.config
        self.eligible = resolve_layers(pl_module, config.layers)
        self._weights = layer_weight_array(config.layer_weights, self.eligible)
        self._pairing = make_pairing(config.pairing, trainer)
        check_run_length(config, trainer)
        self._stream.configured_seed = config.seed
        self._stream.start_fit(trainer)
        classes = find_num_classes(pl_module) if config.num_classes is None else config.num_classes
        self._targets = TargetMixer(config.targets, classes)
        self._targets.missing = missing_classes_hint(pl_module)
        self._record = MixRecord(self.eligible)
        self._automatic = bool(pl_module.automatic_optimization)
        check_module(pl_module, config.targets)
        self._install_hooks(trainer, pl_module)
        for logger in trainer.loggers:
            logger.log_hyperparams({"mixup": self.hparams()})
        rank_zero_info(
            f"ManifoldMixupCallback: mixing at {self.eligible} with alpha={config.alpha}, "
            f"probability={config.probability}, lam_mode={config.lam_mode!r}"
        )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stream.start_training(trainer)
        self._resumed = trainer.ckpt_path is not None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._end_batch()
        if self._resumed:
            self._resumed = False
            warn_restarted_loader(trainer, batch_idx)
        # (fit_loop._skip_backward's own attribute: the property costs a Python call per batch)
        if trainer.fit_loop.epoch_loop.automatic_optimization._skip_backward:
            # StochasticWeightAveraging's BatchNorm pass: no backward and no optimizer step
            # follow, so the batch is neither mixed nor drawn for (the averaged model's
            # statistics are those of clean features, and the stream stays where it was).
            return
        alpha = self.alpha_at(trainer)
        rng = self._stream.next(self._pairing.stream_key)
        x, y, rows = input_and_target(batch, self.config.input_key, self.config.target_key)
        self._batch = InFlight(original=y, rows=rows, clean_input=x)
        self._hooks.arm()
        if self._hooks.probe is not None and INPUT in self.eligible:
            check_input(x, rows, self.config.input_key)
        draw = self._draw(rng, alpha, rows, y.device)
        if draw is None:
            self._record.add_unmixed()
            # One target format for the whole fit: an unmixed batch's targets take the mixed
            # form (lam 1), so training_step and its metrics never see the format change.
            target = self._targets.unmixed(y)
            if target is not y:
                set_entry(batch, self.config.target_key, target, pl_module)
            self._batch.target = target
            return
        policy = self._batch.policy = make_policy(draw.cutmix, draw.lam, draw.box_center)
        layer = self.eligible[draw.layer]
        # A box on the input is placed now, so lam (its kept area) is final for the targets.
        box = policy.place(x, INPUT) if layer == INPUT else None
        lam = draw.lam if box is None else np.asarray(box.kept, dtype=np.float32)
        self._batch.box = box
        decision = MixDecision.of(draw, self.eligible, y.device, lam)
        partner = self._pairing.partner_targets(y, decision.index)
        target = self._targets.mix(y, decision.lam, decision.index, partner, box, policy.pastes)
        self._masks.apply(batch, x, decision.layer, decision.index, self._pairing.gather)
        if layer == INPUT:
            set_entry(batch, self.config.input_key, self._mix_input(x, decision, box), pl_module)
        set_entry(batch, self.config.target_key, target, pl_module)
        self._batch.target = target
        # Host numbers (the kept area of an input box): counting and logging never read the device.
        self._batch.record = (draw.layer, float(lam if lam.ndim == 0 else lam.mean()))
        self._current, self._hooks.chosen = decision, decision.layer

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
        total, mine = self._pairing.draw_rows(rows, device)
        return self.config.sample(rng, alpha, total, mine, len(self.eligible), self._weights)

    def _mix_input(self, x: Any, decision: MixDecision, box: Box | None) -> Any:
        batch = self._batch
        assert batch is not None and batch.policy is not None
        where = f"the input at input_key={self.config.input_key!r}"
        blend = self._blender(decision, where)
        mixed, count, _ = batch.policy.mix(x, decision, blend, INPUT, box)
        if count == 0:
            check_input(x, batch.rows, self.config.input_key)
        return mixed

    def _mix_output(self, name: str, module: nn.Module, output: Any) -> Any:
        """The forward hook's work for the chosen layer: its output, mixed."""
        decision, batch = self._current, self._batch
        assert decision is not None and batch is not None and batch.policy is not None
        blend = self._blender(decision, f"layer {name!r}", module, self._batch_major[name])
        mixed, count, box = batch.policy.mix(output, decision, blend, name)
        if box is not None:
            self._fix_lam(box)
        if count == 0:
            raise ValueError(no_float_output(name, output, decision.index.shape[0]))
        return mixed

    def _blender(
        self,
        decision: MixDecision,
        where: str,
        module: nn.Module | None = None,
        major: bool = False,
    ) -> Blender:
        """The pairing's blend of ``decision`` for one object (the input or a layer output)."""
        rows = decision.index.shape[0]
        return lambda obj: self._pairing.mix(obj, decision, rows, where, module, major)

    def _fix_lam(self, box: Box) -> None:
        """A box placed at a hidden layer fixes lam (its kept area) only now that the layer's
        size is known: the decision is replaced and the targets rewritten in place
        (training_step holds them)."""
        batch, decision = self._batch, self._current
        assert batch is not None and decision is not None
        self._current = decision = decision.with_lam(box.kept)
        batch.box = box
        self._targets.correct(batch.target, batch.original, decision.lam, decision.index, box)
        if batch.record is not None:
            batch.record = (batch.record[0], box.kept)

    def _check_output(self, name: str, module: nn.Module, output: Any) -> None:
        assert self._batch is not None
        check_output(name, module, output, self._batch.rows)

    def _check_chosen_ran(self) -> None:
        layer = self._mixing_at()
        try:
            self._hooks.check_chosen_ran(None if layer == INPUT else layer)
        except RuntimeError:
            self.current = None
            raise

    def _end_batch(self) -> None:
        self._current = None
        self._batch = None
        self._hooks.disarm()

    def _install_hooks(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        modules = named_layers(pl_module)
        hooked = {name: modules[name] for name in self.eligible if name != INPUT}
        self._batch_major = {name: is_batch_major(module) for name, module in hooked.items()}
        self._hooks.install(trainer, hooked, self._mix_output, self._check_output)
        guard_hf_labels(pl_module, self._hooks.add, self._targets_in_flight, self.config.target_key)
        self._masks = MaskUnion(self.config.attention_mask_key)
        self._masks.watch(self._hooks.add, modules, self.eligible, self._mixing_at)

    def _targets_in_flight(self) -> tuple[Any, Any]:
        batch = self._batch
        return (None, None) if batch is None else (batch.original, batch.target)

    def _mixing_at(self) -> str | None:
        return None if self._current is None else self._current.layer

    def _remove_hooks(self) -> None:
        self._hooks.remove()
        self._end_batch()
