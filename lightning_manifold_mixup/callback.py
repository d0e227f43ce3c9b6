"""Owns the wiring: ``ManifoldMixupCallback``, Lightning's hooks calling the parts that mix a
batch (config, stream, draw, policies, targets, pairing, hooks, record; see docs/design.md)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from torch import Tensor, nn

from lightning_manifold_mixup._lightning import CallbackBase, pl, rank_zero_info
from lightning_manifold_mixup.batch import InFlight, check_input, input_and_target, set_entry
from lightning_manifold_mixup.config import (
    AlphaSchedule,
    LamTransform,
    MixupConfig,
    Pairing,
    PolicyName,
    TargetMode,
    layer_weight_array,
)
from lightning_manifold_mixup.draw import LamMode, MixDecision
from lightning_manifold_mixup.hf import MaskUnion, guard_hf_labels
from lightning_manifold_mixup.hooks import HookSet, no_float_output
from lightning_manifold_mixup.layers import INPUT, candidate_layers, named_layers, resolve_layers
from lightning_manifold_mixup.layout import is_batch_major
from lightning_manifold_mixup.mixin import (
    builds_layers_later,
    check_module,
    check_training_step,
    find_num_classes,
    missing_classes_hint,
)
from lightning_manifold_mixup.pairing import LocalPairing, make_pairing
from lightning_manifold_mixup.policies import Blend, MixPolicy, batch_policy
from lightning_manifold_mixup.record import MixRecord, step_completes
from lightning_manifold_mixup.schedule import alpha_at, check_run_length
from lightning_manifold_mixup.stream import DecisionStream, warn_restarted_loader
from lightning_manifold_mixup.targets import TargetMixer


class ManifoldMixupCallback(CallbackBase):
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
            batch and needs the same batch size on every rank (``drop_last=True``); every
            policy and CutMix work with it. ``MixDecision.index`` then holds global row
            indices. With one data-parallel replica it behaves as ``"local"`` (with a
            warning); with tensor parallelism it is refused.
        attention_mask_key: the key of a ``(B, L)`` attention mask in a dict batch or in a
            dict input (``batch[input_key]``); rows of a mixed batch get the union of their
            own and their partner's mask, so the partner's tokens beyond the row's length stay
            visible to later layers (see ``docs/transformers.md``). Ignored when there is no
            such key; None keeps every row's own mask.
        cutmix_alpha: ``Beta(cutmix_alpha, cutmix_alpha)`` for the box area of CutMix batches
            (CutMix is usually run with 1.0 while manifold mixup uses 2.0); None uses
            ``alpha``. The alpha schedule scales both alike.
        policy: how a mixed batch combines each tensor with its partner rows: a name or a
            policy object. ``"blend"`` (manifold mixup, the default), ``"nfm"``
            (:class:`~lightning_manifold_mixup.NoisyFeatureMixup`: a blend, then noise),
            ``"mixstyle"`` (:class:`~lightning_manifold_mixup.MixStyle`: per-channel
            statistics mixed, targets untouched), ``"patchup-soft"``
            (:class:`~lightning_manifold_mixup.PatchUpSoft`: a blend inside a box); an object
            such as ``NoisyFeatureMixup(add_noise_level=0.2)`` sets its arguments. CutMix
            batches (``cutmix_prob``) paste whatever the policy.

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
        policy: PolicyName | MixPolicy = "blend",
    ) -> None:
        super().__init__()
        arguments = dict(locals())
        del arguments["self"], arguments["__class__"]
        self.config = MixupConfig(**arguments)
        self.eligible: list[str] = []
        self.summary: dict[str, Any] = {}
        self._stream = DecisionStream(self.config.seed)
        self._hooks = HookSet()
        self._batch_major: dict[str, bool] = {}  # per hooked layer: outputs batch on axis 0
        self._record = MixRecord([])
        self._pairing = LocalPairing(0)
        self._policy: MixPolicy = Blend()
        self._targets = TargetMixer(self.config.targets, self.config.num_classes)
        self._masks = MaskUnion(self.config.attention_mask_key)
        self._batch: InFlight | None = None
        self._weights: np.ndarray | None = None
        self._automatic = True
        self._resumed = False  # the next batch is the first after a resume

    @property
    def current(self) -> MixDecision | None:
        """The decision of the training batch in flight (None outside one, or when the batch
        is not mixed): ``layer``, ``layer_index``, ``lam`` (``()`` or ``(B,)``), ``index``,
        ``box`` (CutMix and soft PatchUp, once placed) and ``policy`` (with its draws)."""
        batch = self._batch
        return None if batch is None else batch.decision

    @current.setter
    def current(self, decision: MixDecision | None) -> None:
        if self._batch is not None:
            self._batch.decision = decision

    @property
    def clean_input(self) -> Any:
        """The input of the training batch in flight as the batch brought it, before input
        mixup rewrote ``batch[input_key]`` (a teacher for distillation runs on it); None outside
        a training batch."""
        return None if self._batch is None else self._batch.clean_input

    def mix_like(self, t: Tensor) -> Tensor:
        """``t`` mixed as the targets of the training batch in flight: the same lam and
        partner rows.

        ``t`` is ``(B, ...)``, a float tensor with the batch's rows (a teacher's logits or
        features, say). A blended batch gives ``lam * t + (1 - lam) * t[index]`` (lam of shape
        ``()`` or ``(B,)``, broadcast); on a CutMix batch a ``(B, C, H, W)`` ``t`` gets the
        partner's box pasted in, scaled to ``t``'s ``(H, W)``, and other shapes are blended
        with the kept-area lam; a policy that keeps the targets (MixStyle) keeps ``t``. Outside
        a mixed training batch ``t`` is returned unchanged. With a box placed at a hidden
        layer, the box exists once that layer has run: call this after the model's forward.

        Example (distillation, inside ``training_step``)::

            with torch.no_grad():
                teacher_logits = self.teacher(mixup.clean_input)
            soft = mixup.mix_like(teacher_logits.softmax(-1))
        """
        return t if self._batch is None else self._batch.mix_like(t)

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
        self._policy = config.mix_policy()
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
            # StochasticWeightAveraging's BatchNorm pass (no backward, no optimizer step): neither
            # mixed nor drawn for (clean statistics for the averaged model; the stream stays).
            return
        config = self.config
        alpha = self.alpha_at(trainer)
        rng = self._stream.next(self._pairing.stream_key)
        x, y, rows = input_and_target(batch, config.input_key, config.target_key)
        flight = self._batch = InFlight(y, rows, self._pairing, clean_input=x)
        self._hooks.arm(flight)
        if self._hooks.probe is not None and INPUT in self.eligible:
            check_input(x, rows, config.input_key)
        total, mine = self._pairing.draw_rows(rows, y.device)
        draw = config.sample(rng, alpha, total, mine, len(self.eligible), self._weights)
        started = None if draw is None else batch_policy(self._policy, rng, draw, total, mine)
        if started is None:
            self._record.add_unmixed()
            # One target format for the whole fit: an unmixed batch's take the mixed form (lam 1).
            flight.write_target(batch, config.target_key, self._targets.unmixed(y), pl_module)
            return
        policy, draw = started
        decision = flight.decision = MixDecision.of(draw, self.eligible, y.device, policy)
        if decision.layer == INPUT and policy.boxed:
            decision = flight.place_box(x, INPUT, self._targets)  # lam final for the targets
        target = self._targets.mix(y, decision.lam, flight.partner, policy.targets, decision.box)
        flight.mask_length = self._masks.apply(batch, x, flight.partner)
        if decision.layer == INPUT:
            set_entry(batch, config.input_key, flight.mix_input(x, config.input_key), pl_module)
        flight.write_target(batch, config.target_key, target, pl_module)
        # Host numbers (the kept area of an input box): counting and logging never read the device.
        lam = decision.host_lam
        flight.record = (draw.layer, float(lam if lam.ndim == 0 else lam.mean()))

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor
    ) -> None:
        if self._automatic:
            # Every forward of the step has run; with manual optimization more may follow
            # an earlier manual_backward, so the checks wait for the batch's end there.
            self._hooks.finish_probe()
            self._hooks.check_chosen_ran(self._batch)
        if self._batch is not None:
            self._batch.in_backward = True

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._batch is not None:
            self._batch.in_backward = False

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
                self._hooks.check_chosen_ran(self._batch)
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

    def _on_output(self, name: str, module: nn.Module, args: Any, output: Any) -> Any:
        """The forward hook of every eligible layer: inside the mixing window, the chosen
        layer's output combined with its partner rows (the first step checks every layer)."""
        batch = self._batch
        if batch is None or not (batch.in_step or batch.in_backward):
            return None  # a forward outside the training step (another hook, a probe)
        hooks = self._hooks
        if hooks.probe is not None and not batch.in_backward:
            hooks.count(name, module, output, batch.rows)
        decision = batch.decision
        if decision is None or decision.layer != name:
            return None
        if not batch.in_backward:
            hooks.calls += 1
            if hooks.calls == 2:
                hooks.warn_repeated({name: 2})
        if decision.policy.boxed and decision.box is None:
            decision = batch.place_box(output, name, self._targets)
        if (
            self._batch_major[name]
            and isinstance(output, Tensor)
            and output.ndim
            and output.shape[0] == batch.rows
            and output.is_floating_point()
        ):
            # A batch-major tensor, the common case: the policy's formula is the next call.
            partner = self._pairing.partner(output, decision.index)
            return decision.policy.combine(output, partner, decision.lam)
        mixed, count = batch.mix(output, module, f"layer {name!r}")
        if count == 0:
            raise ValueError(no_float_output(name, output, batch.rows))
        return mixed

    def _end_batch(self) -> None:
        self._batch = None
        self._hooks.disarm()

    def _install_hooks(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        modules = named_layers(pl_module)
        hooked = {name: modules[name] for name in self.eligible if name != INPUT}
        self._batch_major = {name: is_batch_major(module) for name, module in hooked.items()}
        self._hooks.install(trainer, hooked, self._on_output)
        guard_hf_labels(pl_module, self._hooks.add, self._in_flight, self.config.target_key)
        self._masks = MaskUnion(self.config.attention_mask_key)
        self._masks.watch(self._hooks.add, modules, self.eligible, self._in_flight)

    def _in_flight(self) -> InFlight | None:
        return self._batch

    def _remove_hooks(self) -> None:
        self._hooks.remove()
        self._end_batch()
