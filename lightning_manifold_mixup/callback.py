"""``ManifoldMixupCallback``: the Lightning shell around :mod:`lightning_manifold_mixup.mixing`."""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping, MutableMapping, MutableSequence, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_manifold_mixup.layers import INPUT, named_layers, resolve_layers
from lightning_manifold_mixup.mixin import find_num_classes
from lightning_manifold_mixup.mixing import (
    LamMode,
    MixDecision,
    mix_nested,
    mix_targets,
    sample_decision,
)

TargetMode = Literal["soft", "pair"]
_STATE_VERSION = 1


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
            (``seed_everything``) or else a random seed broadcast from rank 0.
        log: log ``mixup/lam`` and ``mixup/layer`` (the position in the eligible set) each step.
        targets: ``"soft"`` rewrites integer labels to ``(B, C)`` soft targets; ``"pair"``
            to a :class:`~lightning_manifold_mixup.mixing.MixedTarget` ``(y_a, y_b, lam)``,
            which :meth:`ManifoldMixupMixin.mixup_loss` consumes without a ``(B, C)`` matrix.

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
    ) -> None:
        super().__init__()
        problems: list[str] = []
        if isinstance(layers, str):
            problems.append(f"layers must be a list of names, not the string {layers!r}")
        elif layers is not None and len(layers) == 0:
            problems.append("layers is empty: give at least one name, or None for automatic")
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
            problems.append(f"alpha must be a number > 0 (Beta(alpha, alpha)), got {alpha!r}")
        if not isinstance(probability, (int, float)) or not 0.0 <= probability <= 1.0:
            problems.append(f"probability must be in [0, 1], got {probability!r}")
        if lam_mode not in ("batch", "sample"):
            problems.append(f"lam_mode must be 'batch' or 'sample', got {lam_mode!r}")
        if num_classes is not None and (isinstance(num_classes, bool) or num_classes < 2):
            problems.append(f"num_classes must be an integer >= 2, got {num_classes!r}")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
            problems.append(f"seed must be a non-negative integer or None, got {seed!r}")
        if targets not in ("soft", "pair"):
            problems.append(f"targets must be 'soft' or 'pair', got {targets!r}")
        for key_name, key in (("input_key", input_key), ("target_key", target_key)):
            if not isinstance(key, (int, str)) or isinstance(key, bool):
                problems.append(f"{key_name} must be an int or a str, got {key!r}")
        if input_key == target_key:
            problems.append(f"input_key and target_key are both {input_key!r}")
        if problems:
            raise MisconfigurationException("ManifoldMixupCallback: " + "; ".join(problems))

        self.layers = None if layers is None else list(layers)
        self.alpha = float(alpha)
        self.probability = float(probability)
        self.lam_mode: LamMode = lam_mode
        self.num_classes = num_classes
        self.input_key = input_key
        self.target_key = target_key
        self.seed = seed
        # Lightning assigns `callback.log = pl_module.log` at fit start, so the flag lives here.
        self.log_mixing = log
        self.targets: TargetMode = targets

        self.current: MixDecision | None = None
        self.eligible: list[str] = []
        self._step = 0
        self._resolved_seed: int | None = None
        self._restored = False
        self._resolved_classes: int | None = None
        self._handles: list[RemovableHandle] = []
        self._calls = 0
        self._checked_labels = False
        self._warned_repeat: set[str] = set()

    # ------------------------------------------------------------------ helpers for users
    @staticmethod
    def candidate_layers(model: nn.Module) -> list[str]:
        """The layers ``layers=None`` would select for ``model`` (normalized names)."""
        from lightning_manifold_mixup.layers import candidate_layers

        return candidate_layers(model)

    # ------------------------------------------------------------------ fit lifecycle
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # Validate layer names before any training work (strategy setup, sanity check).
        resolve_layers(pl_module, self.layers)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        self.eligible = resolve_layers(pl_module, self.layers)
        self._resolved_classes = (
            self.num_classes if self.num_classes is not None else find_num_classes(pl_module)
        )
        if self._resolved_seed is None:
            self._resolved_seed = self._initial_seed(trainer)
        self._checked_labels = False
        self._warned_repeat = set()
        modules = named_layers(pl_module)
        for name in self.eligible:
            if name == INPUT:
                continue
            self._handles.append(modules[name].register_forward_hook(self._make_hook(name)))
        rank_zero_info(
            f"ManifoldMixupCallback: mixing at {self.eligible} with alpha={self.alpha}, "
            f"probability={self.probability}, lam_mode={self.lam_mode!r}"
        )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.current = None
        assert self._resolved_seed is not None
        rng = np.random.default_rng([self._resolved_seed, trainer.global_rank, self._step])
        self._step += 1
        x = self._get(batch, self.input_key, "input_key")
        y = self._get(batch, self.target_key, "target_key")
        batch_size = _batch_size(x)
        if y.ndim == 0 or y.shape[0] != batch_size:
            raise ValueError(
                f"input and target batch sizes differ: input has {batch_size} rows, target "
                f"has shape {tuple(y.shape)}. Check input_key={self.input_key!r} and "
                f"target_key={self.target_key!r}."
            )
        drawn = sample_decision(
            rng,
            batch_size=batch_size,
            num_layers=len(self.eligible),
            alpha=self.alpha,
            probability=self.probability,
            lam_mode=self.lam_mode,
        )
        if drawn is None:
            return
        k, lam_np, index_np = drawn
        device = y.device
        lam = torch.from_numpy(lam_np).to(device, non_blocking=True)
        index = torch.from_numpy(index_np).to(device, non_blocking=True)
        decision = MixDecision(self.eligible[k], k, lam, index)

        new_target = self._mix_target(y, decision)
        if decision.layer == INPUT:
            mixed, count = mix_nested(x, lam, index, batch_size)
            if count == 0:
                raise ValueError(
                    f"input mixup needs a floating-point input at input_key={self.input_key!r}, "
                    f"got {_describe(x)}. Remove 'input' from layers for integer inputs "
                    "(token ids) and mix a hidden layer instead."
                )
            self._set(batch, self.input_key, mixed)
        self._set(batch, self.target_key, new_target)
        self._calls = 0
        self.current = decision
        if self.log_mixing:
            lam_value = float(lam_np.mean())
            pl_module.log("mixup/lam", lam_value, on_step=True, on_epoch=False)
            pl_module.log("mixup/layer", float(k), on_step=True, on_epoch=False)

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor
    ) -> None:
        self._check_layer_ran()

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        try:
            self._check_layer_ran()
        finally:
            self.current = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._remove_hooks()

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {"version": _STATE_VERSION, "seed": self._resolved_seed, "step": self._step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        version = state_dict.get("version")
        if version != _STATE_VERSION or not {"seed", "step"} <= state_dict.keys():
            raise ValueError(
                f"ManifoldMixupCallback cannot read checkpoint state {state_dict!r}: expected "
                f"version {_STATE_VERSION} with 'seed' and 'step'. Resume with the package "
                "version that wrote the checkpoint, or start a new run."
            )
        self._resolved_seed = int(state_dict["seed"])
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
            decision = self.current
            if decision is None or decision.layer != name:
                return None
            self._calls += 1
            if self._calls == 2 and name not in self._warned_repeat:
                self._warned_repeat.add(name)
                rank_zero_warn(
                    f"ManifoldMixupCallback: layer {name!r} ran more than once in one training "
                    "step (weight sharing, recurrence or activation checkpointing). Every run "
                    "gets the same mix; pick a layer that runs once if that is not intended."
                )
            batch_size = decision.index.shape[0]
            mixed, count = mix_nested(output, decision.lam, decision.index, batch_size)
            if count == 0:
                raise ValueError(
                    f"layer {name!r} returned {_describe(output)}, which holds no floating "
                    f"tensor with batch dimension {batch_size} to mix. Choose a layer whose "
                    "output is a (B, ...) float tensor (or a tuple/dict holding one)."
                )
            return mixed

        return hook

    def _check_layer_ran(self) -> None:
        decision = self.current
        if decision is not None and decision.layer != INPUT and self._calls == 0:
            self.current = None
            raise RuntimeError(
                f"ManifoldMixupCallback: layer {decision.layer!r} was chosen but did not run "
                "during this training step, so the targets were mixed and the features were "
                "not. Remove it from layers, or make sure training_step calls it."
            )

    def _mix_target(self, y: Tensor, decision: MixDecision) -> Any:
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
        if self.targets == "pair":
            return mix_targets(y, decision.lam, decision.index, pair=True)
        num_classes = self._resolved_classes
        if num_classes is None:
            raise ValueError(
                "integer class labels need num_classes to become soft targets: pass "
                "ManifoldMixupCallback(num_classes=...), set self.num_classes on the "
                "LightningModule, or save it with self.save_hyperparameters()"
            )
        # Checking the range reads the labels on the host: do it for every CPU batch, and once
        # for accelerator batches so steady-state steps do not synchronise.
        if y.device.type == "cpu" or not self._checked_labels:
            self._checked_labels = True
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= num_classes:
                raise ValueError(
                    f"labels must lie in [0, {num_classes}), got values in [{lo}, {hi}]. "
                    "Fix num_classes or the dataset's labels."
                )
        return mix_targets(y, decision.lam, decision.index, num_classes=num_classes)

    def _initial_seed(self, trainer: pl.Trainer) -> int:
        if self.seed is not None:
            return self.seed
        global_seed = os.environ.get("PL_GLOBAL_SEED")
        if global_seed is not None:
            return int(global_seed)
        # One draw on rank 0, shared with every rank, so a resumed run (which loads rank 0's
        # state everywhere) continues each rank's stream.
        seed: int = trainer.strategy.broadcast(secrets.randbits(31), src=0)
        return int(seed)

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

    def _set(self, batch: Any, key: int | str, value: Any) -> None:
        if isinstance(batch, MutableMapping):
            batch[key] = value
            return
        if isinstance(batch, MutableSequence) and isinstance(key, int):
            batch[key] = value
            return
        raise TypeError(
            f"ManifoldMixupCallback cannot rewrite a {type(batch).__name__} batch in place. "
            "Return lists or dicts from your collate_fn, or subclass ManifoldMixupMixin, "
            "which turns tuple batches into lists before the callback sees them."
        )

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.current = None


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
