"""Two-process DDP on the CPU (gloo, ddp_spawn): local mixing, distinct streams, exact resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.multiprocessing.spawn import ProcessExitedException

from conftest import MLPClassifier, hand_mlp_loss, make_loader, mlp_with, quiet_trainer
from helpers import StepRecorder, draws, mixup_of
from lightning_manifold_mixup import ManifoldMixupCallback
from lightning_manifold_mixup.losses import soft_cross_entropy

LAYERS = ["input", "net.1", "net.3"]


class RankRecorder(StepRecorder):
    """Saves, per rank and step, the raw local batch, the weights, the decision and the loss."""

    def __init__(self, out: Path, tag: str) -> None:
        super().__init__()
        self.out, self.tag = out, tag

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        assert mixup_of(trainer).current is None

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        torch.save(self.rows, self.out / f"{self.tag}_rank{trainer.global_rank}.pt")


class ValidatingMLP(MLPClassifier):
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", soft_cross_entropy(self(x), y), sync_dist=True)


def _fit(
    out: Path,
    tag: str,
    max_steps: int,
    ckpt_every: int = 0,
    ckpt: str | None = None,
    retry: bool = False,
) -> None:
    callbacks: list[L.Callback] = [
        RankRecorder(out, tag),
        ManifoldMixupCallback(layers=LAYERS, seed=11),
    ]
    if ckpt_every:
        callbacks.append(
            ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=ckpt_every, save_top_k=-1)
        )
    trainer = quiet_trainer(
        strategy="ddp_spawn",
        devices=2,
        max_steps=max_steps,
        callbacks=callbacks,
        enable_checkpointing=bool(ckpt_every),
        limit_val_batches=2,
    )
    try:
        train, val = make_loader(n=48, batch_size=4), make_loader(n=16, seed=1)
        trainer.fit(ValidatingMLP(), train, val, ckpt_path=ckpt)
    except ProcessExitedException as err:
        # A spawned rank can abort in gloo's teardown at interpreter exit, after its work
        # ("terminate called without an active exception", seen once in about ten runs). The
        # run is deterministic, so it is repeated once; a second failure is reported.
        if err.signal_name != "SIGABRT" or retry:
            raise
        _fit(out, tag, max_steps, ckpt_every, ckpt, retry=True)


def _load(out: Path, tag: str) -> list[list[dict[str, Any]]]:
    return [torch.load(out / f"{tag}_rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    _fit(out, "full", max_steps=6, ckpt_every=6)
    _fit(out, "first", max_steps=3, ckpt_every=3)
    ckpt = str(next((out / "ckpt").glob("*step=3.ckpt")))
    _fit(out, "rest", max_steps=6, ckpt=ckpt)
    return out


def test_each_rank_mixes_its_own_shard_with_its_own_stream(ddp_runs: Path) -> None:
    rank0, rank1 = _load(ddp_runs, "full")
    assert len(rank0) == len(rank1) == 6
    assert draws(rank0) != draws(rank1)
    for a, b in zip(rank0, rank1, strict=True):
        assert not torch.equal(a["x"], b["x"])  # different shards
        assert a["index"].shape == (4,)  # the permutation covers the local batch only


def test_each_ranks_loss_matches_a_single_process_hand_computation(ddp_runs: Path) -> None:
    for rows in _load(ddp_runs, "full"):
        for row in rows:
            torch.testing.assert_close(row["loss"], hand_mlp_loss(mlp_with(row["weights"]), row))


def test_ddp_resume_continues_every_ranks_stream(ddp_runs: Path) -> None:
    full, first, rest = (_load(ddp_runs, tag) for tag in ("full", "first", "rest"))
    for rank in range(2):
        assert draws(first[rank]) == draws(full[rank])[:3]
        assert draws(rest[rank]) == draws(full[rank])[3:]
