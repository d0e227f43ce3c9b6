"""Owns where the draws come from (``DecisionStream``): the seed, batch counter, checkpoints.

The draws of batch ``step`` come from :class:`~lightning_manifold_mixup.draw.KeyedStream`, keyed
by ``(seed, stream)`` with the counter at ``step``; this module decides the seed and the step
from the Trainer (fresh run, resume, a batch in flight at a checkpoint).
"""

from __future__ import annotations

import os
import secrets
from typing import Any

import numpy as np
from torch.utils._pytree import tree_leaves

from lightning_manifold_mixup._lightning import pl, rank_zero_warn
from lightning_manifold_mixup.draw import KeyedStream


class DecisionStream:
    """Where the callback's draws come from: the seed, the batch counter and checkpoints.

    The seed is the configured one, else Lightning's global seed (``seed_everything``), else a
    random one; under several processes rank 0's value is used everywhere. ``step`` counts the
    training batches drawn so far in the run. A fresh run (no checkpoint, no progress) starts
    from step 0 with the seed resolved anew; a resumed one continues from the checkpoint, and a
    checkpoint written while a batch is in flight (on an exception) replays that batch.
    """

    VERSION = 1

    def __init__(self, seed: int | None) -> None:
        self.configured_seed = seed
        self.seed: int | None = None
        self.step = 0
        self.in_flight = False
        self.restored = False
        self._keyed: KeyedStream | None = None

    def start_fit(self, trainer: pl.Trainer) -> None:
        if not self.restored and _fresh_run(trainer):
            self.step, self.seed = 0, None
        if self.seed is None:
            self.seed = self._initial_seed(trainer)
        self.in_flight = False

    def next(self, key: int) -> np.random.Generator:
        """The generator of the next batch on stream ``key`` (a replica or the shared one)."""
        assert self.seed is not None, "start_fit resolves the seed"
        if self._keyed is None or self._keyed.seed != self.seed:
            self._keyed = KeyedStream(self.seed)
        rng = self._keyed.generator(key, self.step)
        self.step += 1
        self.in_flight = True
        return rng

    def state_dict(self) -> dict[str, Any]:
        step = self.step - 1 if self.in_flight else self.step
        return {"version": self.VERSION, "seed": self.seed, "step": step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != self.VERSION or not {"seed", "step"} <= state.keys():
            raise ValueError(
                f"ManifoldMixupCallback cannot read checkpoint state {state!r}: expected "
                f"version {self.VERSION} with 'seed' and 'step'. Resume with the package "
                "version that wrote the checkpoint, or start a new run."
            )
        self.seed = None if state["seed"] is None else int(state["seed"])
        self.step = int(state["step"])
        self.restored = True

    def start_training(self, trainer: pl.Trainer) -> None:
        """After every restore path (FSDP and DeepSpeed restore after ``on_fit_start``)."""
        if trainer.ckpt_path is not None and not self.restored:
            self.step = trainer.fit_loop.epoch_loop.batch_progress.total.ready
            rank_zero_warn(
                f"ManifoldMixupCallback: the checkpoint {trainer.ckpt_path} holds no mixup state "
                "(it was written without this callback). Mixing starts here with seed "
                f"{self.seed} at batch {self.step}; an uninterrupted run with the "
                "callback would have drawn differently before this point."
            )
        self.restored = False

    def _initial_seed(self, trainer: pl.Trainer) -> int:
        if self.configured_seed is not None:
            return self.configured_seed
        global_seed = os.environ.get("PL_GLOBAL_SEED")
        seed = int(global_seed) if global_seed is not None else secrets.randbits(31)
        if trainer.world_size > 1:
            # Rank 0's seed for every rank: a run seeded per rank (seed_everything(base + rank))
            # must still agree across ranks (global pairing and tensor-parallel groups draw
            # together), and a resumed run loads rank 0's state everywhere.
            seed = int(trainer.strategy.broadcast(seed, src=0))
        return seed


def _fresh_run(trainer: pl.Trainer) -> bool:
    """No checkpoint to resume and no training progress on this Trainer yet."""
    if trainer.ckpt_path is not None:
        return False
    return int(trainer.fit_loop.epoch_loop.batch_progress.total.ready) == 0


def warn_restarted_loader(trainer: pl.Trainer, batch_idx: int) -> None:
    """At the first batch after a resume: warn when the run resumed mid-epoch on a loader
    without state. Lightning then restarts the epoch's data from its first batch while the
    stream goes on by batch count, so each decision falls on another batch than in the
    uninterrupted run (same draws by step, different data)."""
    loaders = tree_leaves(trainer.train_dataloader)
    if batch_idx == 0 or any(_stateful(loader) for loader in loaders):
        return
    rank_zero_warn(
        f"ManifoldMixupCallback: the fit resumed at batch {batch_idx} of an epoch, and the "
        "training dataloader has no state, so Lightning restarts the epoch's data from its "
        "first batch. The mixing decisions continue by batch count, so they fall on other "
        "batches than in the uninterrupted run. For an exact resume use a stateful loader "
        "(torchdata's StatefulDataLoader, or any loader with state_dict/load_state_dict), "
        "or checkpoint at epoch ends."
    )


def _stateful(loader: Any) -> bool:
    return callable(getattr(loader, "state_dict", None)) and callable(
        getattr(loader, "load_state_dict", None)
    )
