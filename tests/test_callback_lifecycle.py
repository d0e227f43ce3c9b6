"""When the callback mixes and when it must not; hooks, logging, batch structures."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from conftest import (
    LateMLP,
    MLPClassifier,
    RecordingLogger,
    hook_counts,
    make_loader,
    quiet_trainer,
    tuple_collate,
)
from helpers import DecisionRecorder, KeepsTargets, draws, fake_strategy, fake_trainer, mixup_of
from lightning_manifold_mixup import ManifoldMixupCallback


class Twin(MLPClassifier):
    """Compares every eval-time output with a hook-free twin holding the same weights."""

    def __init__(self) -> None:
        super().__init__()
        self.checked: dict[str, int] = {"sanity": 0, "val": 0, "test": 0, "predict": 0}
        self.train_mixed = 0

    def _compare(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        twin = MLPClassifier()
        twin.load_state_dict(self.state_dict())
        twin.eval()
        out = self(x)
        with torch.no_grad():
            torch.testing.assert_close(out, twin(x), rtol=0, atol=0)
        assert mixup_of(self.trainer).current is None
        self.checked[kind] += 1
        return out

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.train_mixed += mixup_of(self.trainer).current is not None
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        kind = "sanity" if self.trainer.sanity_checking else "val"
        x, y = batch
        self._compare(x, kind)
        assert not y.is_floating_point()  # validation targets are never rewritten

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._compare(batch[0], "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        return self._compare(batch[0], "predict")


def test_validation_sanity_test_and_predict_equal_the_unhooked_model() -> None:
    model = Twin()
    cb = ManifoldMixupCallback(layers=["input", "net.1", "net.3"], seed=0)
    trainer = quiet_trainer(
        max_epochs=2, num_sanity_val_steps=2, val_check_interval=2, callbacks=[cb]
    )
    trainer.fit(model, make_loader(), make_loader(seed=1))
    trainer.test(model, make_loader(seed=2))
    trainer.predict(model, make_loader(seed=3))
    assert model.train_mixed == 8
    assert model.checked["sanity"] == 2
    assert model.checked["val"] >= 4 * 2  # mid-epoch validation too
    assert model.checked["test"] == 4 and model.checked["predict"] == 4


def test_hooks_are_gone_after_a_normal_fit() -> None:
    model = MLPClassifier()
    before = hook_counts(model)
    cb = ManifoldMixupCallback(layers=["net.1", "net.3"], seed=0)
    during: list[dict[str, int]] = []

    class Spy(L.Callback):
        def on_train_batch_start(self, *args: Any) -> None:
            during.append(hook_counts(model))

    quiet_trainer(max_steps=2, callbacks=[cb, Spy()]).fit(model, make_loader())
    assert during[0]["net.1"] == before["net.1"] + 1  # the hooks really were there
    assert {k: v for k, v in hook_counts(model).items() if k in before} == before
    assert cb.current is None


class Boom(MLPClassifier):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if batch_idx == 1:
            raise RuntimeError("boom")
        return super().training_step(batch, batch_idx)


def test_hooks_are_gone_after_an_exception_in_training_step() -> None:
    model = Boom()
    before = hook_counts(model)
    cb = ManifoldMixupCallback(layers=["net.1"], seed=0)
    with pytest.raises(RuntimeError, match="boom"):
        quiet_trainer(max_steps=4, callbacks=[cb]).fit(model, make_loader())
    assert {k: v for k, v in hook_counts(model).items() if k in before} == before
    assert cb.current is None


def test_repeated_fit_does_not_stack_hooks_and_the_callback_is_reusable() -> None:
    model = MLPClassifier()
    before = hook_counts(model)
    cb = ManifoldMixupCallback(layers=["net.1"], seed=0)
    trainer = quiet_trainer(max_epochs=1, callbacks=[cb])
    trainer.fit(model, make_loader())
    quiet_trainer(max_epochs=1, callbacks=[cb]).fit(model, make_loader())
    assert {k: v for k, v in hook_counts(model).items() if k in before} == before


def test_current_is_none_outside_training_batches() -> None:
    seen: list[Any] = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
            seen.append(cb.current)

    cb = ManifoldMixupCallback(layers=["net.1"], seed=0)
    assert cb.current is None
    quiet_trainer(max_steps=2, callbacks=[cb, Spy()]).fit(MLPClassifier(), make_loader())
    # Spy runs after the mixup callback's on_train_batch_end, which clears the decision
    assert seen == [None, None]


def test_lam_and_layer_are_logged_to_the_loggers_on_logging_steps() -> None:
    cb = ManifoldMixupCallback(layers=["input", "net.1", "net.3"], seed=0)
    rec = DecisionRecorder()
    logger = RecordingLogger()
    trainer = quiet_trainer(max_steps=4, callbacks=[cb, rec], logger=logger, log_every_n_steps=2)
    trainer.fit(MLPClassifier(), make_loader())
    decisions: list[Any] = rec.decisions
    # Logging steps 2 and 4 (Lightning's 0-based steps 1 and 3), the decision of that step
    assert logger.values("mixup/lam") == pytest.approx([float(decisions[i].lam) for i in (1, 3)])
    assert logger.values("mixup/layer") == [decisions[i].layer_index for i in (1, 3)]
    assert [step for step, m in logger.rows if "mixup/lam" in m] == [1, 3]
    assert "mixup/lam" not in trainer.callback_metrics  # no per-step device tensor


def test_accumulated_micro_batches_log_their_mean_lam() -> None:
    cb = ManifoldMixupCallback(layers=["net.1", "net.3"], seed=0)
    rec = DecisionRecorder()
    logger = RecordingLogger()
    trainer = quiet_trainer(
        max_steps=2,
        callbacks=[cb, rec],
        logger=logger,
        log_every_n_steps=1,
        accumulate_grad_batches=2,
    )
    trainer.fit(MLPClassifier(), make_loader())
    lams = [float(d.lam) for d in rec.decisions]  # type: ignore[union-attr]
    assert len(lams) == 4
    expected = [(lams[0] + lams[1]) / 2, (lams[2] + lams[3]) / 2]
    assert logger.values("mixup/lam") == pytest.approx(expected)


def test_logging_can_be_switched_off() -> None:
    cb = ManifoldMixupCallback(layers=["net.1"], seed=0, log=False)
    logger = RecordingLogger()
    trainer = quiet_trainer(max_steps=2, callbacks=[cb], logger=logger, log_every_n_steps=1)
    trainer.fit(MLPClassifier(), make_loader())
    assert logger.values("mixup/lam") == []
    assert logger.values("train_loss_step") != []


class TargetKeepingMLP(KeepsTargets, MLPClassifier):
    """Keeps the targets training_step receives in ``targets``."""


def test_tuple_batches_work_through_the_mixin() -> None:
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
    loader = DataLoader(TensorDataset(x, y), batch_size=4, collate_fn=tuple_collate)
    model = TargetKeepingMLP()
    cb = ManifoldMixupCallback(layers=["net.1"], seed=0)
    quiet_trainer(max_steps=2, callbacks=[cb]).fit(model, loader)
    assert [t.shape for t in model.targets] == [torch.Size([4, 4])] * 2


def test_dict_batches_use_input_and_target_keys() -> None:
    class DictModel(MLPClassifier):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            assert batch["label"].shape == (4, 4)  # soft targets
            return self.mixup_loss(self(batch["image"]), batch["label"])

    data = [{"image": torch.randn(8), "label": torch.tensor(i % 4)} for i in range(16)]
    loader = DataLoader(data, batch_size=4)  # type: ignore[arg-type]
    cb = ManifoldMixupCallback(layers=["input"], input_key="image", target_key="label", seed=0)
    trainer = quiet_trainer(max_steps=2, callbacks=[cb])
    trainer.fit(DictModel(), loader)
    assert trainer.global_step == 2


def test_pair_targets_reach_training_step_as_mixed_target() -> None:
    from lightning_manifold_mixup import MixedTarget

    model = TargetKeepingMLP()
    cb = ManifoldMixupCallback(layers=["net.1"], seed=0, targets="pair")
    quiet_trainer(max_steps=2, callbacks=[cb]).fit(model, make_loader())
    assert all(isinstance(t, MixedTarget) for t in model.targets)


class Shared(MLPClassifier):
    """Runs the same activation module twice per forward (weight sharing)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.net[1](self.net[0](x))
        h = self.net[1](self.net[2](h))
        return self.net[4](h)


def test_a_layer_that_runs_twice_warns_once_and_gets_the_same_mix() -> None:
    cb = ManifoldMixupCallback(layers=["net.1"], seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_steps=3, callbacks=[cb]).fit(Shared(), make_loader())
    repeated = [w for w in caught if "run more than once" in str(w.message)]
    assert len(repeated) == 1


def test_automatic_layers_are_announced_at_fit_start(caplog: pytest.LogCaptureFixture) -> None:
    cb = ManifoldMixupCallback(seed=0)
    # Before Lightning 2.5 its logger does not propagate to the root logger caplog watches.
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "pytorch_lightning")]
    for logger in loggers:
        logger.addHandler(caplog.handler)
    try:
        with caplog.at_level("INFO"):
            quiet_trainer(max_steps=1, callbacks=[cb]).fit(MLPClassifier(), make_loader())
    finally:
        for logger in loggers:
            logger.removeHandler(caplog.handler)
    assert cb.eligible == ["net.1", "net.3"]
    assert "mixing at ['net.1', 'net.3']" in caplog.text


# ------------------------------------------------------- layers built late, skipped batches


def test_layers_built_in_configure_model_are_found_and_mixed() -> None:
    model = LateMLP()
    cb = ManifoldMixupCallback(layers=["net.1"], seed=2)
    rec = DecisionRecorder()
    loader = make_loader(n=8, batch_size=8)
    quiet_trainer(max_steps=1, callbacks=[rec, cb]).fit(model, loader)
    assert cb.eligible == ["net.1"]
    (d,) = rec.decisions
    assert d is not None
    x, y = next(iter(loader))
    assert model.net is not None
    h = model.net[1](model.net[0](x))
    h = d.lam * h + (1 - d.lam) * h[d.index]
    target = d.lam * torch.eye(4)[y] + (1 - d.lam) * torch.eye(4)[y[d.index]]
    expected = -(target * torch.log_softmax(model.net[2](h), -1)).sum(-1).mean()
    torch.testing.assert_close(model.losses[0], expected)


def test_a_batch_skipped_by_returning_none_does_not_stop_the_fit() -> None:
    class Skipping(MLPClassifier):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            if batch_idx == 1:
                return None  # Lightning skips this batch; the model never ran
            return super().training_step(batch, batch_idx)

    cb = ManifoldMixupCallback(layers=["net.1"], seed=0)
    trainer = quiet_trainer(max_epochs=1, callbacks=[cb])
    trainer.fit(Skipping(), make_loader(n=64, batch_size=16))
    assert trainer.fit_loop.epoch_loop.batch_progress.total.completed == 4
    assert cb.current is None


def test_a_batch_that_stops_the_epoch_leaves_no_decision_behind() -> None:
    """on_train_batch_start returning -1 ends the epoch without on_train_batch_end."""
    outputs: dict[str, torch.Tensor] = {}
    probe = torch.randn(5, 8)

    class Stopping(MLPClassifier):
        def on_train_batch_start(self, batch: Any, batch_idx: int) -> Any:
            return -1 if batch_idx == 1 else None

        def on_train_epoch_end(self) -> None:
            outputs["after"] = self(probe).detach()
            outputs["plain"] = self.net(probe).detach()

    cb = ManifoldMixupCallback(layers=["net.1"], seed=0)
    quiet_trainer(max_epochs=1, callbacks=[cb]).fit(Stopping(), make_loader())
    assert cb.current is None
    torch.testing.assert_close(outputs["after"], outputs["plain"], rtol=0, atol=0)


# -------------------------------------------------------------- one callback, several fits


def _draws_of_fit(cb: ManifoldMixupCallback, seed: int, **fit_kwargs: Any) -> list[Any]:
    rec = DecisionRecorder()
    L.seed_everything(seed)
    trainer = quiet_trainer(max_steps=3, callbacks=[cb, rec], **fit_kwargs)
    trainer.fit(MLPClassifier(), make_loader())
    return rec.draws


def test_a_reused_callback_starts_each_new_run_like_a_new_callback() -> None:
    layers = ["input", "net.1", "net.3"]
    reused = ManifoldMixupCallback(layers=layers)
    first = _draws_of_fit(reused, seed=0)
    second = _draws_of_fit(reused, seed=1)
    assert first == _draws_of_fit(ManifoldMixupCallback(layers=layers), seed=0)
    assert second == _draws_of_fit(ManifoldMixupCallback(layers=layers), seed=1)
    assert reused.hparams()["seed"] == 1


def test_state_loaded_by_test_does_not_leak_into_the_next_fit(tmp_path: Any) -> None:
    layers = ["input", "net.1", "net.3"]
    cb = ManifoldMixupCallback(layers=layers, seed=5)
    model = MLPClassifier()
    trainer = quiet_trainer(
        max_steps=4, callbacks=[cb], enable_checkpointing=True, default_root_dir=tmp_path
    )
    trainer.fit(model, make_loader())
    ckpt = next(tmp_path.rglob("*.ckpt"))

    class Testing(MLPClassifier):
        def test_step(self, batch: Any, batch_idx: int) -> None:
            pass

    quiet_trainer(callbacks=[cb]).test(Testing(), make_loader(), ckpt_path=str(ckpt))
    fresh = ManifoldMixupCallback(layers=layers, seed=5)
    assert _draws_of_fit(cb, seed=0) == _draws_of_fit(fresh, seed=0)


def test_without_a_seed_every_rank_takes_rank_zeros_seed(monkeypatch: Any) -> None:
    """A run seeded per rank (seed_everything(base + rank)) still shares one stream seed."""
    monkeypatch.setenv("PL_GLOBAL_SEED", "41")  # this rank's own seed
    strategy = fake_strategy(broadcast=lambda obj, src: 40 if src == 0 else obj)
    trainer = fake_trainer(world_size=2, global_rank=1, strategy=strategy)
    cb = ManifoldMixupCallback(layers=["net.1"])
    cb.on_fit_start(trainer, MLPClassifier())
    cb.teardown(trainer, MLPClassifier(), "fit")
    assert cb.hparams()["seed"] == 40


def test_lr_find_before_fit_leaves_the_fit_as_without_it() -> None:
    """Lightning's learning-rate finder runs a short fit with only its own callback (so without
    mixing) and restores the model from a checkpoint afterwards."""
    from lightning.pytorch.tuner import Tuner

    class Tunable(MLPClassifier):
        def __init__(self) -> None:
            super().__init__()
            self.lr = 0.1

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=self.lr)

    def fit_draws(tune: bool) -> tuple[list[Any], list[Any]]:
        cb = ManifoldMixupCallback(layers=["input", "net.1", "net.3"], seed=3)
        rec = DecisionRecorder()
        model = Tunable()
        before = hook_counts(model)
        trainer = quiet_trainer(max_steps=4, callbacks=[cb, rec])
        if tune:
            Tuner(trainer).lr_find(model, make_loader(n=256), num_training=10)
        during_tuning = draws(rec.decisions)
        rec.decisions.clear()
        trainer.fit(model, make_loader(n=256))
        assert {k: v for k, v in hook_counts(model).items() if k in before} == before
        return during_tuning, rec.draws

    _, plain = fit_draws(tune=False)
    tuning, after_tuning = fit_draws(tune=True)
    assert tuning == []  # the finder swaps in its own callback list: no step was mixed
    assert after_tuning == plain and len(plain) == 4


def test_a_training_step_the_strategy_holds_itself_is_put_back_after_each_fit() -> None:
    trainer = fake_trainer(strategy=fake_strategy())  # training_step in its own __dict__
    own = trainer.strategy.training_step
    model = MLPClassifier()
    for _ in range(2):  # a second fit finds the strategy's own step again
        cb = ManifoldMixupCallback(layers=["net.1"], seed=0, log=False)
        cb.on_fit_start(trainer, model)
        assert trainer.strategy.training_step is not own
        cb.teardown(trainer, model, "fit")
        assert trainer.strategy.training_step is own
