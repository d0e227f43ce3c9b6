"""2-process runs on the CPU with Lightning's ModelParallelStrategy (gloo).

Used by tests/test_model_parallel.py.

``--parallel fsdp``: 2 data-parallel replicas; every Linear and the whole network are sharded
with FSDP2's ``fully_shard``. The callback mixes at the input, at a sharded module (``net.0``)
and at a plain module inside the sharded root (``net.3``).

``--parallel tp``: 1 replica split over 2 processes by tensor parallelism: ``net.0`` column-wise
(each process holds half of the hidden units, so ``net.1``'s output is a (B, 8) shard) and
``net.2`` row-wise. Both processes read the same batch and must mix it the same way.

Each rank saves, per step, its batch, the unsharded weights before the step, the decision and
the loss; and the final weights.

    python model_parallel_run.py --out DIR --tag full --parallel fsdp --max-steps 6 [--ckpt-every 3]
        [--resume CKPT_DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    parallelize_module,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import MLPClassifier, make_loader, quiet_trainer
from helpers import StepRecorder
from lightning_manifold_mixup import ManifoldMixupCallback
from lightning_manifold_mixup.losses import soft_cross_entropy

LAYERS = {"fsdp": ["input", "net.0", "net.3"], "tp": ["input", "net.1", "net.3"]}
SEED = 13


class ShardedMLP(MLPClassifier):
    def configure_model(self) -> None:
        if self.device_mesh["tensor_parallel"].size() > 1:
            plan = {"0": ColwiseParallel(), "2": RowwiseParallel()}
            parallelize_module(self.net, self.device_mesh["tensor_parallel"], plan)
            return
        mesh = self.device_mesh["data_parallel"]
        for module in self.net:
            if isinstance(module, torch.nn.Linear):
                fully_shard(module, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", soft_cross_entropy(self(x), y), sync_dist=True)


def full_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded copies of the parameters (a collective: every rank calls it)."""
    out = {}
    for name, value in module.state_dict().items():
        if isinstance(value, DTensor):
            value = value.full_tensor()
        out[name] = value.detach().clone()
    return out


class Recorder(StepRecorder):
    """Rows with the unsharded weights, saved per rank with what the checks read."""

    def __init__(self, out: Path, tag: str, mixup: ManifoldMixupCallback) -> None:
        super().__init__(mixup, weights=full_weights)
        self.out, self.tag, self.mixup = out, tag, mixup
        self.mixed_in_validation = False

    def on_validation_batch_start(self, *args: Any) -> None:
        self.mixed_in_validation |= self.mixup.current is not None

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        record = {
            "rows": self.rows,
            "final": full_weights(pl_module),
            "eligible": self.mixup.eligible,
            "module_types": {n: type(m).__name__ for n, m in pl_module.named_modules()},
            "mixed_in_validation": self.mixed_in_validation,
        }
        torch.save(record, self.out / f"{self.tag}_rank{trainer.global_rank}.pt")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tag", required=True)
    p.add_argument("--parallel", choices=["fsdp", "tp"], required=True)
    p.add_argument("--max-steps", type=int, required=True)
    p.add_argument("--ckpt-every", type=int, default=0)
    p.add_argument("--resume", default=None)
    a = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    mixup = ManifoldMixupCallback(layers=LAYERS[a.parallel], seed=SEED)
    callbacks: list[L.Callback] = [Recorder(a.out, a.tag, mixup), mixup]
    if a.ckpt_every:
        callbacks.append(
            ModelCheckpoint(dirpath=a.out / "ckpt", every_n_train_steps=a.ckpt_every, save_top_k=-1)
        )
    trainer = quiet_trainer(
        strategy=ModelParallelStrategy(
            data_parallel_size=2 if a.parallel == "fsdp" else 1,
            tensor_parallel_size=2 if a.parallel == "tp" else 1,
        ),
        devices=2,
        max_steps=a.max_steps,
        callbacks=callbacks,
        enable_checkpointing=bool(a.ckpt_every),
        limit_val_batches=2,
        val_check_interval=3,
    )
    trainer.fit(
        ShardedMLP(),
        make_loader(n=48, batch_size=4),
        make_loader(n=16, seed=1),
        ckpt_path=a.resume,
    )


if __name__ == "__main__":
    main()
