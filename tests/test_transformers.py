"""Hugging Face transformers as the backbone: tiny random-weight models built from configs."""

from __future__ import annotations

import copy
import dataclasses
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from conftest import hook_counts, quiet_trainer
from helpers import DecisionRecorder
from lightning_manifold_mixup import ManifoldMixupCallback, ManifoldMixupMixin, candidate_layers

transformers = pytest.importorskip("transformers")

VOCAB, LENGTH, CLASSES, PAD = 50, 12, 3, 0
Batch = dict[str, torch.Tensor]


def tiny_bert(**overrides: Any) -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=LENGTH,
        num_labels=CLASSES,
        pad_token_id=PAD,
        **overrides,
    )
    return transformers.BertForSequenceClassification(config)


def tiny_gpt2(**overrides: Any) -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=LENGTH,
        num_labels=CLASSES,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=1,
        **overrides,
    )
    return transformers.GPT2ForSequenceClassification(config)


def text_rows(n: int = 32, seed: int = 0, left_pad: bool = False) -> list[Batch]:
    """Token rows of lengths 2..LENGTH, padded with PAD (right, or left), and class labels."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(2, LENGTH + 1, (1,), generator=g))
        tokens = torch.randint(2, VOCAB, (length,), generator=g)
        ids = torch.full((LENGTH,), PAD)
        mask = torch.zeros(LENGTH, dtype=torch.long)
        where = slice(LENGTH - length, None) if left_pad else slice(0, length)
        ids[where], mask[where] = tokens, 1
        label = torch.randint(CLASSES, (), generator=g)
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": label})
    return rows


def loader(rows: list[Batch] | None = None, batch_size: int = 8) -> DataLoader:
    return DataLoader(rows if rows is not None else text_rows(), batch_size=batch_size)


Step = Callable[["TextClassifier", Batch], torch.Tensor]


def recommended_step(module: TextClassifier, batch: Batch) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = module.model(**inputs).logits
    module.logits = logits.detach()
    return module.mixup_loss(logits, batch["labels"])


def hf_loss_step(module: TextClassifier, batch: Batch) -> torch.Tensor:
    loss: torch.Tensor = module.model(**batch).loss
    return loss


class TextClassifier(ManifoldMixupMixin, L.LightningModule):
    def __init__(self, model: nn.Module, step: Step = recommended_step, lr: float = 1e-2) -> None:
        super().__init__()
        self.num_classes = CLASSES
        self.model = model
        self.step = step
        self.lr = lr
        self.logits: torch.Tensor | None = None
        self.seen: list[dict[str, Any]] = []
        self.seen_masks: list[torch.Tensor] = []

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss = self.step(self, batch)
        self.seen.append({"batch": copy.copy(batch), "loss": loss.detach(), "logits": self.logits})
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def callback(**kwargs: Any) -> ManifoldMixupCallback:
    defaults: dict[str, Any] = {"input_key": "input_ids", "target_key": "labels", "seed": 0}
    return ManifoldMixupCallback(**{**defaults, **kwargs})


def params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def unchanged(before: dict[str, torch.Tensor], module: nn.Module) -> bool:
    return all(torch.equal(before[k], v) for k, v in module.state_dict().items())


# ---------------------------------------------------------------- the documented example
def test_the_documented_example_runs() -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "transformers.md").read_text()
    example = doc.split("## Example", 1)[1]
    code = re.search(r"```python\n(.*?)```", example, re.S)
    assert code is not None
    namespace: dict[str, Any] = {"__name__": "docs_transformers"}
    exec(compile(code.group(1), "docs/transformers.md", "exec"), namespace)
    trainer, mixup = namespace["trainer"], namespace["mixup"]
    assert trainer.global_step == 8
    assert mixup.eligible == ["model.bert.encoder.layer.0", "model.bert.encoder.layer.1"]
    assert sum(mixup.summary["layers"].values()) == 8
    assert 0.0 <= float(trainer.callback_metrics["val_acc"]) <= 1.0


# ---------------------------------------------------------------- the model's own loss
@pytest.mark.parametrize("factory", [tiny_bert, tiny_gpt2], ids=["bert", "gpt2"])
def test_the_models_own_loss_on_mixed_labels_stops_before_any_optimizer_step(
    factory: Callable[[], nn.Module],
) -> None:
    model = TextClassifier(factory(), step=hf_loss_step)
    before = params(model)
    trainer = quiet_trainer(max_steps=3, callbacks=[callback()])
    with pytest.raises(RuntimeError, match=r"self\.mixup_loss\(out\.logits, batch\['labels'\]\)"):
        trainer.fit(model, loader())
    assert trainer.global_step == 0
    assert unchanged(before, model)
    assert model.model.config.problem_type is None
    assert sum(hook_counts(model).values()) == 0


def test_labels_passed_by_keyword_are_refused_also_on_batches_that_are_not_mixed() -> None:
    def step(module: TextClassifier, batch: Batch) -> torch.Tensor:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        loss: torch.Tensor = module.model(ids, attention_mask=mask, labels=batch["labels"]).loss
        return loss

    model = TextClassifier(tiny_bert(), step=step)
    trainer = quiet_trainer(max_steps=3, callbacks=[callback(probability=0.0)])
    # Unmixed batches carry the targets in the mixed form (one-hot soft targets).
    with pytest.raises(RuntimeError, match=r"called with the training targets.*soft targets"):
        trainer.fit(model, loader())
    assert trainer.global_step == 0
    assert model.model.config.problem_type is None


def test_pair_targets_given_to_the_model_are_refused_with_the_fix() -> None:
    model = TextClassifier(tiny_bert(), step=hf_loss_step)
    trainer = quiet_trainer(max_steps=3, callbacks=[callback(targets="pair")])
    with pytest.raises(RuntimeError, match=r"MixedTarget.*without labels"):
        trainer.fit(model, loader())
    assert trainer.global_step == 0


def test_a_copy_of_the_mixed_labels_is_caught_and_the_config_restored() -> None:
    def step(module: TextClassifier, batch: Batch) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        loss: torch.Tensor = module.model(**inputs, labels=batch["labels"].clone()).loss
        return loss

    model = TextClassifier(tiny_bert(), step=step)
    trainer = quiet_trainer(max_steps=3, callbacks=[callback()])
    with pytest.raises(RuntimeError, match=r"set config\.problem_type to 'multi_label_class"):
        trainer.fit(model, loader())
    assert trainer.global_step == 0
    assert model.model.config.problem_type is None


def test_validation_may_use_the_models_own_loss() -> None:
    class WithValidation(TextClassifier):
        def validation_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
            loss: torch.Tensor = self.model(**batch).loss
            self.log("val_loss", loss)
            return loss

    model = WithValidation(tiny_bert())
    trainer = quiet_trainer(max_epochs=1, callbacks=[callback()], num_sanity_val_steps=1)
    trainer.fit(model, loader(), loader(batch_size=16))
    assert torch.isfinite(trainer.callback_metrics["val_loss"])
    assert model.model.config.problem_type == "single_label_classification"


def test_float_multi_label_targets_may_use_the_models_own_bce_loss() -> None:
    rows = text_rows()
    for row in rows:
        row["labels"] = torch.nn.functional.one_hot(row["labels"], CLASSES).float()
    model = TextClassifier(tiny_bert(problem_type="multi_label_classification"), step=hf_loss_step)
    trainer = quiet_trainer(max_steps=2, callbacks=[callback()])
    trainer.fit(model, loader(rows))
    assert trainer.global_step == 2
    mixed = model.seen[0]["batch"]["labels"]
    assert not torch.equal(mixed, torch.stack([r["labels"] for r in rows[:8]]))


# ---------------------------------------------------------------- the mix itself
def test_an_encoder_layers_output_is_mixed_exactly() -> None:
    model = TextClassifier(tiny_bert())
    encoder = model.model.bert.encoder
    seen: dict[str, torch.Tensor] = {}
    # Registered before the callback's hook, so it sees layer 0's output before the mix.
    encoder.layer[0].register_forward_hook(lambda m, a, out: seen.setdefault("h", out.detach()))
    encoder.layer[1].register_forward_pre_hook(
        lambda m, args: seen.setdefault("next", args[0].detach())
    )
    cb = callback(layers=["model.bert.encoder.layer.0"])
    rec = DecisionRecorder()
    quiet_trainer(max_steps=1, callbacks=[cb, rec]).fit(model, loader())
    (decision,) = rec.decisions
    assert decision is not None
    h, lam, index = seen["h"], decision.lam, decision.index
    assert not torch.equal(index, torch.arange(8))
    torch.testing.assert_close(seen["next"], lam * h + (1 - lam) * h[index])
    y = torch.stack([r["labels"] for r in text_rows()[:8]])
    eye = torch.eye(CLASSES)
    expected = lam * eye[y] + (1 - lam) * eye[y[index]]
    torch.testing.assert_close(model.seen[0]["batch"]["labels"], expected)


def test_mixed_rows_get_the_union_of_both_attention_masks() -> None:
    model = TextClassifier(tiny_bert())
    cb = callback()
    rec = DecisionRecorder()
    quiet_trainer(max_steps=1, callbacks=[cb, rec]).fit(model, loader())
    mask = torch.stack([r["attention_mask"] for r in text_rows()[:8]])
    expected = mask | mask[rec.decisions[0].index]  # type: ignore[union-attr]
    assert not torch.equal(expected, mask)
    assert torch.equal(model.seen[0]["batch"]["attention_mask"], expected)
    assert model.seen[0]["batch"]["attention_mask"].dtype == mask.dtype


def test_a_mask_inside_the_input_dict_of_a_list_batch_gets_the_union_too() -> None:
    rows = text_rows()
    pairs = [({k: r[k] for k in ("input_ids", "attention_mask")}, r["labels"]) for r in rows]

    def step(module: TextClassifier, batch: Any) -> torch.Tensor:
        encoding, labels = batch
        module.seen_masks.append(encoding["attention_mask"])
        return module.mixup_loss(module.model(**encoding).logits, labels)

    model = TextClassifier(tiny_bert(), step=step)
    cb = callback(input_key=0, target_key=1)
    rec = DecisionRecorder()
    quiet_trainer(max_steps=1, callbacks=[cb, rec]).fit(model, DataLoader(pairs, 8))
    mask = torch.stack([r["attention_mask"] for r in rows[:8]])
    assert torch.equal(model.seen_masks[0], mask | mask[rec.last_decision.index])  # type: ignore[union-attr]


def test_union_masks_with_a_pooled_layer_warn_once_and_not_with_own_masks() -> None:
    pooled = ["model.bert.pooler"]
    with pytest.warns(UserWarning, match=r"'model\.bert\.pooler' returned .* no token dim") as got:
        quiet_trainer(max_steps=3, callbacks=[callback(layers=pooled)]).fit(
            TextClassifier(tiny_bert()), loader()
        )
    assert sum("no token dimension" in str(w.message) for w in got) == 1
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r".*no token dimension")
        cb = callback(layers=pooled, attention_mask_key=None)
        quiet_trainer(max_steps=2, callbacks=[cb]).fit(TextClassifier(tiny_bert()), loader())
        cb = callback()  # encoder blocks: (B, L, H) outputs
        quiet_trainer(max_steps=2, callbacks=[cb]).fit(TextClassifier(tiny_bert()), loader())


def test_attention_mask_key_none_keeps_every_rows_own_mask() -> None:
    model = TextClassifier(tiny_bert())
    quiet_trainer(max_steps=1, callbacks=[callback(attention_mask_key=None)]).fit(model, loader())
    mask = torch.stack([r["attention_mask"] for r in text_rows()[:8]])
    assert torch.equal(model.seen[0]["batch"]["attention_mask"], mask)


def partner_token_reaches_row(mask_key: str | None) -> bool:
    """Whether changing the partner's token beyond a row's own length changes that row's
    logits, with the embeddings' output mixed (each position depends on its own token only)."""
    rows = text_rows(n=2, seed=3)
    rows[0]["attention_mask"][3:] = 0
    rows[0]["input_ids"][3:] = PAD
    rows[1]["attention_mask"][:] = 1
    rows[1]["input_ids"][3:] = 7
    model = TextClassifier(
        tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), lr=0.0
    )
    cb = callback(layers=["model.bert.embeddings"], fixed_lam=0.5, attention_mask_key=mask_key)
    rec = DecisionRecorder()

    def first_row_logits(token: int) -> torch.Tensor:
        rows[1]["input_ids"][LENGTH - 1] = token
        quiet_trainer(max_steps=1, callbacks=[cb, rec]).fit(model, loader(rows, 2))
        logits: torch.Tensor = model.seen[-1]["logits"]
        return logits[0]

    # With two rows the permutation is a swap or the identity: use a seed that swaps.
    for seed in range(20):
        cb.config = dataclasses.replace(cb.config, seed=seed)
        first_row_logits(7)
        if rec.draws[-1][2] == (1, 0):
            break
    assert rec.draws[-1][2] == (1, 0)
    return not torch.allclose(first_row_logits(7), first_row_logits(8))


def test_union_mask_lets_a_row_see_its_partners_tokens_beyond_its_own_length() -> None:
    assert partner_token_reaches_row("attention_mask")


def test_own_masks_hide_the_partners_tokens_beyond_the_rows_length() -> None:
    assert not partner_token_reaches_row(None)


def test_bf16_mixed_fits_with_hidden_state_mixing() -> None:
    model = TextClassifier(tiny_bert())
    before = params(model)
    cb = callback()
    trainer = quiet_trainer(max_steps=3, precision="bf16-mixed", callbacks=[cb])
    trainer.fit(model, loader())
    assert trainer.global_step == 3
    assert sum(cb.summary["layers"].values()) == 3
    assert all(torch.isfinite(s["loss"]) and s["loss"].dtype == torch.float32 for s in model.seen)
    assert not unchanged(before, model)


def test_gpt2_fits_with_the_recommended_loss() -> None:
    model = TextClassifier(tiny_gpt2())
    cb = callback()
    quiet_trainer(max_steps=2, callbacks=[cb]).fit(model, loader(text_rows(left_pad=True)))
    assert set(cb.summary["layers"]) == {"model.transformer.h.0", "model.transformer.h.1"}
    assert sum(cb.summary["layers"].values()) == 2
    assert all(torch.isfinite(s["loss"]) for s in model.seen)
    assert model.model.config.problem_type is None


# ---------------------------------------------------------------- layers
def test_token_ids_listed_as_input_are_refused_at_the_first_batch() -> None:
    model = TextClassifier(tiny_bert())
    before = params(model)
    # "input" is never drawn (weight 0): the refusal must not wait for it.
    cb = callback(layers=["input", "model.bert.encoder.layer.0"], layer_weights=[0.0, 1.0])
    trainer = quiet_trainer(max_steps=3, callbacks=[cb])
    with pytest.raises(ValueError, match=r"input_key='input_ids' holds no floating-point"):
        trainer.fit(model, loader())
    assert trainer.global_step == 0
    assert unchanged(before, model)


def test_automatic_selection_picks_the_blocks_of_bert_gpt2_vit_and_llama() -> None:
    vit = transformers.ViTForImageClassification(
        transformers.ViTConfig(
            image_size=8,
            patch_size=4,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=37,
            num_labels=CLASSES,
        )
    )
    # The encoder blocks (per-token states), not the pooled [CLS] vector
    assert candidate_layers(tiny_bert()) == ["bert.encoder.layer.0", "bert.encoder.layer.1"]
    assert candidate_layers(tiny_gpt2()) == ["transformer.h.0", "transformer.h.1"]
    assert [n.rsplit(".", 1)[-1] for n in candidate_layers(vit)] == ["0", "1"]
    llama = transformers.LlamaForSequenceClassification(
        transformers.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            intermediate_size=37,
            num_labels=CLASSES,
            pad_token_id=PAD,
        )
    )
    assert candidate_layers(llama) == ["model.layers.0", "model.layers.1"]


def test_encoder_decoder_blocks_are_kept_by_automatic_selection() -> None:
    bart = transformers.BartForSequenceClassification(
        transformers.BartConfig(
            vocab_size=VOCAB,
            d_model=32,
            encoder_layers=3,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=37,
            decoder_ffn_dim=37,
            num_labels=CLASSES,
            max_position_embeddings=LENGTH,
        )
    )
    assert candidate_layers(bart) == [
        "model.encoder.layers.0",
        "model.encoder.layers.1",
        "model.encoder.layers.2",
        "model.decoder.layers.0",
    ]


@pytest.mark.parametrize(("groups", "inner"), [(1, 1), (2, 2)])
def test_albert_shared_layers_that_run_at_several_depths_are_not_selected(
    groups: int, inner: int
) -> None:
    albert = transformers.AlbertForSequenceClassification(
        transformers.AlbertConfig(
            vocab_size=VOCAB,
            embedding_size=16,
            hidden_size=32,
            num_hidden_layers=4,
            num_hidden_groups=groups,
            inner_group_num=inner,
            num_attention_heads=2,
            intermediate_size=37,
            num_labels=CLASSES,
        )
    )
    runs: dict[str, int] = {}
    for name, module in albert.named_modules():
        if name.startswith("albert.encoder.albert_layer_groups.") and name.count(".") == 5:
            runs[name] = 0
            module.register_forward_hook(lambda *a, n=name: runs.__setitem__(n, runs[n] + 1))
    albert(input_ids=torch.randint(2, VOCAB, (2, 5)))
    assert len(runs) == groups * inner
    assert all(count == 4 // groups for count in runs.values())
    # The per-token embeddings' output instead of the shared blocks, not the pooled output
    assert candidate_layers(albert) == ["albert.embeddings"]


@pytest.mark.slow
def test_a_compiled_hf_model_is_mixed_with_bounded_graphs() -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = TextClassifier(tiny_bert())
    model.model = torch.compile(model.model, backend="eager")
    cb = callback(layers=["model.bert.encoder.layer.*"])
    quiet_trainer(max_steps=6, callbacks=[cb]).fit(model, loader(text_rows(48)))
    assert sum(cb.summary["layers"].values()) == 6
    assert int(counters["stats"]["unique_graphs"]) <= len(cb.eligible) + 1
