"""Padding: which attention mask mixed rows of different lengths should get (tiny BERT).

A synthetic keyword task: sequences of 2-32 tokens (right-padded to 32), three classes; each
sequence holds two keyword tokens of its class and one of another class at random positions
among random filler tokens. A random-weight 2-layer BERT (hidden 32) is fine-tuned with
AdamW for ``--steps`` steps, batch 32, on 600 training sequences, and evaluated on 2000
test sequences. Variants:

    none     no mixup
    own      hidden-state mixup at the encoder blocks, every row keeps its own mask
             (attention_mask_key=None; the package's behaviour before the union)
    union    the same, mixed rows attend where either row has a token (the default)
    pooled   mixup of the pooled [CLS] representation only (layers=["model.bert.pooler"]),
             every row with its own mask

Prints test accuracy and NLL per variant and seed, their means, and the share of partner
tokens that "own" hides from the layers after the mix. Writes benchmarks/results/padding.json.

    python benchmarks/padding.py                 # 3 seeds x 400 steps, about 3 min (2 cores)
    python benchmarks/padding.py --steps 100 --seeds 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_json

from lightning_manifold_mixup import ManifoldMixupCallback, ManifoldMixupMixin

VOCAB, MAX_LEN, CLASSES, PAD, CLS = 40, 32, 3, 0, 1
KEYWORDS = (2, 3, 4)


def make_split(n: int, seed: int, noise: float = 0.0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        label = int(torch.randint(CLASSES, (1,), generator=g))
        length = int(torch.randint(6, MAX_LEN + 1, (1,), generator=g))
        ids = torch.randint(5, VOCAB, (length,), generator=g)
        ids[0] = CLS
        # Five keywords: three of the class, two of the others (a majority vote).
        others = [
            (label + 1 + int(torch.randint(CLASSES - 1, (1,), generator=g))) % CLASSES
            for _ in range(2)
        ]
        spots = 1 + torch.randperm(length - 1, generator=g)[:5]
        ids[spots] = torch.tensor([KEYWORDS[c] for c in (label, label, label, *others)])
        padded = torch.full((MAX_LEN,), PAD)
        padded[:length] = ids
        mask = (padded != PAD).long()
        if float(torch.rand(1, generator=g)) < noise:
            label = int(torch.randint(CLASSES, (1,), generator=g))
        rows.append({"input_ids": padded, "attention_mask": mask, "labels": torch.tensor(label)})
    return rows


class TextClassifier(ManifoldMixupMixin, L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertForSequenceClassification

        self.num_classes = CLASSES
        config = BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=MAX_LEN,
            num_labels=CLASSES,
        )
        self.model = BertForSequenceClassification(config)
        self.hidden_drop: list[float] = []

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits: torch.Tensor = self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
        return logits

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.mixup_loss(self(batch), batch["labels"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def hidden_share(rows: list[dict[str, torch.Tensor]], seed: int) -> float:
    """Mean share of a partner's tokens at positions the row itself pads (random pairs)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.stack([r["attention_mask"] for r in rows]).bool()
    partner = mask[torch.randperm(len(rows), generator=g)]
    return float(((partner & ~mask).sum(1) / partner.sum(1)).mean())


def run(variant: str, seed: int, steps: int, train: list[Any], test: list[Any]) -> dict[str, float]:
    L.seed_everything(seed, verbose=False)
    model = TextClassifier()
    callbacks = []
    if variant != "none":
        layers = ["model.bert.pooler"] if variant == "pooled" else None
        # The pooled output has no positions: every row keeps its own mask there.
        mask_key = "attention_mask" if variant == "union" else None
        callbacks.append(
            ManifoldMixupCallback(
                layers=layers,
                alpha=2.0,
                seed=seed,
                input_key="input_ids",
                target_key="labels",
                attention_mask_key=mask_key,
            )
        )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    loader = DataLoader(train, batch_size=32, shuffle=True, drop_last=True)
    trainer.fit(model, loader)
    model.eval()
    batch = {k: torch.stack([r[k] for r in test]) for k in test[0]}
    with torch.no_grad():
        logits = model(batch)
    return {
        "acc": float((logits.argmax(-1) == batch["labels"]).float().mean()),
        "nll": float(F.cross_entropy(logits, batch["labels"])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=["none", "own", "union", "pooled"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    train, test = make_split(300, seed=1, noise=0.1), make_split(2000, seed=2)
    print(f"partner tokens hidden from a row by its own mask: {hidden_share(train, 0):.1%}")
    results: dict[str, list[dict[str, float]]] = {v: [] for v in args.variants}
    start = time.perf_counter()
    for seed in range(args.seeds):
        for variant in args.variants:
            out = run(variant, seed, args.steps, train, test)
            results[variant].append(out)
            print(f"{variant:7s} seed {seed}: acc {out['acc']:.3f}  nll {out['nll']:.3f}")
    print(f"\n{args.seeds} seeds x {args.steps} steps, {time.perf_counter() - start:.0f} s")
    summary = {}
    for variant, outs in results.items():
        acc = [o["acc"] for o in outs]
        nll = [o["nll"] for o in outs]
        summary[variant] = {"acc_mean": statistics.mean(acc), "nll_mean": statistics.mean(nll)}
        print(
            f"{variant:7s} acc {statistics.mean(acc):.3f} ({min(acc):.3f}-{max(acc):.3f})  "
            f"nll {statistics.mean(nll):.3f} ({min(nll):.3f}-{max(nll):.3f})"
        )
    write_json(
        "padding",
        {"machine": machine(), "args": vars(args), "runs": results, "summary": summary},
    )


if __name__ == "__main__":
    main()
