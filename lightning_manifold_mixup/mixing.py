"""The mixing math of Manifold Mixup, in plain torch (no Lightning import).

For a batch ``h`` of shape ``(B, ...)``, a mixing coefficient ``lam`` and a permutation
``index`` of ``range(B)``, the mixed batch is ``lam * h + (1 - lam) * h[index]``
(Verma et al., ICML 2019, eq. 2). Targets are mixed the same way, with integer class labels
first turned into one-hot rows.

Example:
    >>> import torch
    >>> h = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> mix_tensor(h, torch.tensor(0.75), torch.tensor([1, 0]))
    tensor([[0.7500, 0.2500],
            [0.2500, 0.7500]])
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from lightning_manifold_mixup.layers import unwrap_module

LamMode = Literal["batch", "sample"]


class MixedTarget(NamedTuple):
    """Targets kept as a pair of class-index tensors and their weight (the "pair" form).

    Stands for the soft target ``lam * one_hot(y_a) + (1 - lam) * one_hot(y_b)`` without
    materialising a ``(B, C)`` matrix. ``y_a`` and ``y_b`` are ``(B,)`` int64, ``lam`` is a
    float32 tensor of shape ``()`` or ``(B,)``.
    """

    y_a: Tensor
    y_b: Tensor
    lam: Tensor


@dataclass(frozen=True)
class MixDecision:
    """What is mixed in one training batch.

    Attributes:
        layer: name of the mixed layer, ``"input"`` for input mixup.
        layer_index: position of ``layer`` in the eligible set.
        index: ``(B,)`` int64; row ``i`` is mixed with row ``index[i]``. With
            ``pairing="local"`` (or a single process) a permutation of ``range(B)``; with
            ``pairing="global"`` in a distributed run, indices into the global batch (every
            rank's ``B`` rows concatenated in rank order, ``world_size * B`` rows), drawn from
            one permutation shared by all ranks.
        host_lam: the drawn lam on the host, float32, shape ``()`` or ``(B,)``.
        device: where ``lam`` lives.
        box_center: for CutMix batches, the box centre as fractions of (H, W); else None.
            ``lam`` is then the kept area fraction, set when the layer's size is known.
        lam: float32 tensor on ``device``, shape ``()`` (``lam_mode="batch"``) or ``(B,)``
            (``"sample"``); made on first use (the default path never needs it).
        weight: lam as a Python number when one lam holds for the whole batch and is final
            (no CutMix); None otherwise. Operations take it as an argument, so it needs no
            tensor and no copy to the device.
    """

    layer: str
    layer_index: int
    index: Tensor
    box_center: tuple[float, float] | None = None
    host_lam: np.ndarray = field(kw_only=True, compare=False)
    device: torch.device = field(kw_only=True, compare=False)

    @functools.cached_property
    def lam(self) -> Tensor:
        if self.host_lam.ndim == 0:  # a fill on the device: no copy from the host
            return lam_tensor(float(self.host_lam), self.device)
        return host_to_device(self.host_lam, self.device)

    @property
    def lam_arg(self) -> Tensor | float:
        """lam in the cheapest form the mixing functions take: ``weight`` if there is one.

        Under ``torch.compile`` the tensor: a number would be a constant of the traced graph,
        so every new lam would compile a new one.
        """
        if torch.compiler.is_compiling() or "lam" in self.__dict__:
            return self.lam  # made already (for a compiled forward): one form per batch
        weight = self.weight
        return self.lam if weight is None else weight

    @functools.cached_property
    def weight(self) -> float | None:
        if self.host_lam.ndim or self.box_center is not None:
            return None
        return float(self.host_lam)


def host_to_device(array: np.ndarray, device: torch.device) -> Tensor:
    """A host array on ``device`` without a synchronising copy: through pinned memory on CUDA
    (the caching host allocator keeps the buffer until the copy has run)."""
    t = torch.from_numpy(array)
    if device.type == "cpu":
        return t
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


class Draw(NamedTuple):
    """The host-side random draws for one batch (see :func:`sample_decision`)."""

    layer: int
    lam: np.ndarray
    perm: np.ndarray
    cutmix: bool
    box_center: tuple[float, float]


def sample_decision(
    rng: np.random.Generator,
    *,
    batch_size: int,
    num_layers: int,
    alpha: float,
    probability: float,
    lam_mode: LamMode,
    layer_weights: np.ndarray | None = None,
    cutmix_prob: float = 0.0,
    fixed_lam: float | None = None,
    lam_transform: str = "none",
    rows: slice | None = None,
) -> Draw | None:
    """Draw the layer, lam, permutation and CutMix choice for one batch; None if unmixed.

    Draws happen on the host from ``rng`` in a fixed order, whatever the outcome, so the same
    generator state always gives the same decision. ``lam`` has shape ``()`` or
    ``(batch_size,)``; ``layer_weights`` (summing to 1) replaces the uniform layer choice.
    ``alpha <= 0`` means no mixing for this batch (a schedule at zero). Then ``fixed_lam``
    replaces every lam, ``lam_transform="max"`` maps lam to ``max(lam, 1 - lam)``, and ``rows``
    keeps a slice of the permutation (and of a per-row lam): a rank's rows of a draw over the
    global batch.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> d = sample_decision(
        ...     rng, batch_size=4, num_layers=3, alpha=2.0, probability=1.0, lam_mode="batch")
        >>> 0 <= d.layer < 3, 0.0 <= float(d.lam) <= 1.0, sorted(d.perm.tolist())
        (True, True, [0, 1, 2, 3])
    """
    u = rng.random()
    if layer_weights is None:
        k = int(rng.integers(num_layers))
    else:
        k = min(
            int(np.searchsorted(np.cumsum(layer_weights), rng.random(), "right")), num_layers - 1
        )
    size = batch_size if lam_mode == "sample" else None
    lam = rng.beta(alpha, alpha, size=size) if alpha > 0 else np.ones(size or ())
    index = rng.permutation(batch_size)
    cut_u, cy, cx = rng.random(3)
    if u >= probability or alpha <= 0:
        return None
    lam = np.asarray(lam, dtype=np.float32)
    if rows is not None:
        index = index[rows]
        lam = lam[rows] if lam.ndim else lam
    if fixed_lam is not None:
        lam = np.full_like(lam, fixed_lam)
    if lam_transform == "max":
        lam = np.asarray(np.maximum(lam, 1.0 - lam), dtype=np.float32)
    return Draw(k, lam, index, bool(cut_u < cutmix_prob), (cy, cx))


def cutmix_box(
    height: int, width: int, lam: float, center: tuple[float, float]
) -> tuple[int, int, int, int]:
    """The box ``(y0, y1, x0, x1)`` of area about ``(1 - lam) * H * W`` around ``center``.

    ``center`` holds fractions of the height and width; the box is clipped to the image, so
    the pasted area can be smaller than asked: use :func:`cutmix_lam` for the true weight.

    Example:
        >>> cutmix_box(8, 8, 0.75, (0.5, 0.5))
        (2, 6, 2, 6)
    """
    ratio = float(np.sqrt(1.0 - lam))
    cut_h, cut_w = round(height * ratio), round(width * ratio)
    cy, cx = int(center[0] * height), int(center[1] * width)
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h - cut_h // 2, height)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w - cut_w // 2, width)
    return y0, y1, x0, x1


def cutmix_lam(height: int, width: int, box: tuple[int, int, int, int]) -> float:
    """Weight of the original sample: ``1 - pasted area / (H * W)``."""
    y0, y1, x0, x1 = box
    return 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)


def cutmix_tensor(h: Tensor, index: Tensor, box: tuple[int, int, int, int]) -> Tensor:
    """``h`` with the box ``(y0, y1, x0, x1)`` of its last two dims pasted from ``h[index]``.

    Args:
        h: ``(B, C, H, W)`` (any floating dtype; any rank >= 3 works on the last two dims).
        index: ``(B,)`` permutation.
    """
    if h.ndim < 3:
        raise ValueError(
            f"CutMix needs a (B, C, H, W) tensor, got shape {tuple(h.shape)}; use blending "
            "(cutmix_prob=0) for layers without spatial dimensions"
        )
    y0, y1, x0, x1 = box
    out = h.clone()
    out[..., y0:y1, x0:x1] = permute_rows(h, index)[..., y0:y1, x0:x1]
    return out


class _PermuteRows(torch.autograd.Function):
    """``x[index]`` for a permutation ``index``, with a gather (not a scatter-add) backward.

    The gradient of a row permutation is the inverse permutation of the gradient; on the CPU a
    gather computes it faster than the scatter-add autograd uses for ``x[index]`` once the
    tensor is not tiny (about 1.5x at 32k elements, 2x from 128k; one core).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, index: Tensor) -> Tensor:
        ctx.save_for_backward(index)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (index,) = ctx.saved_tensors
        arange = torch.arange(index.shape[0], device=index.device, dtype=index.dtype)
        inverse = torch.empty_like(index).scatter_(0, index, arange)
        return grad.index_select(0, inverse), None


# Below this many elements a custom autograd function costs more host time than its gather
# backward saves (CPU, one core); on accelerators the scatter-add backward is as fast.
_GATHER_BACKWARD_MIN = 16384


def permute_rows(x: Tensor, index: Tensor) -> Tensor:
    """``x[index]`` along dim 0 for a permutation ``index``.

    The backward is exact and deterministic on every device (each row receives exactly one
    gradient row); large CPU tensors take a gather backward (:class:`_PermuteRows`).

    Example:
        >>> permute_rows(torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([2, 0, 1]))
        tensor([[3.],
                [1.],
                [2.]])
    """
    index = index.to(x.device)
    if x.requires_grad and x.device.type == "cpu" and x.numel() >= _GATHER_BACKWARD_MIN:
        out: Tensor = _PermuteRows.apply(x, index)
        return out
    return x.index_select(0, index)


def _lam_like(lam: Tensor, h: Tensor) -> Tensor:
    """``lam`` on ``h``'s device, shaped to broadcast over ``h`` (still float32)."""
    lam = lam.to(device=h.device)
    if lam.ndim == 1:
        lam = lam.view(lam.shape[0], *([1] * (h.ndim - 1)))
    return lam


def mix_with_partner(
    h: Tensor, partner: Tensor, lam: Tensor | float, *, overwrite_partner: bool = False
) -> Tensor:
    """Return ``lam * h + (1 - lam) * partner``, the one place the mixing formula lives.

    Args:
        h: ``(B, ...)`` floating tensor of any rank.
        partner: the rows ``h`` is mixed with, same shape and dtype as ``h`` (``h[index]`` for
            local pairing, rows gathered from every rank for global pairing).
        lam: a Python number, or a float tensor of shape ``()`` or ``(B,)``; a ``(B,)`` lam is
            broadcast over every non-batch dimension. A number costs no tensor operation of
            its own (the operations take it as an argument).
        overwrite_partner: ``partner`` is a fresh tensor nobody else reads (the output of an
            ``index_select``) and may be reused for the result, saving one transient tensor.

    Returns:
        A tensor with the shape, dtype and device of ``h``. In float32/float64 it is the
        formula above, operation for operation, with lam and ``1 - lam`` rounded to float32
        (a number gives the same values as a float32 tensor holding it). In float16/bfloat16
        it is ``torch.lerp``, which evaluates the same convex combination in float32
        internally (with lam rounded to ``h``'s dtype first): float16
        values up to the float16 maximum never overflow to inf, which the formula in float16
        can do when the two rounded weights sum to slightly more than 1.

    Example:
        >>> mix_with_partner(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), 0.75)
        tensor([[0.7500, 0.2500]])
    """
    if not h.is_floating_point():
        raise TypeError(f"cannot mix a tensor of dtype {h.dtype}: mixing needs floating point")
    if partner.shape != h.shape or partner.dtype != h.dtype:
        raise ValueError(
            f"partner must match h: got {partner.dtype} {tuple(partner.shape)} for h "
            f"{h.dtype} {tuple(h.shape)}"
        )
    own: Tensor | float
    other: Tensor | float
    if isinstance(lam, Tensor):
        lam = _lam_like(lam, h)
        if h.element_size() < 4:
            return torch.lerp(partner, h, lam.to(h.dtype))
        own, other = lam.to(h.dtype), (1.0 - lam).to(h.dtype)
    else:
        if h.element_size() < 4:  # lam rounded to h's dtype, as a tensor lam is
            return torch.lerp(partner, h, torch.tensor(lam).to(h.dtype).item())
        # float32 rounding of both weights, as a float32 lam tensor gives.
        own, other = float(np.float32(lam)), float(np.float32(1.0) - np.float32(lam))
    # Scaling the partner first and adding in place keeps one transient tensor instead of
    # three; addition commutes, so this is the formula's value bit for bit.
    out = partner.mul_(other) if overwrite_partner else partner * other
    return out.add_(h * own)


def mix_tensor(h: Tensor, lam: Tensor | float, index: Tensor) -> Tensor:
    """Return ``lam * h + (1 - lam) * h[index]`` (see :func:`mix_with_partner`).

    Args:
        h: ``(B, ...)`` floating tensor of any rank.
        lam: a Python number, or a float tensor of shape ``()`` or ``(B,)``; a ``(B,)`` lam is
            broadcast over every non-batch dimension.
        index: ``(B,)`` int64 permutation.
    """
    return mix_with_partner(h, permute_rows(h, index), lam, overwrite_partner=True)


Leaf = Callable[[Tensor, str], tuple[Tensor, int]]


def _walk(
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
            _walk(v, leaf, f"{path}.{f}", refuse_packed)
            for f, v in zip(obj._fields, obj, strict=True)
        ]
        return type(obj)(*(p[0] for p in parts)), sum(p[1] for p in parts)
    if isinstance(obj, (tuple, list)):
        parts = [_walk(v, leaf, f"{path}[{i}]", refuse_packed) for i, v in enumerate(obj)]
        return type(obj)(p[0] for p in parts), sum(p[1] for p in parts)
    if isinstance(obj, Mapping):
        mixed = {k: _walk(v, leaf, f"{path}[{k!r}]", refuse_packed) for k, v in obj.items()}
        out = dict(obj)
        out.update({k: v[0] for k, v in mixed.items()})
        rebuilt: Any = out
        with contextlib.suppress(TypeError):  # keeps OrderedDict and ModelOutput-like types
            rebuilt = type(obj)(out)  # type: ignore[call-arg]
        return rebuilt, sum(v[1] for v in mixed.values())
    return obj, 0


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

    return _walk(obj, leaf)


def mix_nested(obj: Any, lam: Tensor, index: Tensor, batch_size: int) -> tuple[Any, int]:
    """Mix every floating tensor in ``obj`` whose first dimension is ``batch_size``.

    ``obj`` may be a tensor or any nesting of tuples, lists, named tuples and mappings (a
    layer's output, a batch's input). Other leaves are returned unchanged.

    Returns:
        The mixed structure (same container types) and the number of tensors mixed.
    """
    return map_nested(obj, lambda h: mix_tensor(h, lam, index), batch_size)


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
        >>> lstm = nn.LSTM(2, 3, num_layers=4)  # time-major output (T, B, H), h_n (4, B, H)
        >>> out = lstm(torch.randn(5, 2, 2))
        >>> _, count = map_batch(out, lambda h: h.flip(0), 2, where="layer 'rnn'", module=lstm)
        >>> count
        3
    """
    check = batch_size > 1
    if module is not None:
        module = unwrap_module(module)
        pair = isinstance(obj, tuple) and len(obj) == 2
        if isinstance(module, nn.RNNBase) and pair:
            return _map_rnn(module, obj, fn, batch_size, where)
        if isinstance(module, nn.MultiheadAttention) and pair:
            attn, weights = obj
            axis = 0 if module.batch_first else 1
            attn, count = _strict(attn, "[0]", axis, (3,), fn, batch_size, where, module)
            if weights is not None:  # (B, L, S), or (B, heads, L, S) when not averaged
                weights, more = _strict(weights, "[1]", 0, (3, 4), fn, batch_size, where, module)
                count += more
            return (attn, weights), count
    declared = None if module is None else batch_first_of(module)
    axis = 0 if declared is None or declared else 1

    def leaf(h: Tensor, path: str) -> tuple[Tensor, int]:
        other = 1 - axis
        if h.ndim > axis and h.shape[axis] == batch_size:
            if h.is_floating_point():
                return _along(h, axis, fn), 1
            if check:
                raise _not_floating_error(h, path, batch_size, where, module)
            return h, 0
        if check and h.ndim > other and h.shape[other] == batch_size:
            raise _ambiguous_error(h, path, axis, batch_size, where, module, declared)
        return h, 0

    return _walk(obj, leaf, refuse_packed=lambda path: _packed_error(path, where, module))


def mix_batch(
    obj: Any,
    lam: Tensor | float,
    index: Tensor,
    batch_size: int,
    *,
    where: str,
    module: nn.Module | None = None,
    batch_major: bool = False,
) -> tuple[Any, int]:
    """:func:`map_batch` with the mix ``lam * h + (1 - lam) * h[index]`` along each batch axis.

    ``lam`` is ``()`` or ``(B,)`` (broadcast over the other axes of each tensor), ``index`` is
    the ``(B,)`` permutation (``lam`` may also be a Python number, see
    :func:`mix_with_partner`). ``batch_major=True`` says ``module`` is known to put the batch
    on axis 0 (:func:`is_batch_major`), so a tensor output is mixed without the layout walk.
    Returns the mixed structure and how many tensors were mixed.
    """
    if (
        (module is None or batch_major)
        and isinstance(obj, Tensor)
        and obj.ndim
        and obj.shape[0] == batch_size
        and obj.is_floating_point()
    ):
        return mix_tensor(obj, lam, index), 1  # the common case, without the generic walk
    return map_batch(
        obj, lambda h: mix_tensor(h, lam, index), batch_size, where=where, module=module
    )


def _along(h: Tensor, axis: int, fn: Callable[[Tensor], Tensor]) -> Tensor:
    return fn(h) if axis == 0 else fn(h.movedim(axis, 0)).movedim(0, axis)


def _map_rnn(
    module: nn.RNNBase,
    output: tuple[Any, Any],
    fn: Callable[[Tensor], Tensor],
    batch_size: int,
    where: str,
) -> tuple[Any, int]:
    seq, state = output
    if isinstance(seq, PackedSequence):
        raise _packed_error("[0]", where, module)
    axis = 0 if module.batch_first else 1
    seq, count = _strict(seq, "[0]", axis, (3,), fn, batch_size, where, module)
    if isinstance(state, tuple):  # LSTM: (h_n, c_n)
        parts = [
            _strict(t, f"[1][{i}]", 1, (3,), fn, batch_size, where, module)
            for i, t in enumerate(state)
        ]
        return (seq, tuple(p[0] for p in parts)), count + sum(p[1] for p in parts)
    state, more = _strict(state, "[1]", 1, (3,), fn, batch_size, where, module)
    return (seq, state), count + more


def _strict(
    h: Any,
    path: str,
    axis: int,
    ndims: tuple[int, ...],
    fn: Callable[[Tensor], Tensor],
    batch_size: int,
    where: str,
    module: nn.Module,
) -> tuple[Tensor, int]:
    """Apply ``fn`` along ``axis`` of a tensor of a known layout, or say why it does not fit."""
    if not isinstance(h, Tensor) or h.ndim not in ndims or h.shape[axis] != batch_size:
        got = f"shape {tuple(h.shape)}" if isinstance(h, Tensor) else f"a {type(h).__name__}"
        dims = " or ".join(f"{n}-d" for n in ndims)
        raise ValueError(
            f"{where} ({type(module).__name__}) returned {got} at output{path}, where its layout "
            f"puts the batch of {batch_size} on axis {axis} of a {dims} tensor. Feed it "
            f"batched input in the layout its batch_first={getattr(module, 'batch_first', None)} "
            "says, or choose another layer."
        )
    if not h.is_floating_point():
        raise _not_floating_error(h, path, batch_size, where, module)
    return _along(h, axis, fn), 1


def _packed_error(path: str, where: str, module: nn.Module | None) -> ValueError:
    at = f"{where}{path} is" if module is None else f"{where} returned, at output{path},"
    return ValueError(
        f"{at} a PackedSequence: its rows are time steps of the "
        "length-sorted sequences, with no batch axis to mix. Mix a layer that returns padded "
        "tensors instead (after torch.nn.utils.rnn.pad_packed_sequence, e.g. a module that "
        "unpacks the RNN output), or the input before packing."
    )


def _not_floating_error(
    h: Tensor, path: str, batch_size: int, where: str, module: nn.Module | None
) -> ValueError:
    held = f"a {h.dtype} tensor of shape {tuple(h.shape)}"
    if module is None:
        return ValueError(
            f"input mixup needs a floating-point input: {where}{path} is {held}, which holds the "
            f"batch of {batch_size} but cannot be mixed (mixing needs floating point), and "
            "leaving it unmixed would pair it with mixed features. Remove 'input' from layers "
            "for integer inputs (token ids, lengths) and mix a hidden layer instead (e.g. the "
            "embedding's output), or move such tensors out of the input into another key of the "
            "batch."
        )
    at = f" at output{path}" if path else ""
    return ValueError(
        f"{where} returned {held}{at}, which holds the batch of {batch_size} but no "
        "floating values to mix (mixing needs floating point), and leaving it unmixed would "
        "pair it with mixed features. Choose a layer whose output holds only floating batch "
        "tensors (e.g. the module that consumes it)."
    )


def _ambiguous_error(
    h: Tensor,
    path: str,
    axis: int,
    batch_size: int,
    where: str,
    module: nn.Module | None,
    declared: bool | None,
) -> ValueError:
    other = 1 - axis
    shape = tuple(h.shape)
    if module is None:
        return ValueError(
            f"{where}{path} has shape {shape}: the batch of {batch_size} is on axis {other}, "
            f"not axis 0, so its batch axis is ambiguous. Input mixup mixes along axis 0: make "
            "the input batch-major (B, ...), or remove 'input' from layers."
        )
    said = (
        f"declares batch_first={declared}"
        if declared is not None
        else "declares no batch_first, so its outputs are taken as batch-major (B, ...)"
    )
    return ValueError(
        f"{where} ({type(module).__name__}) {said}, but its output{path} has shape {shape}, "
        f"with the batch of {batch_size} on axis {other} and not on axis {axis}: the batch axis "
        "is ambiguous and is never guessed. Give the module a batch_first attribute (True "
        "for (B, T, ...) outputs, False for (T, B, ...)), or choose a layer with batch-major "
        "outputs."
    )


def one_hot_mix(y: Tensor, lam: Tensor, index: Tensor, num_classes: int) -> Tensor:
    """Soft targets ``lam * one_hot(y) + (1 - lam) * one_hot(y[index])``.

    Args:
        y: ``(B,)`` integer class labels in ``[0, num_classes)``.
        lam: float tensor of shape ``()`` or ``(B,)``.
        index: ``(B,)`` int64 permutation.

    Returns:
        ``(B, num_classes)`` float32 soft targets; each row sums to 1.

    Example:
        >>> one_hot_mix(torch.tensor([0, 2]), torch.tensor(0.25), torch.tensor([1, 0]), 3)
        tensor([[0.2500, 0.0000, 0.7500],
                [0.7500, 0.0000, 0.2500]])
    """
    return one_hot_pair(y, y.index_select(0, index.to(y.device)), lam, num_classes)


def one_hot_pair(y_a: Tensor, y_b: Tensor, lam: Tensor, num_classes: int) -> Tensor:
    """Soft targets ``lam * one_hot(y_a) + (1 - lam) * one_hot(y_b)``, float32 ``(B, C)``.

    Example:
        >>> one_hot_pair(torch.tensor([0]), torch.tensor([2]), torch.tensor(0.25), 3)
        tensor([[0.2500, 0.0000, 0.7500]])
    """
    lam = lam.to(device=y_a.device, dtype=torch.float32)
    lam_col = lam.expand(y_a.shape[0]).unsqueeze(1)
    out = torch.zeros(y_a.shape[0], num_classes, dtype=torch.float32, device=y_a.device)
    out.scatter_add_(1, y_a.unsqueeze(1), lam_col)
    out.scatter_add_(1, y_b.to(y_a.device).unsqueeze(1), 1.0 - lam_col)
    return out


def mix_targets(
    y: Tensor,
    lam: Tensor | float,
    index: Tensor,
    *,
    num_classes: int | None = None,
    pair: bool = False,
) -> Tensor | MixedTarget:
    """Mix a batch of targets with the same ``lam`` and ``index`` as the features.

    Integer labels ``(B,)`` become float32 soft targets ``(B, num_classes)`` (or a
    :class:`MixedTarget` with ``pair=True``). Floating targets of any shape ``(B, ...)``
    (one-hot, soft, multi-label, regression) become ``lam * y + (1 - lam) * y[index]`` in
    their own dtype.
    """
    if y.is_floating_point():
        return mix_tensor(y, lam, index)
    return mix_targets_with_partner(
        y, y.index_select(0, index.to(y.device)), lam, num_classes=num_classes, pair=pair
    )


def mix_targets_with_partner(
    y: Tensor,
    y_partner: Tensor,
    lam: Tensor | float,
    *,
    num_classes: int | None = None,
    pair: bool = False,
) -> Tensor | MixedTarget:
    """:func:`mix_targets` with the partner rows given instead of a permutation.

    For pairings a permutation cannot express (partners from other ranks' batches).
    ``y_partner`` has the shape and dtype of ``y``.
    """
    if y.is_floating_point():
        return mix_with_partner(y, y_partner.to(y.device), lam)
    lam = lam_tensor(lam, y.device)
    if pair:
        return MixedTarget(y, y_partner.to(y.device), lam)
    if num_classes is None:
        raise ValueError("integer targets need num_classes to be turned into soft targets")
    return one_hot_pair(y, y_partner, lam, num_classes)


def lam_tensor(lam: Tensor | float, device: torch.device) -> Tensor:
    """lam as a float32 tensor on ``device``; a number becomes one by a fill on the device
    (no copy from the host)."""
    if isinstance(lam, Tensor):
        return lam.to(device=device, dtype=torch.float32)
    return torch.full((), lam, dtype=torch.float32, device=device)
