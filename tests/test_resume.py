"""Resuming from a checkpoint continues the exact mixing stream; the state is plain data."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from conftest import MLPClassifier, make_loader, quiet_trainer
from helpers import DecisionRecorder, Draw
from lightning_manifold_mixup import ManifoldMixupCallback


def _run(
    cb: ManifoldMixupCallback, max_steps: int, tmp: Path | None = None, ckpt: str | None = None
) -> list[Draw]:
    rec = DecisionRecorder()
    callbacks: list[L.Callback] = [cb, rec]
    if tmp is not None:
        callbacks.append(ModelCheckpoint(dirpath=tmp, every_n_train_steps=max_steps, save_top_k=-1))
    trainer = quiet_trainer(
        max_steps=max_steps, callbacks=callbacks, enable_checkpointing=tmp is not None
    )
    trainer.fit(MLPClassifier(), make_loader(n=40, batch_size=4), ckpt_path=ckpt)
    return rec.draws


LAYERS = ["input", "net.1", "net.3"]


def test_resume_continues_the_same_layer_lam_and_index_sequence(tmp_path: Path) -> None:
    full = _run(ManifoldMixupCallback(layers=LAYERS, seed=7), max_steps=14)
    first = _run(ManifoldMixupCallback(layers=LAYERS, seed=7), max_steps=6, tmp=tmp_path)
    ckpt = str(next(tmp_path.glob("*.ckpt")))
    rest = _run(ManifoldMixupCallback(layers=LAYERS, seed=7), max_steps=14, ckpt=ckpt)
    assert first == full[:6]
    assert rest == full[6:]
    assert len({d[0] for d in full}) > 1  # the comparison covers several layers


def test_resume_restores_a_random_seed_from_the_checkpoint(tmp_path: Path) -> None:
    first_cb = ManifoldMixupCallback(layers=LAYERS)
    first = _run(first_cb, max_steps=6, tmp=tmp_path)
    ckpt = str(next(tmp_path.glob("*.ckpt")))
    rest = _run(ManifoldMixupCallback(layers=LAYERS), max_steps=12, ckpt=ckpt)
    reference = _run(ManifoldMixupCallback(layers=LAYERS, seed=first_cb.state_dict()["seed"]), 12)
    assert first == reference[:6] and rest == reference[6:]


def test_seed_everything_seeds_the_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    L.seed_everything(123)
    a = _run(ManifoldMixupCallback(layers=LAYERS), max_steps=4)
    L.seed_everything(123)
    b = _run(ManifoldMixupCallback(layers=LAYERS), max_steps=4)
    L.seed_everything(124)
    c = _run(ManifoldMixupCallback(layers=LAYERS), max_steps=4)
    monkeypatch.delenv("PL_GLOBAL_SEED")
    assert a == b and a != c


def test_state_is_primitive_and_loads_with_weights_only(tmp_path: Path) -> None:
    _run(ManifoldMixupCallback(layers=LAYERS, seed=3), max_steps=5, tmp=tmp_path)
    ckpt = next(tmp_path.glob("*.ckpt"))
    loaded = torch.load(ckpt, weights_only=True)
    state = loaded["callbacks"]["ManifoldMixupCallback"]
    assert state == {"version": 1, "seed": 3, "step": 5}
