"""Bad input gets an error that names the value and the way out."""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
import torchvision
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils.data import DataLoader, TensorDataset

from conftest import (
    Holder,
    LateMLP,
    MLPClassifier,
    PlainModule,
    TimeMajor,
    make_loader,
    quiet_trainer,
    tuple_collate,
)
from helpers import KeepsTargets, fake_strategy, fake_trainer
from lightning_manifold_mixup import (
    ManifoldMixupCallback,
    ManifoldMixupMixin,
    mix_batch,
    mix_targets,
    mix_tensor,
    mixup_loss,
    resolve_layers,
)

# ------------------------------------------------------------------ the callback's arguments


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": 0.0}, r"alpha must be a number > 0 .*got 0\.0"),
        ({"alpha": -1}, r"alpha must be a number > 0 .*got -1"),
        ({"probability": 1.5}, r"probability must be in \[0, 1\], got 1\.5"),
        ({"probability": -0.1}, r"probability must be in \[0, 1\], got -0\.1"),
        ({"lam_mode": "pair"}, r"lam_mode must be 'batch' or 'sample', got 'pair'"),
        ({"layers": []}, r"layers is empty"),
        ({"layers": "net.1"}, r"layers must be a list of names, not the string 'net\.1'"),
        ({"num_classes": 1}, r"num_classes must be an integer >= 2, got 1"),
        ({"seed": -3}, r"seed must be a non-negative integer or None, got -3"),
        ({"targets": "hard"}, r"targets must be 'soft' or 'pair', got 'hard'"),
        ({"input_key": 1}, r"input_key and target_key are both 1"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(MisconfigurationException, match=message):
        ManifoldMixupCallback(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": float("inf")}, r"alpha must be a number > 0 .*got inf"),
        ({"alpha": float("nan")}, r"alpha must be a number > 0 .*got nan"),
        ({"alpha": True}, r"alpha must be a number > 0 .*got True"),
        ({"probability": True}, r"probability must be in \[0, 1\], got True"),
        ({"probability": float("nan")}, r"probability must be in \[0, 1\], got nan"),
        ({"warmup_steps": True}, r"warmup_steps must be an integer >= 0, got True"),
        ({"warmup_steps": 2.5}, r"warmup_steps must be an integer >= 0, got 2\.5"),
        ({"stop_epoch": True}, r"stop_epoch must be an integer >= 0 or None, got True"),
        ({"num_classes": "10"}, r"num_classes must be an integer >= 2, got '10'"),
        ({"num_classes": 3.0}, r"num_classes must be an integer >= 2, got 3\.0"),
        ({"layer_weights": [1.0, float("nan")]}, r"layer_weights must be finite .*nan"),
        ({"layer_weights": [1.0, float("inf")]}, r"layer_weights must be finite .*inf"),
        ({"layer_weights": ["a", 1]}, r"layer_weights must be finite .*'a'"),
        ({"fixed_lam": "a"}, r"fixed_lam must be in \[0, 1\] or None, got 'a'"),
        ({"fixed_lam": float("nan")}, r"fixed_lam must be in \[0, 1\] or None, got nan"),
        ({"cutmix_prob": float("inf")}, r"cutmix_prob must be in \[0, 1\], got inf"),
        ({"seed": 1.5}, r"seed must be a non-negative integer or None, got 1\.5"),
    ],
    ids=str,
)
def test_constructor_rejects_non_finite_and_non_numbers(
    kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(MisconfigurationException, match=message):
        ManifoldMixupCallback(**kwargs)


def test_numpy_scalars_are_numbers() -> None:
    cb = ManifoldMixupCallback(
        alpha=np.float32(0.5),
        probability=np.float64(0.5),
        num_classes=np.int64(3),
        warmup_steps=np.int64(2),
        stop_epoch=np.int32(4),
        fixed_lam=np.float32(0.25),
        seed=np.int64(7),
        layer_weights=[np.float32(1.0), 2],
    )
    c = cb.config
    assert (c.alpha, c.num_classes, c.warmup_steps, c.stop_epoch) == (0.5, 3, 2, 4)
    assert type(c.num_classes) is int and type(c.seed) is int and c.fixed_lam == 0.25


def test_constructor_reports_every_problem_at_once() -> None:
    with pytest.raises(MisconfigurationException) as err:
        ManifoldMixupCallback(alpha=0, probability=2, lam_mode="x")  # type: ignore[arg-type]
    text = str(err.value)
    assert "alpha" in text and "probability" in text and "lam_mode" in text


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pairing": "world"}, r"pairing must be 'local' or 'global', got 'world'"),
        ({"policy": "mixup"}, r"policy must be one of 'blend', 'nfm', .* got 'mixup'"),
        ({"policy": "patchup-soft", "lam_mode": "sample"}, r"patchup-soft' needs lam_mode"),
    ],
)
def test_constructor_rejects_bad_pairing_and_policy(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(MisconfigurationException, match=message):
        ManifoldMixupCallback(**kwargs)


def test_cutmix_needs_batch_lam() -> None:
    with pytest.raises(MisconfigurationException, match="cutmix_prob > 0 needs lam_mode='batch'"):
        ManifoldMixupCallback(cutmix_prob=0.5, lam_mode="sample")


def test_layer_weights_must_match_the_eligible_set() -> None:
    cb = ManifoldMixupCallback(layers=["net.*"], layer_weights=[1, 1], seed=0)
    with pytest.raises(MisconfigurationException, match=r"layer_weights has 2 entries .* has 5"):
        quiet_trainer(max_epochs=1, callbacks=[cb]).fit(MLPClassifier(), make_loader(n=128))


def test_schedules_need_a_finite_run() -> None:
    cb = ManifoldMixupCallback(layers=["net.1"], alpha_schedule="linear", seed=0)
    with pytest.raises(MisconfigurationException, match="needs a finite run length"):
        quiet_trainer(max_epochs=-1, max_steps=-1, max_time={"seconds": 5}, callbacks=[cb]).fit(
            MLPClassifier(), make_loader(n=128)
        )


def test_global_pairing_is_refused_when_processes_split_the_model() -> None:
    """Four processes as 2 data-parallel replicas x 2 tensor-parallel shards (2D parallelism):
    the gather would collect each replica's batch twice. (With one replica, global pairing is
    local pairing and only warns.)"""
    strategy = fake_strategy(distributed_sampler_kwargs={"num_replicas": 2, "rank": 0})
    trainer = fake_trainer(world_size=4, global_rank=1, strategy=strategy)
    cb = ManifoldMixupCallback(
        layers=["input", "net.1", "net.3"], seed=5, pairing="global", log=False
    )
    with pytest.raises(MisconfigurationException, match="4 processes hold 2 data-parallel"):
        cb.on_fit_start(trainer, MLPClassifier())
    assert cb._hooks.handles == []  # refused before any hook is registered


def test_unreadable_callback_state_is_refused_with_the_way_out() -> None:
    cb = ManifoldMixupCallback(layers=["net.1"])
    with pytest.raises(ValueError, match=r"cannot read checkpoint state .*expected version 1"):
        cb.load_state_dict({"version": 99, "seed": 1, "step": 2})


# ----------------------------------------------------------------------------- the layers


class Counting(MLPClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.steps = 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.steps += 1
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        (["net.l"], r"unknown layer 'net\.l'"),
        (
            ["net.3", "net.12"],
            r"unknown layer 'net\.12'; did you mean .*'net\.1'"
            r".*Available: 'input', 'net', 'net\.0'",
        ),
        (["head.*"], r"layer pattern 'head\.\*' matches no submodule"),
    ],
)
def test_bad_layer_names_fail_before_any_training(layers: list[str], message: str) -> None:
    model = Counting()
    cb = ManifoldMixupCallback(layers=layers)
    trainer = quiet_trainer(max_steps=2, num_sanity_val_steps=2, callbacks=[cb])
    with pytest.raises(ValueError, match=message):
        trainer.fit(model, make_loader(), make_loader())
    assert model.steps == 0


def test_an_unknown_layer_of_a_late_built_model_fails_before_the_sanity_check() -> None:
    class Validating(LateMLP):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            raise AssertionError("the sanity check ran")

    cb = ManifoldMixupCallback(layers=["net.7"], seed=0)
    trainer = quiet_trainer(max_steps=1, callbacks=[cb], num_sanity_val_steps=2)
    with pytest.raises(ValueError, match=r"unknown layer 'net\.7'"):
        trainer.fit(Validating(), make_loader(), make_loader())


# ---------------------------------------------------------------------------- the targets


class NoClasses(ManifoldMixupMixin, L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_integer_targets_without_num_classes_name_the_three_ways_to_give_it() -> None:
    cb = ManifoldMixupCallback(layers=["net.1"])
    with pytest.raises(ValueError, match=r"need num_classes .*num_classes=.*save_hyperparameters"):
        quiet_trainer(max_steps=1, callbacks=[cb]).fit(NoClasses(), make_loader())


def test_num_classes_is_read_from_hparams() -> None:
    class WithHparams(NoClasses):
        def __init__(self, num_classes: int = 4) -> None:
            super().__init__()
            self.save_hyperparameters()

    class Spy(KeepsTargets, WithHparams):
        pass

    model = Spy()
    cb = ManifoldMixupCallback(layers=["net.1"], seed=0)
    quiet_trainer(max_steps=1, callbacks=[cb]).fit(model, make_loader())
    assert model.targets[0].shape == (16, 4)


def test_labels_outside_the_class_range_are_refused() -> None:
    cb = ManifoldMixupCallback(layers=["net.1"], num_classes=3, seed=0)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\), got values in \[0, 3\]"):
        quiet_trainer(max_steps=1, callbacks=[cb]).fit(MLPClassifier(), make_loader())


def test_later_out_of_range_labels_on_the_cpu_get_the_label_message() -> None:
    y = torch.randint(0, 4, (16,))
    y[13] = 7  # in the fourth batch, after the one-time check of the first
    loader = DataLoader(TensorDataset(torch.randn(16, 8), y), batch_size=4)
    cb = ManifoldMixupCallback(layers=["net.1"], seed=0)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\), got values in \[\d, 7\]"):
        quiet_trainer(max_epochs=1, callbacks=[cb]).fit(MLPClassifier(), loader)


# ---------------------------------------------------------------------------- the batches


def test_missing_target_names_the_key_and_the_batch_layout() -> None:
    cb = ManifoldMixupCallback(layers=["net.1"], target_key=2, seed=0)
    with pytest.raises(ValueError, match=r"no entry at target_key=2 .*list of length 2"):
        quiet_trainer(max_steps=1, callbacks=[cb]).fit(MLPClassifier(), make_loader())


def test_missing_dict_key_lists_the_keys() -> None:
    data = [{"x": torch.randn(8), "y": torch.tensor(1)} for _ in range(8)]
    cb = ManifoldMixupCallback(layers=["net.1"], input_key="x", target_key="label", seed=0)
    with pytest.raises(ValueError, match=r"target_key='label' .*keys \['x', 'y'\]"):
        quiet_trainer(max_steps=1, callbacks=[cb]).fit(
            MLPClassifier(), DataLoader(data, batch_size=4)
        )  # type: ignore[arg-type]


def test_input_and_target_batch_sizes_must_agree() -> None:
    def short_targets(samples: list[Any]) -> list[torch.Tensor]:
        return [torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])[:-1]]

    ds = TensorDataset(torch.randn(8, 8), torch.randint(0, 4, (8,)))
    cb = ManifoldMixupCallback(layers=["net.1"], seed=0)
    with pytest.raises(
        ValueError, match=r"batch sizes differ: input has 4 rows, target has shape \(3,\)"
    ):
        quiet_trainer(max_steps=1, callbacks=[cb]).fit(
            MLPClassifier(), DataLoader(ds, batch_size=4, collate_fn=short_targets)
        )


# ------------------------------------------------------- what the layers and the input hold


class Binarize(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x > 0


class BoolLayer(MLPClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.gate = Binarize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.gate(x).float())


def test_a_layer_whose_output_holds_no_float_tensor_is_refused() -> None:
    cb = ManifoldMixupCallback(layers=["gate"], seed=0)
    with pytest.raises(
        ValueError, match=r"layer 'gate' returned a torch\.bool tensor .*no floating"
    ):
        quiet_trainer(max_steps=1, callbacks=[cb]).fit(BoolLayer(), make_loader())


class BatchMean(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=0)


class MeanLayer(MLPClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.summary = BatchMean()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x - self.summary(x))


def test_a_layer_whose_output_does_not_hold_the_batch_is_refused() -> None:
    cb = ManifoldMixupCallback(layers=["summary"], seed=0)
    with pytest.raises(
        ValueError,
        match=r"layer 'summary' returned a torch\.float32 tensor of shape \(8,\), which holds no "
        r"floating tensor with batch dimension 16",
    ):
        quiet_trainer(max_steps=1, callbacks=[cb]).fit(MeanLayer(), make_loader())


def test_cutmix_on_a_flat_layer_is_refused() -> None:
    cb = ManifoldMixupCallback(layers=["net.1"], cutmix_prob=1.0, seed=0)
    with pytest.raises(ValueError, match=r"CutMix at layer 'net\.1' needs a \(B, C, H, W\)"):
        quiet_trainer(max_epochs=1, callbacks=[cb]).fit(MLPClassifier(), make_loader(n=128))


class Unused(MLPClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.spare = nn.ReLU()


def test_a_chosen_layer_that_never_runs_is_an_error_not_a_silent_target_mix() -> None:
    model = Unused()
    cb = ManifoldMixupCallback(layers=["spare"], seed=0)
    with pytest.raises(
        RuntimeError, match=r"layers \['spare'\] did not run during the first training step"
    ):
        quiet_trainer(max_steps=1, callbacks=[cb]).fit(model, make_loader())
    assert cb.current is None
    assert len(model.spare._forward_hooks) == 0


def test_input_mixup_of_integer_inputs_is_refused() -> None:
    ds = TensorDataset(torch.randint(0, 10, (8, 8)), torch.randint(0, 4, (8,)))

    class Embed(MLPClassifier):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x.float())

    cb = ManifoldMixupCallback(layers=["input"], seed=0)
    with pytest.raises(ValueError, match=r"input mixup needs a floating-point input"):
        quiet_trainer(max_steps=1, callbacks=[cb]).fit(Embed(), DataLoader(ds, batch_size=4))


class DictInput(MLPClassifier):
    """Takes ``({"x": float (B, 8), "ids": int64 (B,)}, y)`` batches."""

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        return self.net(inputs["x"] + 0.01 * inputs["ids"].unsqueeze(1))


def test_input_mixup_refuses_an_integer_tensor_of_a_dict_input_and_names_its_key() -> None:
    samples = [
        ({"x": torch.randn(8), "ids": torch.tensor(i)}, torch.tensor(i % 4)) for i in range(8)
    ]
    cb = ManifoldMixupCallback(layers=["input"], seed=0)
    with pytest.raises(
        ValueError,
        match=r"input mixup needs a floating-point input: the input at input_key=0\['ids'\] is a "
        r"torch\.int64 tensor of shape \(4,\).*mix a hidden layer instead",
    ):
        quiet_trainer(max_steps=1, callbacks=[cb]).fit(
            DictInput(),
            DataLoader(samples, batch_size=4),  # type: ignore[arg-type]
        )


def test_integer_multi_column_targets_are_refused() -> None:
    ds = TensorDataset(torch.randn(8, 8), torch.randint(0, 2, (8, 4)))
    cb = ManifoldMixupCallback(layers=["net.1"], seed=0)
    # Integer (B, T) targets are token labels; for (B, C) logits they fit no class axis.
    with pytest.raises(
        ValueError,
        match=r"do not fit integer targets of shape \(4, 4\).*look like multi-label 0/1 rows: "
        r"make them float \(y\.float\(\)\) and set mixup_criterion = 'bce_with_logits'",
    ):
        quiet_trainer(max_steps=1, callbacks=[cb]).fit(
            MLPClassifier(), DataLoader(ds, batch_size=4)
        )


# ------------------------------------------------------------- the trainer and the batch type


def test_two_mixup_callbacks_in_one_trainer_are_refused() -> None:
    callbacks = [ManifoldMixupCallback(layers=["net.1"]), ManifoldMixupCallback(layers=["net.3"])]
    # Lightning refuses this when the Trainer is built, before any data is touched.
    with pytest.raises(
        RuntimeError, match=r"more than one stateful callback .*ManifoldMixupCallback"
    ):
        quiet_trainer(max_steps=1, callbacks=callbacks)


def test_a_module_without_the_mixin_is_warned_about_mixed_targets() -> None:
    cb = ManifoldMixupCallback(layers=["net.1"], seed=0)
    with pytest.warns(UserWarning, match=r"PlainModule does not use ManifoldMixupMixin"):
        quiet_trainer(max_steps=1, callbacks=[cb]).fit(PlainModule(), make_loader())


class IterStep(MLPClassifier):
    def training_step(self, dataloader_iter: Any) -> torch.Tensor:  # type: ignore[override]
        batch, _, _ = next(dataloader_iter)
        return super().training_step(batch, 0)


def test_dataloader_iter_training_steps_are_refused_before_training() -> None:
    cb = ManifoldMixupCallback(layers=["net.1"], seed=0)
    model = IterStep()
    with pytest.raises(MisconfigurationException, match="takes a dataloader_iter"):
        quiet_trainer(max_steps=1, callbacks=[cb]).fit(model, make_loader())
    assert model.global_step == 0


def test_several_training_dataloaders_get_a_clear_error() -> None:
    cb = ManifoldMixupCallback(layers=["net.1"], seed=0)
    trainer = quiet_trainer(max_steps=1, callbacks=[cb])
    with pytest.raises(TypeError, match=r"target at target_key=1 is a list, not a tensor"):
        trainer.fit(MLPClassifier(), [make_loader(), make_loader(seed=1)])
    assert trainer.global_step == 0


def test_namedtuple_batches_get_a_clear_error() -> None:
    from collections import namedtuple

    Pair = namedtuple("Pair", ["x", "y"])

    def collate(rows: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
        return Pair(torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]))

    ds = TensorDataset(torch.randn(8, 8), torch.randint(0, 4, (8,)))
    cb = ManifoldMixupCallback(layers=["net.1"], seed=0)
    trainer = quiet_trainer(max_steps=1, callbacks=[cb])
    with pytest.raises(TypeError, match=r"cannot rewrite a namedtuple batch \(Pair\)"):
        trainer.fit(MLPClassifier(), DataLoader(ds, batch_size=4, collate_fn=collate))


def test_tuple_batches_without_the_mixin_get_a_clear_error() -> None:
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
    loader = DataLoader(TensorDataset(x, y), batch_size=4, collate_fn=tuple_collate)
    cb = ManifoldMixupCallback(layers=["net.1"], seed=0)
    with pytest.raises(TypeError, match="cannot rewrite a tuple batch in place"):
        quiet_trainer(max_steps=2, callbacks=[cb]).fit(PlainModule(), loader)


# ------------------------------------------------------------------------ the functions
B, INDEX, LAM = 4, torch.tensor([2, 0, 3, 1]), torch.tensor(0.3)


def test_unknown_name_suggests_close_matches_and_lists_available() -> None:
    with pytest.raises(
        ValueError, match=r"unknown layer 'net\.layr1'; did you mean 'net\.layer1'"
    ) as err:
        resolve_layers(Holder(torchvision.models.resnet18(num_classes=10)), ["net.layr1"])
    assert "Available: 'input', 'net', 'net.conv1'" in str(err.value)


def test_pattern_that_matches_nothing_is_refused() -> None:
    with pytest.raises(ValueError, match=r"layer pattern 'net\.block\*' matches no submodule"):
        resolve_layers(Holder(torchvision.models.resnet18(num_classes=10)), ["net.block*"])


def test_empty_layer_list_is_refused() -> None:
    with pytest.raises(ValueError, match="layers is empty"):
        resolve_layers(Holder(torchvision.models.resnet18(num_classes=10)), [])


def test_model_without_candidates_needs_explicit_layers() -> None:
    with pytest.raises(ValueError, match="could not select layers automatically"):
        resolve_layers(Holder(nn.Linear(3, 2)), None)


def test_unknown_criterion_is_refused() -> None:
    logits, y = torch.randn(6, 5), torch.randint(0, 5, (6,))
    with pytest.raises(ValueError, match="unknown criterion 'mse'"):
        mixup_loss(logits, y, criterion="mse")  # type: ignore[arg-type]


def test_mixing_an_integer_tensor_is_refused() -> None:
    with pytest.raises(TypeError, match="floating point"):
        mix_tensor(torch.arange(4), torch.tensor(0.5), torch.arange(4))


def test_integer_targets_without_num_classes_are_refused() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        mix_targets(torch.tensor([0, 1]), torch.tensor(0.5), torch.tensor([1, 0]))


def test_a_packed_sequence_is_refused_with_the_layer_named() -> None:
    lstm = nn.LSTM(3, 5, batch_first=True)
    packed = pack_padded_sequence(torch.randn(B, 6, 3), [6, 5, 3, 2], batch_first=True)
    with pytest.raises(ValueError, match=r"layer 'net\.rnn' returned, at output\[0\], a Packed"):
        mix_batch(lstm(packed), LAM, INDEX, B, where="layer 'net.rnn'", module=lstm)


def test_an_unbatched_rnn_output_is_refused() -> None:
    lstm = nn.LSTM(3, 5, batch_first=True)
    with pytest.raises(ValueError, match=r"returned shape \(6, 5\) at output\[0\].*axis 0"):
        mix_batch(lstm(torch.randn(6, 3)), LAM, INDEX, B, where="layer 'rnn'", module=lstm)


def test_a_time_major_output_of_an_undeclared_module_is_ambiguous() -> None:
    out = torch.randn(7, B, 3)
    with pytest.raises(
        ValueError,
        match=r"layer 'tm' \(TimeMajor\) declares no batch_first.*"
        r"batch of 4 on axis 1 and not on axis 0",
    ):
        mix_batch(out, LAM, INDEX, B, where="layer 'tm'", module=TimeMajor())


def test_an_integer_tensor_of_the_input_batch_is_refused_with_its_key() -> None:
    batch = {"pixels": torch.randn(B, 3), "ids": torch.arange(B)}
    with pytest.raises(ValueError, match=r"the input at input_key=0\['ids'\] is a torch\.int64"):
        mix_batch(batch, LAM, INDEX, B, where="the input at input_key=0")


def test_an_integer_tensor_in_a_layer_output_is_refused() -> None:
    pool = nn.MaxPool1d(2, return_indices=True)
    with pytest.raises(
        ValueError,
        match=r"layer 'pool' returned a torch\.int64 tensor .* at "
        r"output\[1\]",
    ):
        mix_batch(pool(torch.randn(B, 2, 6)), LAM, INDEX, B, where="layer 'pool'", module=pool)
