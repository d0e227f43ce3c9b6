"""Reading and rewriting the input and target of a training batch, in place."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, MutableMapping, MutableSequence, Sequence
from typing import Any

from torch import Tensor

from lightning_manifold_mixup._lightning import pl
from lightning_manifold_mixup.hf import check_input_mixable
from lightning_manifold_mixup.layout import describe, map_batch
from lightning_manifold_mixup.mixin import ManifoldMixupMixin, is_dataclass_batch
from lightning_manifold_mixup.policies import Box, MixPolicy


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


def batch_size_of(x: Any) -> int:
    if isinstance(x, Tensor):
        if x.ndim == 0:
            raise ValueError("the batch input is a 0-d tensor; it needs a batch dimension")
        return int(x.shape[0])
    if isinstance(x, Mapping):
        for value in x.values():
            return batch_size_of(value)
    if isinstance(x, (list, tuple)) and x:
        return batch_size_of(x[0])
    raise ValueError(f"cannot find the batch size of the input: got {describe(x)}")


def check_input(x: Any, rows: int, input_key: int | str) -> None:
    """Input mixup needs a floating-point tensor to mix (token ids get the way out) and no
    batch tensor beside it that cannot be mixed (``map_batch`` refuses those)."""
    check_input_mixable(x, input_key)
    map_batch(x, lambda t: t, rows, where=f"the input at input_key={input_key!r}")


@dataclasses.dataclass
class InFlight:
    """The training batch between its start and its end: what later hooks need of it."""

    original: Tensor  # the target as the batch brought it
    rows: int  # local batch size
    clean_input: Any = None  # the input as the batch brought it (before input mixup)
    target: Any = None  # the mixed target handed to training_step
    policy: MixPolicy | None = None  # how this batch mixes (None: not mixed)
    record: tuple[int, float] | None = None  # (layer position, lam) to count at the end
    box: Box | None = None  # the CutMix box, once placed (on the input or the hidden layer)
