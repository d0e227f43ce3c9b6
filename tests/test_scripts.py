"""What third-party training scripts meet when the callback is added (issue 29): training
metrics on mixed targets, one target format for the whole fit, binary BCE, Hugging Face
defaults and conventions, MixedTarget in user code, dataclass batches and tuple targets."""

from __future__ import annotations

import dataclasses
import re
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import MLPClassifier, quiet_trainer
from lightning_manifold_mixup import (
    ManifoldMixupCallback,
    ManifoldMixupMixin,
    MixedTarget,
    candidate_layers,
    dominant_class,
    mixup_loss,
)

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]


def xy_loader(y: torch.Tensor, rows: int = 16, features: int = 8, batch: int = 4) -> DataLoader:
    x = torch.randn(rows, features, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(x, y), batch_size=batch)


class Plain(L.LightningModule):
    """A user's module without the mixin: its own loss, and a record of each step's target."""

    def __init__(self, out: int = 4, loss: Any = F.cross_entropy) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, out))
        self.loss = loss
        self.targets: list[Any] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        self.targets.append(y)
        return self.loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Recording(MLPClassifier):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.targets: list[Any] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.targets.append(batch[1])
        return self.mixup_loss(self(batch[0]), batch[1])


def labels(rows: int = 16, classes: int = 4) -> torch.Tensor:
    return torch.randint(0, classes, (rows,), generator=torch.Generator().manual_seed(1))


# 1. Training metrics on mixed targets


def test_the_no_mixin_warning_shows_the_training_metrics_fix() -> None:
    cb = ManifoldMixupCallback(layers=["net.1"], num_classes=4, seed=0)
    with pytest.warns(UserWarning, match=r"does not use ManifoldMixupMixin") as got:
        quiet_trainer(max_steps=1, callbacks=[cb]).fit(Plain(), xy_loader(labels()))
    text = next(str(w.message) for w in got if "ManifoldMixupMixin" in str(w.message))
    assert "dominant_class(y)" in text and "Accuracy" in text


def test_the_readme_usage_shows_the_training_metrics_fix() -> None:
    readme = (ROOT / "README.md").read_text()
    usage = readme[readme.index("## Usage") : readme.index("### `ManifoldMixupCallback`")]
    assert "dominant_class(y)" in usage
    assert "import" in usage and "dominant_class" in usage.split("class LitClassifier")[0]


def test_the_docs_describe_training_metrics_with_the_mixins_as_the_default() -> None:
    targets = (ROOT / "docs" / "targets.md").read_text()
    section = targets[targets.index("## Training metrics") :]
    assert "train_acc_step" in section and "dominant_class" in section


def test_dominant_class_of_binary_float_labels_is_the_heavier_side() -> None:
    mixed = torch.tensor([0.3, 0.7, 0.5, 1.0])
    assert torch.equal(dominant_class(mixed), torch.tensor([0, 1, 1, 1]))
    assert torch.equal(dominant_class(mixed[:, None]), torch.tensor([[0], [1], [1], [1]]))


def test_metrics_on_class_indices_of_the_targets_hold_for_every_batch_of_a_fit() -> None:
    torchmetrics = pytest.importorskip("torchmetrics")

    class WithAccuracy(Plain):
        def __init__(self) -> None:
            super().__init__()
            self.acc = torchmetrics.Accuracy(task="multiclass", num_classes=4)
            self.scores: list[float] = []

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            logits = self(x)
            # Both the documented fix and the natural one work on mixed and unmixed batches.
            assert torch.equal(dominant_class(y), y.argmax(1))
            self.scores.append(float(self.acc(logits, dominant_class(y))))
            return F.cross_entropy(logits, y)

    model = WithAccuracy()
    cb = ManifoldMixupCallback(layers=["net.1"], num_classes=4, probability=0.5, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quiet_trainer(max_steps=8, max_epochs=-1, callbacks=[cb]).fit(model, xy_loader(labels()))
    assert len(model.scores) == 8
    assert 0 < cb.summary["unmixed_batches"] < 8  # both kinds of batch were met


class BinaryMixin(ManifoldMixupMixin, L.LightningModule):
    """One logit per row, BCE on float 0/1 labels (B, 1): the mixin's default training_step."""

    mixup_criterion = "bce_with_logits"

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.seen.append((self(batch[0]).detach(), batch[1]))
        return super().training_step(batch, batch_idx)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_the_mixins_train_accuracy_of_a_single_logit_model_reads_the_logits_sign() -> None:
    y = (torch.arange(16) % 2).float()[:, None]
    model = BinaryMixin()
    cb = ManifoldMixupCallback(layers=["net.1"], seed=0)
    trainer = quiet_trainer(max_steps=1, log_every_n_steps=1, callbacks=[cb])
    trainer.fit(model, xy_loader(y))
    logits, target = model.seen[0]
    side = (logits > 0).float()
    expected = ((logits > 0) == (target >= 0.5)).float().mean()
    mixed = (side * target + (1 - side) * (1 - target)).mean()
    torch.testing.assert_close(trainer.callback_metrics["train_acc_step"], expected)
    torch.testing.assert_close(trainer.callback_metrics["train_mixed_acc_step"], mixed)


# 2. One target format for the whole fit


def test_unmixed_batches_get_one_hot_soft_targets_like_mixed_ones() -> None:
    y = labels()
    model = Recording(num_classes=4)
    cb = ManifoldMixupCallback(layers=["net.1"], probability=0.5, seed=3)
    quiet_trainer(max_epochs=2, callbacks=[cb]).fit(model, xy_loader(y))
    assert all(t.dtype == torch.float32 and t.shape == (4, 4) for t in model.targets)
    # The unmixed batches (of the second epoch too) are exactly one-hot rows of their labels.
    one_hot = F.one_hot(y, 4).float().split(4) * 2
    exact = [torch.equal(t, expected) for t, expected in zip(model.targets, one_hot, strict=True)]
    assert sum(exact) == cb.summary["unmixed_batches"] > 0


def test_unmixed_batches_get_a_pair_with_lam_one_in_pair_mode() -> None:
    y = labels()
    model = Recording(num_classes=4)
    cb = ManifoldMixupCallback(layers=["net.1"], probability=0.0, targets="pair", seed=0)
    quiet_trainer(max_epochs=1, callbacks=[cb]).fit(model, xy_loader(y))
    for target, rows in zip(model.targets, y.split(4), strict=True):
        assert isinstance(target, MixedTarget)
        assert torch.equal(target.y_a, rows) and torch.equal(target.y_b, rows)
        assert float(target.lam) == 1.0


def test_batches_after_stop_epoch_keep_the_soft_target_format() -> None:
    model = Recording(num_classes=4)
    cb = ManifoldMixupCallback(layers=["net.1"], stop_epoch=1, seed=0)
    quiet_trainer(max_epochs=2, callbacks=[cb]).fit(model, xy_loader(labels()))
    late = model.targets[4:]  # the second epoch: never mixed
    assert len(late) == 4
    assert all(t.shape == (4, 4) and torch.equal(t.sum(1), torch.ones(4)) for t in late)
    assert all(torch.equal(t.max(1).values, torch.ones(4)) for t in late)


class Segmenter(ManifoldMixupMixin, L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 1))
        self.targets: list[Any] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.targets.append(batch[1])
        return self.mixup_loss(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_unmixed_class_maps_are_a_pair_with_lam_one() -> None:
    masks = torch.randint(0, 3, (8, 6, 6), generator=torch.Generator().manual_seed(2))
    loader = DataLoader(TensorDataset(torch.randn(8, 1, 6, 6), masks), batch_size=4)
    model = Segmenter()
    cb = ManifoldMixupCallback(layers=["net.1"], probability=0.0, seed=0)
    quiet_trainer(max_epochs=1, callbacks=[cb]).fit(model, loader)
    for target, rows in zip(model.targets, masks.split(4), strict=True):
        assert isinstance(target, MixedTarget)
        assert torch.equal(target.y_a, rows) and torch.equal(target.y_b, rows)
        assert float(target.lam) == 1.0


# 3. Binary single-logit BCE


def test_binary_integer_labels_without_num_classes_are_told_to_become_float() -> None:
    y = torch.tensor([0, 1] * 8)
    model = Plain(out=1, loss=lambda logits, t: F.binary_cross_entropy_with_logits(logits[:, 0], t))
    cb = ManifoldMixupCallback(layers=["net.1"], seed=0)
    trainer = quiet_trainer(max_steps=2, callbacks=[cb])
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"make them float") as err:
        trainer.fit(model, xy_loader(y))
    assert "y.float()" in str(err.value)
    assert trainer.global_step == 0


def test_the_no_mixin_warning_says_float_targets_keep_their_shape() -> None:
    y = torch.tensor([0.0, 1.0] * 8)
    model = Plain(out=1, loss=lambda logits, t: F.binary_cross_entropy_with_logits(logits[:, 0], t))
    cb = ManifoldMixupCallback(layers=["net.1"], seed=0)
    with pytest.warns(UserWarning, match=r"does not use ManifoldMixupMixin") as got:
        quiet_trainer(max_steps=2, callbacks=[cb]).fit(model, xy_loader(y))
    text = next(str(w.message) for w in got if "ManifoldMixupMixin" in str(w.message))
    assert re.search(r"float targets \(binary.*keep their shape", text)
    assert all(t.shape == (4,) and t.is_floating_point() for t in model.targets)


# 4. Hugging Face defaults that agree


def bert_config(**overrides: Any) -> Any:
    return transformers.BertConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        vocab_size=100,
        max_position_embeddings=12,
        **overrides,
    )


def test_bert_automatic_selection_is_its_encoder_layers() -> None:
    model = transformers.BertForSequenceClassification(bert_config(num_labels=3))
    assert candidate_layers(model) == ["bert.encoder.layer.0", "bert.encoder.layer.1"]


def test_albert_automatic_selection_is_its_per_token_embeddings_output() -> None:
    config = transformers.AlbertConfig(
        embedding_size=8,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        vocab_size=100,
    )
    model = transformers.AlbertForSequenceClassification(config)
    assert candidate_layers(model) == ["albert.embeddings"]


def text_loader(rows: int = 16, length: int = 12) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(rows):
        size = int(torch.randint(2, length + 1, (1,), generator=g))
        ids = torch.zeros(length, dtype=torch.long)
        ids[:size] = torch.randint(2, 100, (size,), generator=g)
        label = torch.randint(0, 3, (), generator=g)
        data.append({"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": label})
    return DataLoader(data, batch_size=4)


class Glue(ManifoldMixupMixin, L.LightningModule):
    """Like Lightning's GLUE tutorial: saved hyperparameters with num_labels, a config of its
    own, and a Hugging Face classifier called on the batch."""

    def __init__(self, num_labels: int = 3, with_labels: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.config = bert_config(num_labels=num_labels)
        self.model = transformers.BertForSequenceClassification(self.config)

    def forward(self, **inputs: torch.Tensor) -> Any:
        return self.model(**inputs)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.hparams["with_labels"]:
            return self(**batch).loss
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return self.mixup_loss(self(**inputs).logits, batch["labels"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_the_default_mask_union_does_not_warn_with_automatic_layers_on_bert() -> None:
    cb = ManifoldMixupCallback(input_key="input_ids", target_key="labels", seed=0)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        quiet_trainer(max_steps=8, max_epochs=-1, callbacks=[cb]).fit(Glue(), text_loader())
    assert cb.summary["layers"]  # batches were mixed
    assert not [w for w in got if "attend to their own padding" in str(w.message)]


def test_a_lightning_module_with_a_config_is_named_in_the_refusal() -> None:
    cb = ManifoldMixupCallback(
        layers=["model.bert.encoder.layer.0"], input_key="input_ids", target_key="labels"
    )
    trainer = quiet_trainer(max_steps=1, callbacks=[cb])
    with pytest.raises(RuntimeError, match=r"Glue \(the LightningModule itself\)") as err:
        trainer.fit(Glue(with_labels=True), text_loader())
    assert "at ''" not in str(err.value)


class Tagger(ManifoldMixupMixin, L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = transformers.BertForTokenClassification(bert_config(num_labels=3))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model(**batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_the_token_classification_refusal_does_not_claim_a_problem_type_switch() -> None:
    rows = [dict(r, labels=torch.randint(0, 3, (12,))) for r in text_loader().dataset]
    cb = ManifoldMixupCallback(
        layers=["model.bert.encoder.layer.0"], input_key="input_ids", target_key="labels"
    )
    with pytest.raises(RuntimeError, match=r"called with the training targets") as err:
        quiet_trainer(max_steps=1, callbacks=[cb]).fit(Tagger(), DataLoader(rows, batch_size=4))
    assert "problem_type" not in str(err.value)
    assert "cross-entropy" in str(err.value)


# 5. num_classes from Hugging Face conventions


def test_num_classes_is_read_from_hparams_num_labels() -> None:
    class Saved(Recording):
        def __init__(self, num_labels: int) -> None:
            super().__init__(num_classes=num_labels)
            self.num_classes = None  # type: ignore[assignment]
            self.save_hyperparameters()

    model = Saved(num_labels=4)
    cb = ManifoldMixupCallback(layers=["net.1"], seed=0)
    quiet_trainer(max_steps=1, callbacks=[cb]).fit(model, xy_loader(labels()))
    assert model.targets[0].shape == (4, 4)


def test_num_classes_is_read_from_the_models_config_num_labels() -> None:
    class Wrapper(ManifoldMixupMixin, L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = transformers.BertForSequenceClassification(bert_config(num_labels=3))
            self.targets: list[Any] = []

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            self.targets.append(batch["labels"])
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            return self.mixup_loss(self.model(**inputs).logits, batch["labels"])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    model = Wrapper()
    cb = ManifoldMixupCallback(input_key="input_ids", target_key="labels", seed=0)
    quiet_trainer(max_steps=1, callbacks=[cb]).fit(model, text_loader())
    assert model.targets[0].shape == (4, 3)


def test_the_missing_num_classes_error_does_not_advise_save_hyperparameters_when_called() -> None:
    class Saved(Recording):
        def __init__(self, lr: float = 0.1) -> None:
            super().__init__()
            self.num_classes = None  # type: ignore[assignment]
            self.save_hyperparameters()

    cb = ManifoldMixupCallback(layers=["net.1"], seed=0)
    with pytest.raises(ValueError, match=r"need num_classes") as err:
        quiet_trainer(max_steps=1, callbacks=[cb]).fit(Saved(), xy_loader(labels()))
    assert "self.save_hyperparameters()" not in str(err.value)
    assert "self.hparams has ['lr']" in str(err.value)


# 6. MixedTarget in user code


def test_mixed_target_moves_and_casts_with_to_like_a_tensor() -> None:
    target = MixedTarget(torch.tensor([0, 2]), torch.tensor([1, 0]), torch.tensor(0.25))
    moved = target.to(torch.device("cpu"))
    assert isinstance(moved, MixedTarget) and moved.lam.device.type == "cpu"
    cast = target.to(torch.int32)
    assert cast.y_a.dtype == cast.y_b.dtype == torch.int32
    assert cast.lam.dtype == torch.float32 and torch.equal(cast.y_b, torch.tensor([1, 0]).int())


def test_mixed_target_tensor_methods_point_to_mixup_loss() -> None:
    target = MixedTarget(torch.tensor([0, 2]), torch.tensor([1, 0]), torch.tensor(0.25))
    with pytest.raises(AttributeError, match=r"'long'.*mixup_loss\(logits, target\)"):
        target.long()
    assert mixup_loss(torch.zeros(2, 3), target.to("cpu")).shape == ()


# 7. Odd containers


@dataclasses.dataclass
class Batch:
    x: torch.Tensor
    y: torch.Tensor


class DataclassModule(Plain):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.targets.append(batch.y)
        return F.cross_entropy(self(batch.x), batch.y)


def dataclass_loader(kind: type, y: torch.Tensor) -> DataLoader:
    x = torch.randn(len(y), 8, generator=torch.Generator().manual_seed(0))
    pairs = list(zip(x, y, strict=True))
    return DataLoader(
        pairs,
        batch_size=4,
        collate_fn=lambda rows: kind(*map(torch.stack, zip(*rows, strict=True))),
    )


def test_dataclass_batches_are_mixed_by_field_name() -> None:
    y = labels(8)
    model = DataclassModule()
    cb = ManifoldMixupCallback(layers=["input"], input_key="x", target_key="y", num_classes=4)
    with pytest.warns(UserWarning, match="does not use ManifoldMixupMixin"):
        quiet_trainer(max_steps=2, callbacks=[cb]).fit(model, dataclass_loader(Batch, y))
    assert all(t.shape == (4, 4) for t in model.targets)
    assert all(torch.allclose(t.sum(1), torch.ones(4)) for t in model.targets)


def test_a_labels_and_weights_tuple_target_gets_its_own_message() -> None:
    x, y, w = torch.randn(8, 8), labels(8), torch.rand(8)
    rows = [(x[i], (y[i], w[i])) for i in range(8)]
    cb = ManifoldMixupCallback(layers=["input"], num_classes=4)
    trainer = quiet_trainer(max_steps=1, callbacks=[cb])
    with pytest.warns(UserWarning), pytest.raises(TypeError, match=r"list of 2 tensors") as err:
        trainer.fit(Plain(), DataLoader(rows, batch_size=4))
    assert "dataloaders" not in str(err.value)
    assert "(x, labels, weights)" in str(err.value)


def test_a_dataclass_batch_without_the_named_field_lists_its_fields() -> None:
    cb = ManifoldMixupCallback(layers=["input"], input_key="x", target_key="label")
    trainer = quiet_trainer(max_steps=1, callbacks=[cb])
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"no field 'label'") as err:
        trainer.fit(DataclassModule(), dataclass_loader(Batch, labels(8)))
    assert "(fields ['x', 'y'])" in str(err.value)
