"""Copies, pickles and teachers during a fit; SWA's BatchNorm pass; resume on a plain loader;
``mix_like`` and ``clean_input`` for distillation; barebones Trainers."""

from __future__ import annotations

import copy
import io
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint, StochasticWeightAveraging
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import MLPClassifier, hook_counts, make_loader, quiet_trainer
from helpers import mixup_of
from lightning_manifold_mixup import ManifoldMixupCallback, ManifoldMixupMixin


class HydraStyle(L.LightningModule):
    """lightning-hydra-template's pattern: the network is a constructor argument, saved with
    ``save_hyperparameters()``, so every checkpoint pickles it."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = net

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def test_a_checkpoint_of_hyperparameters_holding_the_net_is_written_during_fit(
    tmp_path: Any,
) -> None:
    cb = ManifoldMixupCallback(num_classes=4, seed=0)
    trainer = quiet_trainer(
        max_epochs=2, callbacks=[cb], enable_checkpointing=True, default_root_dir=tmp_path
    )
    trainer.fit(HydraStyle(_net()), make_loader())
    checkpoint = next(c for c in trainer.callbacks if isinstance(c, ModelCheckpoint))
    saved = torch.load(checkpoint.best_model_path, weights_only=False)  # it pickles a module
    net = saved["hyper_parameters"]["net"]
    x = torch.randn(5, 8)
    torch.testing.assert_close(net(x), _by_hand(net, x))
    assert all(count == 0 for count in hook_counts(trainer.lightning_module).values())


def _by_hand(net: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The network's forward without any hook."""
    for layer in net:
        x = layer.forward(x)
    return x


class SavesEverything(L.Callback):
    """Pickles, torch.saves and deep-copies the module in the middle of a training step."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
        buffer = io.BytesIO()
        torch.save(pl_module.net, buffer)
        self.sizes.append(len(buffer.getvalue()) + len(pickle.dumps(pl_module)))
        copy.deepcopy(pl_module)


def test_module_and_net_pickle_save_and_deepcopy_inside_a_training_step() -> None:
    saver = SavesEverything()
    cb = ManifoldMixupCallback(layers=["net.1", "net.3"], seed=0)
    quiet_trainer(max_steps=3, callbacks=[cb, saver]).fit(MLPClassifier(), make_loader())
    assert len(saver.sizes) == 3 and all(size > 0 for size in saver.sizes)


class WithTeacher(MLPClassifier):
    """A mean teacher made by ``copy.deepcopy(self.net)`` once training starts, kept clean."""

    def __init__(self) -> None:
        super().__init__()
        self.gaps: list[float] = []

    def on_train_start(self) -> None:
        self.ema = copy.deepcopy(self.net)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = batch[0]
        with torch.no_grad():
            gap = (self.ema(x) - _by_hand(self.ema, x)).abs().max()
        self.gaps.append(float(gap))
        return super().training_step(batch, batch_idx)


def test_a_deepcopied_teacher_is_never_mixed_counted_or_left_hooked() -> None:
    model = WithTeacher()
    cb = ManifoldMixupCallback(layers=["net.1", "net.3"], seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_steps=6, callbacks=[cb]).fit(model, make_loader())
    assert model.gaps == [0.0] * 6
    assert not [w for w in caught if "more than once" in str(w.message)]
    assert cb.summary["layers"] and sum(cb.summary["layers"].values()) == 6
    x = torch.randn(4, 8)
    torch.testing.assert_close(model.ema(x), _by_hand(model.ema, x))  # nothing active after fit


class Snapshot(L.Callback):
    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        if trainer.global_step == 2:
            self.copy = copy.deepcopy(pl_module)


def test_a_snapshot_of_the_module_carries_no_wrapper_and_fits_on_its_own() -> None:
    snap = Snapshot()
    cb = ManifoldMixupCallback(layers=["net.1"], seed=0)
    quiet_trainer(max_steps=4, callbacks=[cb, snap]).fit(MLPClassifier(), make_loader())
    model = snap.copy
    assert "training_step" not in model.__dict__
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quiet_trainer(max_steps=2).fit(model, make_loader())
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    again = ManifoldMixupCallback(layers=["net.1"], seed=0)
    quiet_trainer(max_steps=2, callbacks=[again]).fit(model, make_loader())
    assert sum(again.summary["layers"].values()) == 2


def test_an_unpickled_module_is_not_mixed_while_the_original_fits() -> None:
    gaps: list[tuple[float, float]] = []

    class Unpickles(MLPClassifier):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            twin = pickle.loads(pickle.dumps(self.net))
            x = batch[0]
            with torch.no_grad():
                twin_gap = (twin(x) - _by_hand(twin, x)).abs().max()
            loss = super().training_step(batch, batch_idx)  # the original, mixed at net.1
            with torch.no_grad():
                own_gap = (self(x) - _by_hand(self.net, x)).abs().max()
            gaps.append((float(twin_gap), float(own_gap)))
            return loss

    cb = ManifoldMixupCallback(layers=["net.1"], seed=0, lam_mode="sample")
    quiet_trainer(max_steps=3, callbacks=[cb]).fit(Unpickles(), make_loader())
    assert len(gaps) == 3
    assert all(twin == 0.0 and own > 0.0 for twin, own in gaps)


def test_swa_batchnorm_pass_is_neither_mixed_nor_drawn() -> None:
    seen: list[tuple[bool, bool]] = []

    class Watch(MLPClassifier):
        def __init__(self) -> None:
            super().__init__()  # SWA's extra pass runs for BatchNorm models only
            self.net = nn.Sequential(
                nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4)
            )

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            cb = mixup_of(self.trainer)
            seen.append((self.trainer.fit_loop._skip_backward, cb.current is not None))
            if self.trainer.fit_loop._skip_backward:
                assert not batch[1].is_floating_point()  # targets untouched
            return super().training_step(batch, batch_idx)

    cb = ManifoldMixupCallback(layers=["net.2"], seed=0)
    swa = StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=1)
    quiet_trainer(max_epochs=2, callbacks=[cb, swa]).fit(Watch(), make_loader())
    swa_pass = [mixed for skip, mixed in seen if skip]
    trained = [mixed for skip, mixed in seen if not skip]
    assert swa_pass and not any(swa_pass)
    assert trained and all(trained)
    assert cb.state_dict()["step"] == len(trained)


class Stateful:
    """A loader with state, as Lightning restores it on resume (here: a thin wrapper)."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader

    def __iter__(self) -> Any:
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@pytest.mark.parametrize("stateful", [False, True])
def test_a_mid_epoch_resume_on_a_plain_loader_warns_with_the_fix(
    tmp_path: Any, stateful: bool
) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    first = ManifoldMixupCallback(layers=["net.1"], seed=0)
    quiet_trainer(max_steps=2, callbacks=[first, ckpt], enable_checkpointing=True).fit(
        MLPClassifier(), make_loader()
    )
    path = next(tmp_path.glob("*.ckpt"))
    loader: Any = Stateful(make_loader()) if stateful else make_loader()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_steps=4, callbacks=[ManifoldMixupCallback(layers=["net.1"])]).fit(
            MLPClassifier(), loader, ckpt_path=path
        )
    restarted = [w for w in caught if "restarts the epoch's data" in str(w.message)]
    assert len(restarted) == (0 if stateful else 1)


class Distills(MLPClassifier):
    """Records the mix_like of the student's own clean hidden features and of the input."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, Any]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        cb = mixup_of(self.trainer)
        clean = cb.clean_input
        teacher = torch.randn(clean.shape[0], 4)
        loss = super().training_step(batch, batch_idx)
        self.rows.append(
            {
                "decision": cb.current,
                "clean": clean.clone(),
                "x": batch[0].clone(),
                "teacher": teacher,
                "mixed_teacher": cb.mix_like(teacher),
            }
        )
        return loss


@pytest.mark.parametrize("lam_mode", ["batch", "sample"])
def test_mix_like_mixes_a_tensor_as_the_batch_in_flight(lam_mode: str) -> None:
    model = Distills()
    cb = ManifoldMixupCallback(layers=["input", "net.1"], seed=1, lam_mode=lam_mode)  # type: ignore[arg-type]
    quiet_trainer(max_steps=6, callbacks=[cb]).fit(model, make_loader())
    layers = set()
    for row in model.rows:
        d = row["decision"]
        layers.add(d.layer)
        lam = d.lam.view(-1, 1) if d.lam.ndim else d.lam
        expected = lam * row["teacher"] + (1 - lam) * row["teacher"][d.index]
        torch.testing.assert_close(row["mixed_teacher"], expected)
        x_expected = lam * row["clean"] + (1 - lam) * row["clean"][d.index]
        torch.testing.assert_close(row["x"], x_expected if d.layer == "input" else row["clean"])
    assert layers == {"input", "net.1"}


def test_mix_like_returns_its_argument_outside_a_mixed_batch() -> None:
    cb = ManifoldMixupCallback(layers=["net.1"], probability=0.0)
    t = torch.randn(3, 2)
    assert cb.mix_like(t) is t and cb.clean_input is None


class Images(ManifoldMixupMixin, L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.num_classes = 3
        self.net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 1))
        self.head = nn.Linear(4, 3)
        self.rows: list[dict[str, Any]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x).mean((2, 3)))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        cb = mixup_of(self.trainer)
        loss = super().training_step(batch, batch_idx)
        maps = torch.randn(batch[0].shape[0], 1, 4, 4)
        self.rows.append(
            {
                "d": cb.current,
                "clean": cb.clean_input,
                "x": batch[0],
                "maps": maps,
                "mixed_maps": cb.mix_like(maps),
                "box": cb.current.box,
            }
        )
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("layer", ["input", "net.1"])
def test_mix_like_pastes_the_cutmix_box_scaled_to_the_tensor(layer: str) -> None:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 2, 8, 8, generator=g), torch.randint(0, 3, (16,)))
    model = Images()
    cb = ManifoldMixupCallback(layers=[layer], cutmix_prob=1.0, seed=2)
    quiet_trainer(max_steps=3, callbacks=[cb]).fit(model, DataLoader(data, batch_size=4))
    for row in model.rows:
        box, index = row["box"], row["d"].index
        assert (box.height, box.width) == (8, 8)
        y0, y1, x0, x1 = (round(v / 2) for v in (box.y0, box.y1, box.x0, box.x1))
        expected = row["maps"].clone()
        expected[..., y0:y1, x0:x1] = row["maps"][index][..., y0:y1, x0:x1]
        torch.testing.assert_close(row["mixed_maps"], expected)
        if layer == "input":
            pasted = row["clean"].clone()
            pasted[..., box.y0 : box.y1, box.x0 : box.x1] = row["clean"][index][
                ..., box.y0 : box.y1, box.x0 : box.x1
            ]
            torch.testing.assert_close(row["x"], pasted)


def test_barebones_trainer_logs_nothing_and_warns_nothing() -> None:
    cb = ManifoldMixupCallback(layers=["net.1"], seed=0, log=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        L.Trainer(accelerator="cpu", barebones=True, max_steps=3, callbacks=[cb]).fit(
            MLPClassifier(), make_loader()
        )
    assert not [w for w in caught if "barebones" in str(w.message)]


def test_the_distillation_example_in_the_docs_trains() -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "distillation.md").read_text()
    code = re.search(r"```python\n(.*?)```", doc, re.S)
    assert code is not None
    namespace: dict[str, Any] = {"__name__": "docs_distillation"}
    exec(compile(code.group(1), "docs/distillation.md", "exec"), namespace)
    mixup = namespace["mixup"]
    assert sum(mixup.summary["layers"].values()) == 8  # every batch mixed, at both layers
