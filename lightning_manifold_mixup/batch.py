"""Owns the training batch in flight: reading and rewriting its input and target in place, and
:class:`InFlight`, the one object that holds its state between its start and its end."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, MutableMapping, MutableSequence, Sequence
from typing import Any

from torch import Tensor, nn

from lightning_manifold_mixup._lightning import pl
from lightning_manifold_mixup.draw import MixDecision
from lightning_manifold_mixup.hf import check_input_mixable
from lightning_manifold_mixup.layout import batch_size_of, describe, map_batch
from lightning_manifold_mixup.mixin import ManifoldMixupMixin, is_dataclass_batch
from lightning_manifold_mixup.policies import mix_with_partner
from lightning_manifold_mixup.targets import TargetMixer


def get_entry(batch: Any, key: int | str, what: str) -> Any:
    """``batch[key]``, or an error that shows the batch's keys and the argument to set."""
    try:
        return batch[key]
    except (KeyError, IndexError, TypeError) as err:
        keys = list(batch.keys()) if isinstance(batch, Mapping) else None
        if is_dataclass_batch(batch):  # fields named by the keys
            keys = [field.name for field in dataclasses.fields(batch)]
            if isinstance(key, str) and key in keys:
                return getattr(batch, key)
            raise ValueError(
                f"ManifoldMixupCallback: no field {key!r} ({what}) in the dataclass batch "
                f"{type(batch).__name__} (fields {keys}). Set {what} to the name (str) of the "
                f"{'input' if what == 'input_key' else 'target'}'s field."
            ) from err
        shape = f"keys {keys}" if keys is not None else f"a {type(batch).__name__}"
        if isinstance(batch, Sequence) and not isinstance(batch, str):
            shape += f" of length {len(batch)}"
        raise ValueError(
            f"ManifoldMixupCallback: no entry at {what}={key!r} in the training batch "
            f"({shape}). Set {what} to the position (int) or key (str) of the "
            f"{'input' if what == 'input_key' else 'target'}."
        ) from err


def input_and_target(
    batch: Any, input_key: int | str, target_key: int | str
) -> tuple[Any, Tensor, int]:
    """``(x, y, batch size)`` of a training batch, with the shapes checked against each other."""
    x = get_entry(batch, input_key, "input_key")
    y = get_entry(batch, target_key, "target_key")
    if not isinstance(y, Tensor):
        if _is_tuple_target(x, y):
            shapes = ", ".join(map(describe, y))
            raise TypeError(
                f"ManifoldMixupCallback: the target at target_key={target_key!r} is a "
                f"{type(y).__name__} of {len(y)} tensors ({shapes}), but the callback mixes one "
                "target tensor. Put the other tensors (sample weights, a second target) in their "
                "own entries of the batch, e.g. (x, labels, weights) with target_key=1: entries "
                "other than the input and the target are passed on unmixed."
            )
        raise TypeError(
            f"ManifoldMixupCallback: the target at target_key={target_key!r} is a "
            f"{type(y).__name__}, not a tensor. With several training dataloaders each batch "
            "holds one batch per loader, which cannot be mixed as one; train on a single "
            "loader (or one dataset), or set target_key to where a (B,) / (B, C) target "
            "tensor sits."
        )
    rows = batch_size_of(x)
    if y.ndim == 0 or y.shape[0] != rows:
        raise ValueError(
            f"input and target batch sizes differ: input has {rows} rows, target "
            f"has shape {tuple(y.shape)}. Check input_key={input_key!r} and "
            f"target_key={target_key!r}."
        )
    return x, y, rows


def _is_tuple_target(x: Any, y: Any) -> bool:
    """A target given as several tensors of the input's rows (``(labels, weights)``), as
    opposed to another loader's whole batch (several dataloaders, where the input is one too)."""
    return (
        isinstance(x, Tensor)
        and isinstance(y, (list, tuple))
        and len(y) > 0
        and all(isinstance(t, Tensor) and t.ndim and t.shape[0] == x.shape[0] for t in y)
    )


def set_entry(batch: Any, key: int | str, value: Any, pl_module: pl.LightningModule) -> None:
    """Write ``value`` into the batch in place (Lightning hands this object to training_step)."""
    if isinstance(batch, MutableMapping):
        batch[key] = value
        return
    if isinstance(batch, MutableSequence) and isinstance(key, int):
        batch[key] = value
        return
    if isinstance(key, str) and is_dataclass_batch(batch):
        # (Lightning refuses frozen dataclass batches itself, when it moves them to the device.)
        setattr(batch, key, value)
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


def check_input(x: Any, rows: int, input_key: int | str) -> None:
    """Input mixup needs a floating-point tensor to mix (token ids get the way out) and no
    batch tensor beside it that cannot be mixed (``map_batch`` refuses those)."""
    check_input_mixable(x, rows, input_key)
    map_batch(x, lambda t: t, rows, where=f"the input at input_key={input_key!r}")


class InFlight:
    """The training batch between its start and its end: everything later hooks need of it.

    ``decision`` is what the batch mixes (None: not mixed; ``callback.current``), with the
    batch's policy and, once placed, its box. ``in_step`` and ``in_backward`` are the mixing
    window: forwards are mixed inside ``training_step`` and during its backward only.
    ``pairing`` finds the partner rows (:meth:`partner`).
    """

    def __init__(self, original: Tensor, rows: int, pairing: Any, clean_input: Any) -> None:
        self.original = original  # the target as the batch brought it
        self.rows = rows  # local batch size
        self.pairing = pairing
        self.clean_input = clean_input  # the input as the batch brought it
        self.decision: MixDecision | None = None
        self.target: Any = None  # the mixed target handed to training_step
        self.record: tuple[int, float] | None = None  # (layer position, lam) to count
        self.mask_length: int | None = None  # length of the mask replaced by the union
        self.in_step = True
        self.in_backward = False

    def write_target(
        self, batch: Any, key: int | str, target: Any, pl_module: pl.LightningModule
    ) -> None:
        """Hand ``target`` to training_step: written into the batch in place (unless it is the
        batch's own target) and kept as the batch's mixed target."""
        self.target = target
        if target is not self.original:
            set_entry(batch, key, target, pl_module)

    def partner(self, t: Tensor) -> Tensor:
        """The partner rows of ``t`` ``(B, ...)`` under the batch's decision."""
        assert self.decision is not None
        partner: Tensor = self.pairing.partner(t, self.decision.index)
        return partner

    def mix(self, obj: Any, module: nn.Module | None, where: str) -> tuple[Any, int]:
        """Every batch tensor of ``obj`` (the input, ``module=None``, or a layer's output)
        along its batch axis, combined with its partner rows by the batch's policy; the
        result and how many tensors were mixed."""
        decision = self.decision
        assert decision is not None
        combine, lam, partner = decision.policy.combine, decision.lam, self.partner
        return map_batch(
            obj, lambda h: combine(h, partner(h), lam), self.rows, where=where, module=module
        )

    def mix_input(self, x: Any, input_key: int | str) -> Any:
        """The input mixed (an input with nothing to mix is refused with the way out)."""
        mixed, count = self.mix(x, None, f"the input at input_key={input_key!r}")
        if count == 0:
            check_input(x, self.rows, input_key)
        return mixed

    def place_box(self, h: Any, where: str, targets: TargetMixer) -> MixDecision:
        """Place the batch's box on ``h`` (the input, or the output of layer ``where``), which
        fixes lam for the targets: the decision is replaced and, at a hidden layer, the targets
        are rewritten in place (training_step holds them)."""
        assert self.decision is not None
        policy, box, lam = self.decision.policy.place(h, where)
        decision = self.decision = self.decision.with_box(box, lam, policy)
        if self.target is not None:
            targets.correct(
                self.target, self.original, decision.lam, self.partner, policy.targets, box
            )
        if self.record is not None:
            self.record = (self.record[0], lam)
        return decision

    def mix_like(self, t: Tensor) -> Tensor:
        """``t`` mixed as the batch's targets (see ``ManifoldMixupCallback.mix_like``)."""
        decision = self.decision
        if decision is None:
            return t
        if (
            not isinstance(t, Tensor)
            or not t.is_floating_point()
            or t.ndim == 0
            or t.shape[0] != self.rows
        ):
            raise ValueError(
                f"ManifoldMixupCallback.mix_like needs a float tensor of {self.rows} rows (the "
                f"batch's), got {describe(t)}."
            )
        policy = decision.policy
        if policy.targets == "keep":
            return t
        if policy.boxed and decision.box is None:
            raise RuntimeError(
                f"ManifoldMixupCallback.mix_like: this {type(policy).__name__} batch is boxed at "
                f"layer {decision.layer!r}, whose box is placed when it runs; call mix_like "
                "after the model's forward."
            )
        if policy.targets == "paste" and decision.box is not None and t.ndim >= 3:
            return decision.box.paste(t, self.partner(t))
        return mix_with_partner(t, self.partner(t), decision.lam, overwrite_partner=True)
