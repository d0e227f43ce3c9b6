"""What users pay: milliseconds per step of a real ``Trainer.fit``, variants side by side.

Every variant trains the same network on the same batches with Lightning's defaults for
logging (a CSV logger, ``log_every_n_steps=50``); only the LightningModule and the callback
differ:

  plain        a minimal LightningModule: cross-entropy, no logging
  plain_log    plain + ``self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True)``
               as most users write it (the baseline of the ratios)
  plain+empty  plain_log + an empty ``lightning.Callback``: what Lightning charges for any
               callback (it calls every hook of every callback), the floor under plain+cb
  plain+cb     plain_log + ``ManifoldMixupCallback`` with its defaults (``log=True``)
  mixin        ``MixupClassifier`` (the mixin's default ``training_step``), no callback
  mixin+cb     ``MixupClassifier`` + ``ManifoldMixupCallback`` (defaults)
  inline       plain_log with manifold mixup written by hand in training_step (CPU preset,
               the MLP): the cost of mixing itself, without the callback's machinery

Each round runs one fit per variant (interleaved), times the steps after ``--warmup`` untimed
ones and reports the median over rounds. Prints ms/step and the ratios to ``plain_log``;
writes JSON to benchmarks/results/.

    python benchmarks/trainer_overhead.py                    # CPU preset: tiny MLP, 1 thread
    python benchmarks/trainer_overhead.py --device cuda      # GPU preset: PreActResNet18, bf16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_json

from lightning_manifold_mixup import ManifoldMixupCallback
from lightning_manifold_mixup_recipes.classifier import MixupClassifier
from lightning_manifold_mixup_recipes.models import MLP, PreActResNet18

VARIANTS = ("plain", "plain_log", "plain+empty", "plain+cb", "mixin", "mixin+cb", "inline")


class Plain(L.LightningModule):
    """The user's own module: no mixin. ``F.cross_entropy`` takes soft targets too."""

    def __init__(self, net: nn.Module, log_loss: bool) -> None:
        super().__init__()
        self.net = net
        self.log_loss = log_loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x).float(), y)
        if self.log_loss:
            self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


class Inline(Plain):
    """Manifold mixup written by hand for the MLP preset: the same draws and mixing set
    (input and the two hidden activations), soft targets, no callback."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__(net, log_loss=True)
        self.rng = np.random.default_rng(0)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        k, lam = int(self.rng.integers(3)), float(self.rng.beta(2.0, 2.0))
        index = torch.from_numpy(self.rng.permutation(x.shape[0])).to(x.device)
        h = x.flatten(1)
        for i, layer in enumerate((None, *self.net.layers[1::2])):
            if i > 0:
                h = layer(self.net.layers[2 * i - 2](h))
            if i == k:
                h = lam * h + (1 - lam) * h[index]
        eye = torch.eye(10, device=x.device)
        target = lam * eye[y] + (1 - lam) * eye[y[index]]
        loss = F.cross_entropy(self.net.head(h).float(), target)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss


class Batches(Dataset):
    """``count`` pre-made batches (lists, as ``default_collate`` gives), already on ``device``."""

    def __init__(self, batches: list[list[torch.Tensor]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        return list(self.batches[i])


class StepTimer(L.Callback):
    """Wall time of the steps after ``warmup``, measured with the device drained at both ends."""

    def __init__(self, warmup: int, device: torch.device) -> None:
        self.warmup, self.device = warmup, device
        self.start = self.end = 0.0
        self.steps = 0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.warmup:
            self._sync()
            self.start = time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, *args: Any) -> None:
        self._sync()
        self.end = time.perf_counter()
        self.steps = trainer.global_step - self.warmup

    @property
    def seconds_per_step(self) -> float:
        return (self.end - self.start) / self.steps


def preset(device: torch.device, batch_size: int) -> dict[str, Any]:
    if device.type == "cuda":
        return {
            "net": lambda: PreActResNet18(num_classes=10, width=64),
            "shape": (3, 32, 32),
            "layers": ["input", "net.layer1", "net.layer2"],
            "precision": "bf16-mixed",
            "batch_size": batch_size or 128,
        }
    return {
        "net": lambda: MLP(32, 10, hidden=(64, 64)),
        "shape": (32,),
        "layers": ["input", "net.layers.1", "net.layers.3"],
        "precision": "32-true",
        "batch_size": batch_size or 32,
    }


def make_module(variant: str, net: nn.Module) -> L.LightningModule:
    if variant == "inline":
        return Inline(net)
    if variant.startswith("mixin"):
        return MixupClassifier(net, num_classes=10, lr=0.01, weight_decay=0.0)
    return Plain(net, log_loss=variant != "plain")


def run_fit(variant: str, cfg: dict[str, Any], device: torch.device, args: Any) -> float:
    torch.manual_seed(0)
    steps = args.warmup + args.steps
    g = torch.Generator().manual_seed(1)
    batches = [
        [
            torch.randn(cfg["batch_size"], *cfg["shape"], generator=g).to(device),
            torch.randint(0, 10, (cfg["batch_size"],), generator=g).to(device),
        ]
        for _ in range(16)
    ]
    loader = DataLoader(Batches(batches * (steps // 16 + 1)), batch_size=None, shuffle=False)
    timer = StepTimer(args.warmup, device)
    callbacks: list[L.Callback] = [timer]
    if variant.endswith("+empty"):
        callbacks.append(L.Callback())
    if variant.endswith("+cb"):
        callbacks.append(ManifoldMixupCallback(layers=cfg["layers"], seed=0, num_classes=10))
    with tempfile.TemporaryDirectory() as logdir:
        trainer = L.Trainer(
            accelerator=device.type,
            devices=1,
            max_steps=steps,
            precision=cfg["precision"],
            logger=CSVLogger(logdir),
            callbacks=callbacks,
            enable_progress_bar=args.progress_bar,
            enable_model_summary=False,
            enable_checkpointing=False,
        )
        trainer.fit(make_module(variant, cfg["net"]()).to(device), loader)
    return timer.seconds_per_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=0, help="0: the preset's")
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    parser.add_argument("--progress-bar", action="store_true", help="show Lightning's bar")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    cfg = preset(device, args.batch_size)
    if device.type == "cuda" and "inline" in args.variants:
        args.variants.remove("inline")  # written for the MLP preset
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    times: dict[str, list[float]] = {v: [] for v in args.variants}
    for _ in range(args.rounds):
        for variant in args.variants:
            times[variant].append(run_fit(variant, cfg, device, args))
    ms = {v: 1e3 * statistics.median(t) for v, t in times.items()}
    base = ms.get("plain_log")
    print(
        f"device={device} batch={cfg['batch_size']} precision={cfg['precision']} "
        f"steps={args.steps} rounds={args.rounds} (median ms/step, ratio to plain_log)"
    )
    for v in args.variants:
        ratio = f"{ms[v] / base:.3f}x" if base else "-"
        spread = f"[{1e3 * min(times[v]):.3f}-{1e3 * max(times[v]):.3f}]"
        print(f"  {v:10s} {ms[v]:8.3f} ms  {spread:>18s}  {ratio}")
    write_json(
        f"trainer_overhead_{device.type}_b{cfg['batch_size']}",
        {"machine": machine(), "args": vars(args), "ms_per_step": ms, "all": times},
    )


if __name__ == "__main__":
    main()
