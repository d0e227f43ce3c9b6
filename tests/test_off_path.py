"""Lightning features off the README's path: manual optimization, other callbacks' forwards,
several optimizers, exception checkpoints, label dtypes and dict batches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import OnExceptionCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import MLPClassifier, make_loader, quiet_trainer
from helpers import DecisionRecorder
from lightning_manifold_mixup import ManifoldMixupCallback, ManifoldMixupMixin


class TwoNets(ManifoldMixupMixin, L.LightningModule):
    """Manual optimization: net ``a`` steps first, then ``b`` (as a GAN's G and D steps)."""

    def __init__(self, b_inputs: int = 1) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.num_classes = 4
        self.b_inputs = b_inputs
        self.a = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
        self.b = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        opt_a, opt_b = self.optimizers()  # type: ignore[misc]
        loss_a = self.mixup_loss(self.a(x), y)
        opt_a.zero_grad()
        self.manual_backward(loss_a)
        opt_a.step()
        for _ in range(self.b_inputs):  # b on real, then on "generated" data
            loss_b = self.mixup_loss(self.b(x), y)
            opt_b.zero_grad()
            self.manual_backward(loss_b)
            opt_b.step()

    def configure_optimizers(self) -> Any:
        return [
            torch.optim.SGD(self.a.parameters(), 0.1),
            torch.optim.SGD(self.b.parameters(), 0.1),
        ]


def test_manual_optimization_layer_after_an_earlier_backward_is_mixed_without_error() -> None:
    cb = ManifoldMixupCallback(layers=["b.1"], seed=0)
    trainer = quiet_trainer(max_epochs=1, callbacks=[cb])
    trainer.fit(TwoNets(), make_loader(n=16, batch_size=4))
    assert cb.summary["layers"] == {"b.1": 4}


def test_manual_optimization_second_forward_of_the_mixed_layer_is_counted_and_warned() -> None:
    cb = ManifoldMixupCallback(layers=["b.1"], seed=0)
    with pytest.warns(UserWarning, match=r"run more than once per training step \{'b\.1': 2\}"):
        quiet_trainer(max_epochs=1, callbacks=[cb]).fit(
            TwoNets(b_inputs=2), make_loader(n=16, batch_size=4)
        )


def test_alpha_schedule_spans_a_run_with_two_optimizers() -> None:
    cb = ManifoldMixupCallback(layers=["b.1"], seed=0, alpha_schedule="linear")
    rec = DecisionRecorder()
    trainer = quiet_trainer(max_epochs=4, callbacks=[cb, rec])
    trainer.fit(TwoNets(), make_loader(n=16, batch_size=4))
    assert trainer.global_step == 32  # two optimizer steps per batch
    assert len(rec.decisions) == 16 and all(d is not None for d in rec.decisions)


def _unhooked_mlp(model: MLPClassifier, x: torch.Tensor) -> torch.Tensor:
    """The MLP's output computed from its weights, without calling any module."""
    net = model.net
    h = F.relu(F.linear(x, net[0].weight, net[0].bias))
    h = F.relu(F.linear(h, net[2].weight, net[2].bias))
    return F.linear(h, net[4].weight, net[4].bias)


def test_another_callbacks_forward_after_the_step_is_not_mixed() -> None:
    probe_x = torch.randn(16, 8)
    gaps: list[float] = []

    class Probe(L.Callback):  # listed before the mixup callback: runs while it is armed
        def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
            with torch.no_grad():
                out = pl_module(probe_x)
                gaps.append(float((out - _unhooked_mlp(pl_module, probe_x)).abs().max()))

    cb = ManifoldMixupCallback(layers=["net.1", "net.3"], seed=0)
    quiet_trainer(max_steps=4, callbacks=[Probe(), cb]).fit(MLPClassifier(), make_loader())
    assert len(gaps) == 4 and max(gaps) < 1e-6


def test_a_forward_in_on_before_optimizer_step_with_another_batch_size_is_not_mixed() -> None:
    outputs: list[torch.Tensor] = []

    class Checking(MLPClassifier):
        def on_before_optimizer_step(self, optimizer: Any) -> None:
            x = torch.randn(3, 8)
            with torch.no_grad():
                out = self(x)
            torch.testing.assert_close(out, _unhooked_mlp(self, x))
            outputs.append(out)

    cb = ManifoldMixupCallback(layers=["net.1", "net.3"], seed=0)
    quiet_trainer(max_steps=3, callbacks=[cb]).fit(Checking(), make_loader())
    assert len(outputs) == 3


class FailAt(L.Callback):
    def __init__(self, batch: int) -> None:
        self.batch = batch

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: Any, batch: Any, idx: int
    ) -> None:
        if trainer.fit_loop.epoch_loop.batch_progress.total.ready == self.batch + 1:
            raise RuntimeError("simulated failure")


def test_resume_from_an_exception_checkpoint_replays_the_failed_batch_with_its_draw(
    tmp_path: Path,
) -> None:
    layers = ["input", "net.1", "net.3"]
    full_cb = ManifoldMixupCallback(layers=layers, seed=5)
    full = DecisionRecorder()
    quiet_trainer(max_steps=10, callbacks=[full, full_cb]).fit(
        MLPClassifier(), make_loader(n=40, batch_size=4)
    )

    cb = ManifoldMixupCallback(layers=layers, seed=5)
    first = DecisionRecorder()
    # The failure comes after the mixup callback drew batch 6's decision (index 5).
    save = OnExceptionCheckpoint(dirpath=tmp_path, filename="on_exception")
    trainer = quiet_trainer(
        max_steps=10, callbacks=[first, cb, FailAt(5), save], enable_checkpointing=True
    )
    with pytest.raises(RuntimeError, match="simulated failure"):
        trainer.fit(MLPClassifier(), make_loader(n=40, batch_size=4))

    cb2 = ManifoldMixupCallback(layers=layers, seed=5)
    rest = DecisionRecorder()
    quiet_trainer(max_steps=10, callbacks=[cb2, rest]).fit(
        MLPClassifier(),
        make_loader(n=40, batch_size=4),
        ckpt_path=str(tmp_path / "on_exception.ckpt"),
    )
    assert first.draws == full.draws[:5]
    assert rest.draws == full.draws[5:]


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32])
def test_small_integer_label_dtypes_become_the_same_soft_targets(dtype: torch.dtype) -> None:
    seen: list[tuple[Any, torch.Tensor, torch.Tensor]] = []
    x = torch.randn(16, 8)
    y = torch.randint(0, 4, (16,))

    class Spy(MLPClassifier):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            seen.append((cb.current, batch[1].clone(), y[4 * batch_idx : 4 * batch_idx + 4]))
            return super().training_step(batch, batch_idx)

    cb = ManifoldMixupCallback(layers=["net.1"], seed=0)
    loader = DataLoader(TensorDataset(x, y.to(dtype)), batch_size=4)
    quiet_trainer(max_epochs=1, callbacks=[cb]).fit(Spy(), loader)
    eye = torch.eye(4)
    assert len(seen) == 4
    for d, target, labels in seen:
        torch.testing.assert_close(target, d.lam * eye[labels] + (1 - d.lam) * eye[labels[d.index]])


def test_mixin_default_training_step_reads_the_callbacks_dict_keys() -> None:
    class Dicts(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.x, self.y = torch.randn(16, 8), torch.randint(0, 4, (16,))

        def __len__(self) -> int:
            return 16

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"features": self.x[i], "label": self.y[i]}

    cb = ManifoldMixupCallback(layers=["net.1"], input_key="features", target_key="label", seed=0)
    trainer = quiet_trainer(max_epochs=1, callbacks=[cb])
    trainer.fit(MLPClassifier(), DataLoader(Dicts(), batch_size=4))
    assert cb.summary["layers"] == {"net.1": 4}
