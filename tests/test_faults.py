"""Faults and checkpoints: interrupts, early stops, foreign checkpoints leave a usable model."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from conftest import MLPClassifier, hook_counts, make_loader, quiet_trainer
from helpers import DecisionRecorder
from lightning_manifold_mixup import ManifoldMixupCallback


class ValMLP(MLPClassifier):
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self.mixup_loss(self(batch[0]), batch[1]))

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0])


def _hooks(model: MLPClassifier, before: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in hook_counts(model).items() if k in before}


class InterruptAt(L.Callback):
    def __init__(self, step: int, exc: type[BaseException] | None) -> None:
        self.step, self.exc = step, exc

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            if self.exc is None:
                trainer.should_stop = True
            else:
                raise self.exc()


def _then_usable(model: ValMLP, cb: ManifoldMixupCallback) -> None:
    """A following fit, validate and predict work and are (un)mixed as they should be."""
    rec = DecisionRecorder()
    trainer = quiet_trainer(max_steps=2, callbacks=[cb, rec])
    trainer.fit(model, make_loader())
    assert len(rec.decisions) == 2 and all(d is not None for d in rec.decisions)
    metrics = trainer.validate(model, make_loader())
    assert metrics[0]["val_loss"] > 0
    preds = trainer.predict(model, make_loader())
    assert preds is not None and len(preds) == 4


def test_keyboard_interrupt_mid_epoch_leaves_no_hook_and_a_usable_model() -> None:
    model = ValMLP()
    before = hook_counts(model)
    cb = ManifoldMixupCallback(layers=["net.1", "net.3"], seed=0)
    previous = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):  # Lightning exits after a graceful shutdown
            quiet_trainer(max_steps=10, callbacks=[InterruptAt(2, KeyboardInterrupt), cb]).fit(
                model, make_loader()
            )
    finally:
        signal.signal(signal.SIGINT, previous)
    assert _hooks(model, before) == before and cb.current is None
    _then_usable(model, cb)
    assert _hooks(model, before) == before


def test_should_stop_mid_epoch_leaves_no_hook_and_a_usable_model() -> None:
    model = ValMLP()
    before = hook_counts(model)
    cb = ManifoldMixupCallback(layers=["net.1"], seed=0)
    trainer = quiet_trainer(max_epochs=3, callbacks=[InterruptAt(2, None), cb])
    trainer.fit(model, make_loader())
    assert trainer.global_step == 3  # the batch that set should_stop still ran
    assert _hooks(model, before) == before
    _then_usable(model, cb)


def test_exception_leaves_a_usable_model() -> None:
    model = ValMLP()
    before = hook_counts(model)
    cb = ManifoldMixupCallback(layers=["net.1"], seed=0)
    with pytest.raises(ValueError):
        quiet_trainer(max_steps=10, callbacks=[InterruptAt(1, ValueError), cb]).fit(
            model, make_loader()
        )
    assert _hooks(model, before) == before
    _then_usable(model, cb)


def _checkpoint(tmp: Path, callbacks: list[L.Callback], steps: int = 3) -> str:
    ckpt = ModelCheckpoint(dirpath=tmp, every_n_train_steps=steps, save_top_k=-1)
    trainer = quiet_trainer(
        max_steps=steps, callbacks=[*callbacks, ckpt], enable_checkpointing=True
    )
    trainer.fit(MLPClassifier(), make_loader())
    return str(next(tmp.glob("*.ckpt")))


def test_checkpoint_without_the_callback_resumes_with_it_and_says_so(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path, [])
    cb = ManifoldMixupCallback(layers=["net.1"], seed=5)
    with pytest.warns(UserWarning, match=r"holds no mixup state .*at batch 3"):
        quiet_trainer(max_steps=5, callbacks=[cb]).fit(
            MLPClassifier(), make_loader(), ckpt_path=path
        )
    assert cb.state_dict()["step"] == 5


def test_checkpoint_with_the_callback_resumes_without_it_with_lightnings_warning(
    tmp_path: Path,
) -> None:
    path = _checkpoint(tmp_path, [ManifoldMixupCallback(layers=["net.1"], seed=5)])
    model = MLPClassifier()
    before = hook_counts(model)
    with pytest.warns(UserWarning, match=r"callbacks used to create the checkpoint need to be"):
        quiet_trainer(max_steps=5).fit(model, make_loader(), ckpt_path=path)
    assert _hooks(model, before) == before


def test_state_dict_round_trips_through_weights_only_load(tmp_path: Path) -> None:
    cb = ManifoldMixupCallback(layers=["net.1"], seed=3)
    quiet_trainer(max_steps=4, callbacks=[cb]).fit(MLPClassifier(), make_loader())
    torch.save(cb.state_dict(), tmp_path / "state.pt")
    other = ManifoldMixupCallback(layers=["net.1"])
    other.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert other.state_dict() == cb.state_dict() == {"version": 1, "seed": 3, "step": 4}
