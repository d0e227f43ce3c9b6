"""Owns who a row is mixed with: the rows of the local batch, or of every rank's batch.

A pairing answers one question, ``partner(t, index)``: the partner rows of a ``(B, ...)``
tensor. ``LocalPairing`` takes them from the process's own batch (``t[index]``; each
data-parallel replica draws its own stream). ``GlobalPairing`` takes them from the global batch
(every rank's rows in rank order): all ranks share one draw of ``world_size * B`` rows, keep
their own slice of it, and gather (hidden states with gradients back to their owners).
What is done with the partner rows is the policy's business, not the pairing's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_manifold_mixup._lightning import MisconfigurationException, pl, rank_zero_warn
from lightning_manifold_mixup.policies import permute_rows

# Stream key of the shared draw under global pairing: no replica index reaches it, so the
# shared stream never coincides with a replica's own.
SHARED_STREAM = 2**32 - 1


class LocalPairing:
    """Partners come from the process's own batch; its stream is keyed by its replica."""

    # The partner rows of ``t`` (B, ...) under ``index`` (B,): ``t[index]``, a fresh tensor.
    partner = staticmethod(permute_rows)

    def __init__(self, replica: int) -> None:
        self.replica = replica
        self.stream_key = replica

    def draw_rows(self, batch_size: int, device: torch.device) -> tuple[int, slice | None]:
        """Rows to draw a permutation over, and this rank's slice of them (None: all)."""
        return batch_size, None


class GlobalPairing(LocalPairing):
    """Partners come from the global batch; one stream shared by every rank."""

    def __init__(self, rank: int, world_size: int) -> None:
        super().__init__(rank)
        self.world_size = world_size
        # One stream for every rank: they must agree on the layer (the hook's collectives
        # would otherwise wait for each other forever), lam and the global permutation.
        self.stream_key = SHARED_STREAM

    def draw_rows(self, batch_size: int, device: torch.device) -> tuple[int, slice | None]:
        _check_equal_batch_sizes(batch_size, device)
        first = self.replica * batch_size
        return self.world_size * batch_size, slice(first, first + batch_size)

    @staticmethod
    def partner(t: Tensor, index: Tensor) -> Tensor:
        """Rows ``index`` (global row indices) of every rank's ``t``, with gradients sent
        back to the ranks that own them when ``t`` requires grad."""
        rows: Tensor = _GatherRows.apply(t) if t.requires_grad else _global_rows(t)
        return rows.index_select(0, index.to(t.device))


def make_pairing(pairing: str, trainer: pl.Trainer) -> LocalPairing:
    """The pairing for this fit; refuses global pairing where it cannot work."""
    replica, replicas = _data_parallel_replica(trainer)
    if pairing == "local":
        return LocalPairing(replica)
    if 1 < replicas != trainer.world_size:
        raise MisconfigurationException(
            f"pairing='global' gathers hidden states from every process, but this run's "
            f"{trainer.world_size} processes hold {replicas} data-parallel replicas "
            "(the others split the model, e.g. tensor parallelism). Use pairing='local'."
        )
    if replicas == 1:
        rank_zero_warn(
            "ManifoldMixupCallback: pairing='global' has no effect with one data-parallel "
            "replica (a single-process run); samples are paired within the batch as with "
            "pairing='local'."
        )
        return LocalPairing(replica)
    if not (dist.is_available() and dist.is_initialized()):
        raise MisconfigurationException(
            "pairing='global' needs torch.distributed, but the "
            f"{type(trainer.strategy).__name__} strategy has not initialised it. Use a "
            "DDP-based strategy or pairing='local'."
        )
    return GlobalPairing(trainer.global_rank, trainer.world_size)


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
