"""Keyed random streams: one generator state per (seed, stream, step), cheap to reach.

The draws of batch ``step`` come from a Philox counter-based generator whose key is
``(seed, stream)`` and whose counter starts at ``step * 2**64``: any batch's draws are
reproducible from the three numbers alone (resume, replicas, shared global draws), without
replaying earlier batches and without hashing a seed sequence per batch.
"""

from __future__ import annotations

import os
import secrets
from typing import Any

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.utilities import rank_zero_warn

_MASK = 2**64 - 1


class KeyedStream:
    """``generator(stream, step)``: the same state for the same ``(seed, stream, step)``.

    The returned generator is reused between calls (re-keyed in place), so use it before
    asking for the next one.

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
    if getattr(trainer, "ckpt_path", None) is not None:
        return False
    fit_loop = getattr(trainer, "fit_loop", None)
    if fit_loop is None:  # a Trainer stand-in (benchmarks, tests) with only the basics
        return getattr(trainer, "global_step", 0) == 0
    return int(fit_loop.epoch_loop.batch_progress.total.ready) == 0
