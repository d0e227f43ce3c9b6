"""Owns where the batch sits in a layer's output or the input: the one container walker and
the batch-axis rules.

A layer's output may be a tensor or any nesting of tuples, lists, named tuples and mappings;
each tensor holding the batch is handed to a function along its own batch axis. The axis comes
from the module: a rule registered for its type (:data:`LAYOUT_RULES`: RNNs and
``nn.MultiheadAttention``), else its declared ``batch_first`` (:func:`batch_first_of`), else 0.
Plain torch, no Lightning import.

Example:
    >>> import torch
    >>> out = (torch.ones(2, 3), {"aux": torch.zeros(2)})
    >>> _, count = map_nested(out, lambda h: h * 2, batch_size=2)
    >>> count
    2
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from lightning_manifold_mixup.layers import unwrap_module

Leaf = Callable[[Tensor, str], tuple[Tensor, int]]


def walk(
    obj: Any, leaf: Leaf, path: str = "", refuse_packed: Callable[[str], Exception] | None = None
) -> tuple[Any, int]:
    """Rebuild ``obj`` with ``leaf(tensor, path)`` applied to every tensor; sum the counts.

    Containers are visited in iteration order (so ``leaf`` may run collectives); ``path``
    spells where a tensor sits, e.g. ``[1][0]`` or ``['ids']``. ``refuse_packed(path)`` gives
    the error for a ``PackedSequence`` (otherwise walked as the named tuple it is).
    """
    if isinstance(obj, Tensor):
        return leaf(obj, path)
    if refuse_packed is not None and isinstance(obj, PackedSequence):
        raise refuse_packed(path)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        parts = [
            walk(v, leaf, f"{path}.{f}", refuse_packed)
            for f, v in zip(obj._fields, obj, strict=True)
        ]
        return type(obj)(*(p[0] for p in parts)), sum(p[1] for p in parts)
    if isinstance(obj, (tuple, list)):
        parts = [walk(v, leaf, f"{path}[{i}]", refuse_packed) for i, v in enumerate(obj)]
        return type(obj)(p[0] for p in parts), sum(p[1] for p in parts)
    if isinstance(obj, Mapping):
        mixed = {k: walk(v, leaf, f"{path}[{k!r}]", refuse_packed) for k, v in obj.items()}
        out = dict(obj)
        out.update({k: v[0] for k, v in mixed.items()})
        rebuilt: Any = out
        with contextlib.suppress(TypeError):  # keeps OrderedDict and ModelOutput-like types
            rebuilt = type(obj)(out)  # type: ignore[call-arg]
        return rebuilt, sum(v[1] for v in mixed.values())
    return obj, 0


def tensors(obj: Any) -> list[Tensor]:
    """Every tensor in ``obj`` (a tensor or any nesting of containers), in the walk's order.

    Example:
        >>> import torch
        >>> [t.shape[0] for t in tensors({"a": torch.ones(2), "b": [torch.zeros(3)]})]
        [2, 3]
    """
    found: list[Tensor] = []

    def leaf(t: Tensor, path: str) -> tuple[Tensor, int]:
        found.append(t)
        return t, 0

    walk(obj, leaf)
    return found


def batch_size_of(x: Any) -> int:
    """The batch size of an input: the first dimension of its first tensor."""
    first = x if isinstance(x, Tensor) else next(iter(tensors(x)), None)
    if first is None:
        raise ValueError(f"cannot find the batch size of the input: got {describe(x)}")
    if first.ndim == 0:
        raise ValueError("the batch input is a 0-d tensor; it needs a batch dimension")
    return int(first.shape[0])


def map_nested(obj: Any, fn: Callable[[Tensor], Tensor], batch_size: int) -> tuple[Any, int]:
    """Apply ``fn`` to every floating tensor in ``obj`` whose first dimension is ``batch_size``.

    ``obj`` may be a tensor or any nesting of tuples, lists, named tuples and mappings. Other
    leaves are returned unchanged. Leaves are visited in a fixed order (containers in iteration
    order), so ``fn`` may run collectives. :func:`map_batch` is the checked variant the
    callback uses for layer outputs and inputs.

    Returns:
        The new structure (same container types) and the number of tensors ``fn`` was applied to.
    """

    def leaf(h: Tensor, path: str) -> tuple[Tensor, int]:
        if h.is_floating_point() and h.ndim >= 1 and h.shape[0] == batch_size:
            return fn(h), 1
        return h, 0

    return walk(obj, leaf)


def batch_first_of(module: nn.Module) -> bool | None:
    """Whether ``module``'s outputs put the batch on axis 0 (True) or 1 (False); None: unknown.

    Read from ``batch_first`` (RNNs, ``MultiheadAttention``, ``Transformer`` and custom modules
    following that convention), from the attention of transformer layers and stacks, and from
    the last element of a plain ``nn.Sequential``. Wrappers (compile, checkpointing) are looked
    through.

    Example:
        >>> batch_first_of(nn.TransformerEncoderLayer(8, 2))
        False
        >>> batch_first_of(nn.Sequential(nn.Linear(3, 8), nn.LSTM(8, 8, batch_first=True)))
        True
        >>> batch_first_of(nn.Linear(3, 8)) is None
        True
    """
    module = unwrap_module(module)
    if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return bool(module.self_attn.batch_first)
    if isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder)):
        return batch_first_of(module.layers[0]) if len(module.layers) else None
    if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
        return batch_first_of(module[-1]) if len(module) else None
    value = getattr(module, "batch_first", None)
    return value if isinstance(value, bool) else None


def is_batch_major(module: nn.Module) -> bool:
    """Whether every tensor ``module`` returns holds the batch on axis 0, as far as its type
    and :func:`batch_first_of` tell (RNN and attention layouts are not: they need the walk)."""
    inner = unwrap_module(module)
    if isinstance(inner, (nn.RNNBase, nn.MultiheadAttention)):
        return False
    return batch_first_of(inner) is not False


def map_batch(
    obj: Any,
    fn: Callable[[Tensor], Tensor],
    batch_size: int,
    *,
    where: str,
    module: nn.Module | None = None,
) -> tuple[Any, int]:
    """Apply ``fn`` to every tensor of ``obj`` that holds the batch, along its batch axis.

    ``fn`` maps a ``(B, ...)`` tensor to one of the same shape and dtype (a mix along dim 0);
    a tensor whose batch axis is 1 is handed to it with that axis moved to dim 0, and moved
    back. ``obj`` is the output of the layer ``module``, or the batch input (``module=None``):
    a tensor or any nesting of tuples, lists, named tuples and mappings. ``where`` names it in
    errors (``"layer 'net.rnn'"``, ``"the input at input_key=0"``).

    Batch axes:

    - ``nn.RNN``, ``nn.LSTM``, ``nn.GRU`` return ``(output, h_n)`` or
      ``(output, (h_n, c_n))``: ``output`` is ``(B, T, H)`` with ``batch_first`` and
      ``(T, B, H)`` without; ``h_n`` and ``c_n`` are ``(num_layers * directions, B, H)``.
    - ``nn.MultiheadAttention`` returns ``(attn_output, attn_weights)``: the output as
      ``batch_first`` says, the weights ``(B, [heads,] L, S)`` on axis 0.
    - Modules for which :func:`batch_first_of` is known (transformer layers and stacks, custom
      modules with a ``batch_first`` attribute): axis 0 or 1 for every tensor.
    - Any other module, and the input: axis 0.

    A tensor whose batch axis does not have ``batch_size`` rows, and that has them on no other
    of axes 0 and 1, does not hold the batch and is returned unchanged (like non-tensor leaves).

    Raises:
        ValueError: a tensor holds the batch but is not floating point (it cannot be mixed and
            skipping it would leave it unmixed); a tensor has ``batch_size`` rows on the other
            of axes 0 and 1 only (its batch axis is ambiguous: a time-major tensor where the
            batch should come first, or the reverse); an RNN or attention output that is not
            batched as its layout says; a ``PackedSequence``. With ``batch_size == 1`` every
            tensor is its own mix: only the RNN and attention layouts are checked.

    Returns:
        The new structure (same container types) and how many tensors ``fn`` was applied to.

    Example:
        >>> import torch
        >>> lstm = nn.LSTM(2, 3, num_layers=4)  # time-major output (T, B, H), h_n (4, B, H)
        >>> out = lstm(torch.randn(5, 2, 2))
        >>> _, count = map_batch(out, lambda h: h.flip(0), 2, where="layer 'rnn'", module=lstm)
        >>> count
        3
    """
    if module is not None:
        module = unwrap_module(module)
    site = Site(where, module, batch_size, fn)
    if module is not None and isinstance(obj, tuple) and len(obj) == 2:
        for kind, rule in LAYOUT_RULES.items():
            if isinstance(module, kind):
                return rule(site, obj)
    declared = None if module is None else batch_first_of(module)
    axis = 0 if declared is None or declared else 1
    check = batch_size > 1

    def leaf(h: Tensor, path: str) -> tuple[Tensor, int]:
        other = 1 - axis
        if h.ndim > axis and h.shape[axis] == batch_size:
            if h.is_floating_point():
                return _along(h, axis, fn), 1
            if check:
                raise site.not_floating(h, path)
            return h, 0
        if check and h.ndim > other and h.shape[other] == batch_size:
            raise site.ambiguous(h, path, axis, declared)
        return h, 0

    return walk(obj, leaf, refuse_packed=site.packed)


def _along(h: Tensor, axis: int, fn: Callable[[Tensor], Tensor]) -> Tensor:
    return fn(h) if axis == 0 else fn(h.movedim(axis, 0)).movedim(0, axis)


@dataclass(frozen=True)
class Site:
    """Where a walk is: what it maps (``fn`` over ``batch_size`` rows), the module whose output
    it is (None: the batch input) and how errors name it (``where``)."""

    where: str
    module: nn.Module | None
    batch_size: int
    fn: Callable[[Tensor], Tensor]

    def strict(self, h: Any, path: str, axis: int, ndims: tuple[int, ...]) -> tuple[Tensor, int]:
        """``fn`` along ``axis`` of a tensor of a known layout, or an error saying why it does
        not fit."""
        module = self.module
        if not isinstance(h, Tensor) or h.ndim not in ndims or h.shape[axis] != self.batch_size:
            got = f"shape {tuple(h.shape)}" if isinstance(h, Tensor) else f"a {type(h).__name__}"
            dims = " or ".join(f"{n}-d" for n in ndims)
            raise ValueError(
                f"{self.where} ({type(module).__name__}) returned {got} at output{path}, where "
                f"its layout puts the batch of {self.batch_size} on axis {axis} of a {dims} "
                f"tensor. Feed it batched input in the layout its "
                f"batch_first={getattr(module, 'batch_first', None)} says, or choose another "
                "layer."
            )
        if not h.is_floating_point():
            raise self.not_floating(h, path)
        return _along(h, axis, self.fn), 1

    def packed(self, path: str) -> ValueError:
        at = (
            f"{self.where}{path} is"
            if self.module is None
            else f"{self.where} returned, at output{path},"
        )
        return ValueError(
            f"{at} a PackedSequence: its rows are time steps of the "
            "length-sorted sequences, with no batch axis to mix. Mix a layer that returns padded "
            "tensors instead (after torch.nn.utils.rnn.pad_packed_sequence, e.g. a module that "
            "unpacks the RNN output), or the input before packing."
        )

    def not_floating(self, h: Tensor, path: str) -> ValueError:
        held = f"a {h.dtype} tensor of shape {tuple(h.shape)}"
        where, batch_size = self.where, self.batch_size
        if self.module is None:
            return ValueError(
                f"input mixup needs a floating-point input: {where}{path} is {held}, which holds "
                f"the batch of {batch_size} but cannot be mixed (mixing needs floating point), "
                "and leaving it unmixed would pair it with mixed features. Remove 'input' from "
                "layers for integer inputs (token ids, lengths) and mix a hidden layer instead "
                "(e.g. the embedding's output), or move such tensors out of the input into "
                "another key of the batch."
            )
        at = f" at output{path}" if path else ""
        return ValueError(
            f"{where} returned {held}{at}, which holds the batch of {batch_size} but no "
            "floating values to mix (mixing needs floating point), and leaving it unmixed would "
            "pair it with mixed features. Choose a layer whose output holds only floating batch "
            "tensors (e.g. the module that consumes it)."
        )

    def ambiguous(self, h: Tensor, path: str, axis: int, declared: bool | None) -> ValueError:
        other, shape, where, batch_size = 1 - axis, tuple(h.shape), self.where, self.batch_size
        if self.module is None:
            return ValueError(
                f"{where}{path} has shape {shape}: the batch of {batch_size} is on axis {other}, "
                f"not axis 0, so its batch axis is ambiguous. Input mixup mixes along axis 0: "
                "make the input batch-major (B, ...), or remove 'input' from layers."
            )
        said = (
            f"declares batch_first={declared}"
            if declared is not None
            else "declares no batch_first, so its outputs are taken as batch-major (B, ...)"
        )
        return ValueError(
            f"{where} ({type(self.module).__name__}) {said}, but its output{path} has shape "
            f"{shape}, with the batch of {batch_size} on axis {other} and not on axis {axis}: "
            "the batch axis is ambiguous and is never guessed. Give the module a batch_first "
            "attribute (True for (B, T, ...) outputs, False for (T, B, ...)), or choose a layer "
            "with batch-major outputs."
        )


def _map_rnn(site: Site, output: tuple[Any, Any]) -> tuple[Any, int]:
    seq, state = output
    if isinstance(seq, PackedSequence):
        raise site.packed("[0]")
    axis = 0 if getattr(site.module, "batch_first", False) else 1
    seq, count = site.strict(seq, "[0]", axis, (3,))
    if isinstance(state, tuple):  # LSTM: (h_n, c_n)
        parts = [site.strict(t, f"[1][{i}]", 1, (3,)) for i, t in enumerate(state)]
        return (seq, tuple(p[0] for p in parts)), count + sum(p[1] for p in parts)
    state, more = site.strict(state, "[1]", 1, (3,))
    return (seq, state), count + more


def _map_attention(site: Site, output: tuple[Any, Any]) -> tuple[Any, int]:
    attn, weights = output
    axis = 0 if getattr(site.module, "batch_first", False) else 1
    attn, count = site.strict(attn, "[0]", axis, (3,))
    if weights is not None:  # (B, L, S), or (B, heads, L, S) when not averaged
        weights, more = site.strict(weights, "[1]", 0, (3, 4))
        count += more
    return (attn, weights), count


def describe(obj: Any) -> str:
    """How an error names an object: a tensor's dtype and shape, else its type."""
    if isinstance(obj, Tensor):
        return f"a {obj.dtype} tensor of shape {tuple(obj.shape)}"
    return f"a {type(obj).__name__}"


LayoutRule = Callable[[Site, tuple[Any, Any]], tuple[Any, int]]

# Module types whose two-element outputs have a fixed layout, each with the rule that maps the
# batch function over it (strictly: a tensor off its layout is an error, never skipped). A new
# model family with such a layout is one entry here.
LAYOUT_RULES: dict[type[nn.Module], LayoutRule] = {
    nn.RNNBase: _map_rnn,
    nn.MultiheadAttention: _map_attention,
}
