"""The built-in experiments: recipes that resolve, a cosine schedule, runs that repeat, and the
search (validation split held out) and test (refit on train + validation) protocols."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn

from conftest import quiet_trainer
from lightning_manifold_mixup.layers import resolve_layers
from lightning_manifold_mixup_recipes.analysis import flattening, flattening_preset
from lightning_manifold_mixup_recipes.classifier import MixupClassifier
from lightning_manifold_mixup_recipes.data import SpiralsDataModule
from lightning_manifold_mixup_recipes.data.mnist import FIX, find_source
from lightning_manifold_mixup_recipes.experiments import (
    PRESETS,
    REAL_DATASETS,
    evaluate,
    format_table,
    has_holdout,
    train,
)


class _RecordLR(L.Callback):
    """The learning rate each optimizer step uses."""

    def __init__(self) -> None:
        self.seen: list[float] = []

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self.seen.append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_mixes_at_layers_its_backbone_has(name: str) -> None:
    preset = PRESETS[name]
    model = MixupClassifier(preset.backbone(), preset.num_classes)
    assert preset.manifold_layers[0] == "input"
    assert resolve_layers(model, list(preset.manifold_layers)) == list(preset.manifold_layers)
    assert set(preset.alphas) == {"input", "manifold"}
    assert set(preset.lr) == {"none", "input", "manifold"}
    assert preset.steps > 0 and min(preset.lr.values()) > 0


def test_the_flattening_preset_is_the_mnist1d_mlp() -> None:
    preset = flattening_preset("mnist1d")
    assert preset is PRESETS["mnist1d_mlp"]
    model = MixupClassifier(preset.backbone(), preset.num_classes)
    assert isinstance(model.net.get_submodule("layers.1"), nn.ReLU)


def test_cosine_schedule_decays_the_learning_rate_to_zero_at_max_steps() -> None:
    dm = SpiralsDataModule(num_train=64, num_val=16, num_test=16, batch_size=16)
    model = MixupClassifier(nn.Linear(2, 3), 3, optimizer="adam", lr=0.1, cosine=True)
    record = _RecordLR()
    quiet_trainer(max_steps=10, callbacks=[record]).fit(model, dm)
    seen = record.seen
    expected = [0.05 * (1 + math.cos(math.pi * k / 10)) for k in range(10)]
    assert seen == pytest.approx(expected)
    assert model.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_cosine_and_milestones_cannot_be_combined() -> None:
    with pytest.raises(ValueError, match="cosine=True or milestones=\\(5,\\)"):
        MixupClassifier(nn.Linear(2, 3), 3, cosine=True, milestones=(5,))


def test_without_train_metrics_the_step_logs_nothing_and_still_learns() -> None:
    dm = SpiralsDataModule(num_train=256, num_val=16, num_test=16, batch_size=32, turns=0.25)
    model = MixupClassifier(nn.Linear(2, 3), 3, optimizer="adam", lr=0.05, train_metrics=False)
    trainer = quiet_trainer(max_epochs=5, limit_val_batches=0)
    trainer.fit(model, dm)
    assert not [k for k in trainer.callback_metrics if k.startswith("train")]
    dm.setup("test")
    assert evaluate(model.eval(), dm, 0.0)["test_err"] < 40.0  # chance is 66.7


def test_a_preset_run_repeats_bit_for_bit_and_restores_the_thread_count() -> None:
    threads = torch.get_num_threads()
    first, _ = train("spirals", "manifold", seed=3, steps=30)
    assert torch.get_num_threads() == threads
    second, _ = train("spirals", "manifold", seed=3, steps=30)
    other, _ = train("spirals", "manifold", seed=4, steps=30)
    a, b, c = first.state_dict(), second.state_dict(), other.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_flattening_measures_every_method_on_the_training_set_in_order() -> None:
    result = flattening("spirals", seeds=(0,), steps=5)
    assert list(result) == ["none", "input", "manifold"]
    for r in result.values():
        (per_class,), (together,), (relative,) = (
            r["non_leading"],
            r["all_classes_non_leading"],
            r["relative"],
        )
        assert 0 < per_class < together and relative > 0
        assert len(r["spectrum"]) == 32 and len(r["test_err"]) == 1


# Training samples with the validation split held out (search) and after the refit (test).
SPLIT_SIZES = {
    "mnist1d": (3600, 4000),
    "mnist1d_mlp": (3600, 4000),
    "digits": (1294, 1438),
    "spirals": (3000, 3600),
    "fashion-mnist": (9000, 10000),
    "mnist": (9000, 10000),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_the_refit_trains_on_training_and_validation_data_together(name: str) -> None:
    if name in REAL_DATASETS and find_source(name) is None:
        pytest.skip(f"{name} absent: " + FIX[name])
    held, refit = PRESETS[name].datamodule(3, True), PRESETS[name].datamodule(3, False)
    held.setup("fit")
    refit.setup("fit")
    assert (len(held.train_set), len(refit.train_set)) == SPLIT_SIZES[name]
    assert has_holdout(held) and len(held.train_set) + len(held.val_set) == len(refit.train_set)
    # After the refit Lightning's "validation" set is the test set: nothing to choose from.
    assert not has_holdout(refit) and refit.val_set is refit.test_set
    assert len(refit.test_set) == len(held.test_set)


def test_train_refits_by_default_and_holds_out_on_request() -> None:
    _, refit = train("spirals", "none", seed=0, steps=2)
    _, held = train("spirals", "none", seed=0, steps=2, holdout=True)
    assert len(refit.train_set) == 3600 and not has_holdout(refit)
    assert len(held.train_set) == 3000 and len(held.val_set) == 600


def test_only_a_held_out_split_gives_a_validation_error() -> None:
    refit_model, refit = train("spirals", "manifold", seed=1, steps=2)
    held_model, held = train("spirals", "manifold", seed=1, steps=2, holdout=True)
    assert "val_err" not in evaluate(refit_model, refit, 0.0)
    metrics = evaluate(held_model, held, 0.0)
    assert 0.0 <= metrics["val_err"] <= 100.0 and metrics["val_err"] != metrics["test_err"]


def test_the_table_has_a_validation_column_only_when_every_run_has_one() -> None:
    run = {"test_err": 1.0, "test_nll": 0.1, "test_ece": 0.0, "fgsm_acc": 50.0}
    assert "val error %" not in format_table({"none": [run, run]}, "t")
    held = {**run, "val_err": 2.0}
    assert "val error %" in format_table({"none": [held, held]}, "t")
    assert "val error %" not in format_table({"none": [held, run]}, "t")
