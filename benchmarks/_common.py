"""Shared pieces of the benchmarks: timing, machine description, JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lightning_manifold_mixup import ManifoldMixupCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import fake_trainer  # the tests' stand-in Trainer


def machine() -> dict[str, Any]:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved_medians(
    variants: dict[str, Callable[[], None]],
    device: torch.device,
    *,
    warmup: int,
    rounds: int,
    steps: int,
) -> dict[str, float]:
    """Median seconds per call of each variant, timed in alternating blocks of ``steps``.

    Interleaving spreads slow drifts of the machine (thermal, other processes) over every
    variant instead of the one that happened to run last.
    """
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            sync(device)
            times[name].append((time.perf_counter() - start) / steps)
    return {name: statistics.median(t) for name, t in times.items()}


def step_bytes(fn: Callable[[], None], device: torch.device) -> int:
    """Memory one call of ``fn`` needs: the CUDA peak above the allocation before it, or on the
    CPU (no peak counter) the sum of bytes the profiler saw allocated during the call."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - before)
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        fn()
    return int(sum(max(e.self_cpu_memory_usage, 0) for e in prof.events()))


class ManualDriver:
    """Drives ``ManifoldMixupCallback`` through its Lightning hooks without a Trainer.

    This is the callback's real per-batch code path (decision, target rewrite, forward hook,
    checks), minus Lightning's own loop, so the ratios isolate what the callback adds.
    """

    def __init__(
        self, callback: ManifoldMixupCallback, module: L.LightningModule, **trainer_fields: Any
    ) -> None:
        self.cb, self.module = callback, module
        # A process of a distributed run sets global_rank and world_size here.
        self.trainer = fake_trainer(**trainer_fields)
        callback.on_fit_start(self.trainer, module)  # type: ignore[arg-type]

    def start(self, batch: list[Any]) -> None:
        self.cb.on_train_batch_start(self.trainer, self.module, batch, 0)  # type: ignore[arg-type]

    def end(self, batch: list[Any], loss: torch.Tensor | None = None) -> None:
        # Lightning hands on_train_batch_end the step's outputs ({"loss": ...} under automatic
        # optimization); None would mean training_step skipped the batch, and the callback
        # would then never finish its first-step probe (its hooks would keep counting runs,
        # and a compiled model would recompile every step).
        outputs = {"loss": loss}
        self.cb.on_train_batch_end(self.trainer, self.module, outputs, batch, 0)  # type: ignore[arg-type]

    def train_step(
        self,
        batch: list[Any],
        optimizer: torch.optim.Optimizer,
        forward: Callable[[Any], torch.Tensor] | None = None,
    ) -> None:
        """One mixed SGD step: hooks, forward (``forward`` or the module), ``mixup_loss``,
        backward (between ``on_before_backward`` and ``on_after_backward``, as Lightning
        calls them), optimizer step."""
        self.start(batch)
        logits = (forward or self.module)(batch[0])
        loss = self.module.mixup_loss(logits, batch[1])  # type: ignore[operator]
        optimizer.zero_grad(set_to_none=True)
        self.cb.on_before_backward(self.trainer, self.module, loss)  # type: ignore[arg-type]
        loss.backward()
        self.cb.on_after_backward(self.trainer, self.module)  # type: ignore[arg-type]
        optimizer.step()
        self.end(batch, loss)

    def close(self) -> None:
        self.cb.teardown(self.trainer, self.module, "fit")  # type: ignore[arg-type]


def write_json(name: str, payload: dict[str, Any]) -> Path:
    out = Path(os.environ.get("LMM_BENCH_OUT", Path(__file__).resolve().parent / "results"))
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path
