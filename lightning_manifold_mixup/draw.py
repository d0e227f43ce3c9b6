"""Owns the random draw of one training batch: what it mixes, decided on the host.

:func:`sample_decision` draws a batch's layer, lam, partner permutation and CutMix choice from
a generator in a fixed order; :class:`KeyedStream` gives that generator for any
``(seed, stream, step)`` without replaying earlier batches; :class:`MixDecision` is the draw
as the mixing operations read it, with lam as one float32 tensor on the batch's device, and
:class:`Box` the box of a CutMix or PatchUp batch once placed. Plain numpy and torch.

Example:
    >>> rng = KeyedStream(seed=0).generator(0, 0)
    >>> d = sample_decision(
    ...     rng, batch_size=4, num_layers=2, alpha=2.0, probability=1.0, lam_mode="batch")
    >>> decision = MixDecision.of(d, ["input", "net.1"], torch.device("cpu"))
    >>> decision.lam.dtype, decision.lam.shape, sorted(decision.index.tolist())
    (torch.float32, torch.Size([]), [0, 1, 2, 3])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

LamMode = Literal["batch", "sample"]

_MASK = 2**64 - 1


class Draw(NamedTuple):
    """The host-side random draws for one batch (see :func:`sample_decision`).

    ``lam`` is float32 of shape ``()`` or ``(B,)``; for a CutMix batch it is the lam that sets
    the box's area (the box's kept fraction replaces it once the box is placed).
    """

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
    cutmix_alpha: float | None = None,
) -> Draw | None:
    """Draw the layer, lam, permutation and CutMix choice for one batch; None if unmixed.

    Draws happen on the host from ``rng`` in a fixed order, whatever the outcome, so the same
    generator state always gives the same decision. ``lam`` has shape ``()`` or
    ``(batch_size,)``; ``layer_weights`` (summing to 1) replaces the uniform layer choice.
    ``alpha <= 0`` means no mixing for this batch (a schedule at zero). Then ``fixed_lam``
    replaces every lam, ``lam_transform="max"`` maps lam to ``max(lam, 1 - lam)``, and ``rows``
    keeps a slice of the permutation (and of a per-row lam): a rank's rows of a draw over the
    global batch. A CutMix batch whose ``cutmix_alpha`` differs from ``alpha`` draws its lam
    from ``Beta(cutmix_alpha, cutmix_alpha)`` after every other number, so the draws of other
    batches do not move.

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
    cutmix = bool(cut_u < cutmix_prob)
    if cutmix and cutmix_alpha is not None and cutmix_alpha != alpha:
        lam = rng.beta(cutmix_alpha, cutmix_alpha, size=size)
    lam = np.asarray(lam, dtype=np.float32)
    if rows is not None:
        index = index[rows]
        lam = lam[rows] if lam.ndim else lam
    if fixed_lam is not None:
        lam = np.full_like(lam, fixed_lam)
    if lam_transform == "max":
        lam = np.asarray(np.maximum(lam, 1.0 - lam), dtype=np.float32)
    return Draw(k, lam, index, cutmix, (cy, cx))


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
        box_center: for batches mixed in a box (CutMix, soft PatchUp), the box centre as
            fractions of (H, W); else None.
        host_lam: lam on the host, float32, shape ``()`` or ``(B,)``: the drawn lam, or for a
            CutMix batch the kept area fraction once the box is placed (before that, at a
            hidden layer, the drawn lam that sets the box's area).
        device: where ``lam`` lives.
        lam: ``host_lam`` as a float32 tensor on ``device``, the one form every mixing
            operation reads. A single lam is made by a fill on the device (no copy from the
            host); a per-row lam is copied through pinned memory on CUDA (no synchronisation).
        box: the box of a CutMix or soft PatchUp batch once placed (on the input at the batch
            start, at a hidden layer when it runs); else None.
        policy: the batch's mixing policy with the numbers it drew (a
            :class:`~lightning_manifold_mixup.NoisyFeatureMixup`'s noise weights and seed, say).
    """

    layer: str
    layer_index: int
    index: Tensor
    box_center: tuple[float, float] | None = None
    host_lam: np.ndarray = field(kw_only=True, compare=False)
    device: torch.device = field(kw_only=True, compare=False)
    lam: Tensor = field(init=False, compare=False, repr=False)
    box: Box | None = field(default=None, kw_only=True, compare=False)
    policy: Any = field(default=None, kw_only=True, compare=False, repr=False)

    def __post_init__(self) -> None:
        host = np.array(self.host_lam, dtype=np.float32)  # a copy: lam may be rewritten in place
        if host.ndim == 0 and self.device.type != "cpu":
            lam = lam_tensor(float(host), self.device)  # a fill on the device: no host copy
        else:
            lam = host_to_device(host, self.device)  # on the CPU: the array itself, no operation
        object.__setattr__(self, "lam", lam)

    @classmethod
    def of(
        cls, draw: Draw, eligible: list[str], device: torch.device, policy: Any = None
    ) -> MixDecision:
        """The decision of ``draw`` mixed by ``policy`` (None: not said), permutation and lam
        on ``device``."""
        index = host_to_device(draw.perm, device)
        center = draw.box_center if policy is not None and policy.boxed else None
        return cls(
            eligible[draw.layer],
            draw.layer,
            index,
            center,
            host_lam=draw.lam,
            device=device,
            policy=policy,
        )

    def with_box(self, box: Box, lam: float, policy: Any) -> MixDecision:
        """The same decision with its box placed and lam fixed to ``lam`` (the weight of the
        original sample in the targets: CutMix's kept area)."""
        return MixDecision(
            self.layer,
            self.layer_index,
            self.index,
            self.box_center,
            host_lam=np.asarray(lam, dtype=np.float32),
            device=self.device,
            box=box,
            policy=policy,
        )


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


@dataclass(frozen=True)
class Box:
    """A box ``[y0, y1) x [x0, x1)`` on a grid of ``height x width`` (CutMix, soft PatchUp).

    Example:
        >>> box = Box(2, 6, 2, 6, 8, 8)
        >>> box.kept, box.scaled(4, 4)
        (0.75, Box(y0=1, y1=3, x0=1, x1=3, height=4, width=4))
    """

    y0: int
    y1: int
    x0: int
    x1: int
    height: int
    width: int

    @classmethod
    def place(cls, height: int, width: int, lam: float, center: tuple[float, float]) -> Box:
        """The box of area about ``(1 - lam)`` of ``height x width`` around ``center``."""
        return cls(*cutmix_box(height, width, lam, center), height, width)

    @property
    def kept(self) -> float:
        """Weight of the original sample: the area fraction outside the box."""
        return cutmix_lam(self.height, self.width, (self.y0, self.y1, self.x0, self.x1))

    def scaled(self, height: int, width: int) -> Box:
        """The same box on a ``height x width`` grid (a mask of another resolution)."""
        if (height, width) == (self.height, self.width):
            return self
        sy, sx = height / self.height, width / self.width
        return Box(
            round(self.y0 * sy),
            round(self.y1 * sy),
            round(self.x0 * sx),
            round(self.x1 * sx),
            height,
            width,
        )

    def paste(self, h: Tensor, partner: Tensor) -> Tensor:
        """``h`` (``(..., H, W)``) with this box of its last two dims taken from ``partner``
        (the partner rows, same shape), scaled to ``h``'s grid."""
        box = self.scaled(h.shape[-2], h.shape[-1])
        out = h.clone()
        out[..., box.y0 : box.y1, box.x0 : box.x1] = partner[..., box.y0 : box.y1, box.x0 : box.x1]
        return out


def host_to_device(array: np.ndarray, device: torch.device) -> Tensor:
    """A host array on ``device`` without a synchronising copy: through pinned memory on CUDA
    (the caching host allocator keeps the buffer until the copy has run)."""
    t = torch.from_numpy(array)
    if device.type == "cpu":
        return t
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def lam_tensor(lam: Tensor | float, device: torch.device) -> Tensor:
    """lam as a float32 tensor on ``device``; a number becomes one by a fill on the device
    (no copy from the host)."""
    if isinstance(lam, Tensor):
        return lam.to(device=device, dtype=torch.float32)
    return torch.full((), lam, dtype=torch.float32, device=device)


class KeyedStream:
    """``generator(stream, step)``: the same state for the same ``(seed, stream, step)``.

    The draws of batch ``step`` come from a Philox counter-based generator whose key is
    ``(seed, stream)`` and whose counter starts at ``step * 2**64``: any batch's draws are
    reproducible from the three numbers alone (resume, replicas, shared global draws), without
    replaying earlier batches and without hashing a seed sequence per batch. The returned
    generator is reused between calls (re-keyed in place), so use it before asking for the
    next one.

    Example:
        >>> s = KeyedStream(seed=7)
        >>> a = s.generator(0, 3).random(); b = s.generator(0, 4).random()
        >>> a == s.generator(0, 3).random() and a != b
        True
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self._bits = np.random.Philox(key=0)
        self._rng = np.random.Generator(self._bits)
        self._buffer = np.zeros(4, dtype=np.uint64)

    def generator(self, stream: int, step: int) -> np.random.Generator:
        self._bits.state = {
            "bit_generator": "Philox",
            "state": {
                "counter": np.array([0, step & _MASK, 0, 0], dtype=np.uint64),
                "key": np.array([self.seed & _MASK, stream & _MASK], dtype=np.uint64),
            },
            "buffer": self._buffer,
            "buffer_pos": 4,
            "has_uint32": 0,
            "uinteger": 0,
        }
        return self._rng
