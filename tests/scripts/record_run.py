"""A training run that appends every mixing decision to a JSONL file per rank.

Used by tests/test_kill_resume.py, which kills it with SIGKILL and resumes it.

    python record_run.py --out DIR --max-steps 12 [--ckpt-every 4] [--resume CKPT]
        [--devices 2] [--sleep 0.2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import MLPClassifier, make_loader
from helpers import DecisionRecorder, draw
from lightning_manifold_mixup import ManifoldMixupCallback


class JsonlRecorder(DecisionRecorder):
    def __init__(self, out: Path, mixup: ManifoldMixupCallback, sleep: float) -> None:
        super().__init__(mixup)
        self.out, self.sleep = out, sleep

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_batch_end(trainer)
        layer, lam, index = draw(self.last_decision)
        row = {"step": trainer.global_step, "layer": layer, "lam": lam, "index": index}
        with open(self.out / f"draws.rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        time.sleep(self.sleep)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--max-steps", type=int, required=True)
    p.add_argument("--ckpt-every", type=int, default=0)
    p.add_argument("--resume", default=None)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--sleep", type=float, default=0.0)
    a = p.parse_args()
    torch.set_num_threads(1)
    a.out.mkdir(parents=True, exist_ok=True)
    mixup = ManifoldMixupCallback(layers=["input", "net.1", "net.3"], seed=7)
    callbacks: list[L.Callback] = [JsonlRecorder(a.out, mixup, a.sleep), mixup]
    if a.ckpt_every:
        callbacks.append(
            ModelCheckpoint(dirpath=a.out / "ckpt", every_n_train_steps=a.ckpt_every, save_top_k=-1)
        )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=a.devices,
        strategy="ddp" if a.devices > 1 else "auto",
        max_steps=a.max_steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=bool(a.ckpt_every),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(MLPClassifier(), make_loader(n=64, batch_size=4), ckpt_path=a.resume)


if __name__ == "__main__":
    main()
