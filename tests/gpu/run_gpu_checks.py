"""Checks that need a CUDA GPU; not part of the default test run (no GPU in CI).

    python tests/gpu/run_gpu_checks.py

1. 16-mixed, bf16-mixed, bf16-true and 16-true fits of a small PreActResNet18 with the
   callback: finite float32 loss, hidden states mixed in the run's dtype.
2. No host-device synchronisation in a real Trainer.fit with the defaults (callback logging
   on, the mixin's default training_step, a CSV logger, the progress bar): 25 steady steps
   between logging steps run under torch.cuda.set_sync_debug_mode("error").
3. FSDP (Lightning's FSDPStrategy, 1 device): names resolve through the wrappers and the
   chosen layer is mixed.
4. DeepSpeed ZeRO stages 2 and 3 (1 device, bf16-mixed) on an MLP, when deepspeed is
   installed; Lightning refuses DeepSpeed on the CPU, so it runs only here. (A BatchNorm model
   fails under Lightning's DeepSpeed bf16 with or without the callback: "Expected
   running_mean to have type BFloat16 but got Float".)
5. With ``--bench``: the GPU presets of benchmarks/trainer_overhead.py (batch 128 and 512) and
   benchmarks/loss.py, in the same run.
Prints one line per check and exits non-zero on the first failure; about 4 minutes on one GPU.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

from helpers import RunRecorder  # noqa: E402
from lightning_manifold_mixup import ManifoldMixupCallback  # noqa: E402
from lightning_manifold_mixup_recipes.classifier import MixupClassifier  # noqa: E402
from lightning_manifold_mixup_recipes.models import MLP, PreActResNet18  # noqa: E402

LAYERS = ["input", "net.layer1", "net.layer2"]


def loader(n: int = 64) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(
        torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
    )
    return DataLoader(ds, batch_size=16)


class Seen(RunRecorder):
    """Per step: the mixed layer, how often its hook mixed, and the loss."""

    def __init__(self, mixup: ManifoldMixupCallback) -> None:
        super().__init__(mixup)
        self.rows: list[tuple[str, int, torch.Tensor]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, *a: Any) -> None:
        super().on_train_batch_end(trainer)
        assert self.last_decision is not None
        self.rows.append((self.last_decision.layer, self.runs[-1], outputs["loss"].detach()))


def fit_and_record(
    max_steps: int, accelerator: str = "gpu", mlp: bool = False, **trainer_kwargs: Any
) -> tuple[ManifoldMixupCallback, Seen]:
    """A short fit of a narrow PreActResNet18 (or an MLP) with the callback; returns what it
    saw. ``accelerator="cpu"`` is for the smoke test in tests/test_gpu_script.py only."""
    if mlp:
        cb = ManifoldMixupCallback(layers=["input", "net.layers.1", "net.layers.3"], seed=0)
        model = MixupClassifier(MLP(3 * 32 * 32, 10, hidden=(256, 256)), 10)
    else:
        cb = ManifoldMixupCallback(layers=LAYERS, seed=0)
        model = MixupClassifier(PreActResNet18(num_classes=10, width=16), 10)
    seen = Seen(cb)
    L.Trainer(
        accelerator=accelerator,
        devices=1,
        max_steps=max_steps,
        callbacks=[seen, cb],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        **trainer_kwargs,
    ).fit(model, loader())
    return cb, seen


def check_precision(precision: str, accelerator: str = "gpu") -> None:
    _, seen = fit_and_record(6, accelerator, precision=precision)
    for layer, calls, loss in seen.rows:
        assert loss.dtype == torch.float32 and torch.isfinite(loss), (precision, loss)
        assert layer == "input" or calls == 1, (precision, layer, calls)
    print(f"ok  precision {precision}: {len(seen.rows)} steps, losses finite, layers mixed")


class SyncErrors(L.Callback):
    """Turns every host-device synchronisation into an error for steps [start, stop)."""

    def __init__(self, start: int, stop: int) -> None:
        self.start, self.stop, self.checked = start, stop, 0

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.start:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        elif trainer.global_step == self.stop:
            torch.cuda.set_sync_debug_mode("default")
        if self.start <= trainer.global_step < self.stop:
            self.checked += 1

    def on_train_end(self, *args: Any) -> None:
        torch.cuda.set_sync_debug_mode("default")

    def on_exception(self, *args: Any) -> None:
        torch.cuda.set_sync_debug_mode("default")


def check_no_sync(tmp: str = "gpu_check_logs") -> None:
    cb = ManifoldMixupCallback(layers=LAYERS, seed=0)
    guard = SyncErrors(start=5, stop=30)
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(
        torch.randn(640, 3, 32, 32, generator=g), torch.randint(0, 10, (640,), generator=g)
    )
    L.Trainer(
        accelerator="gpu",
        devices=1,
        max_steps=40,
        precision="bf16-mixed",
        callbacks=[guard, cb],
        logger=L.pytorch.loggers.CSVLogger(tmp),
        log_every_n_steps=35,
        enable_checkpointing=False,
    ).fit(
        MixupClassifier(PreActResNet18(num_classes=10, width=16), 10),
        DataLoader(ds, batch_size=16, pin_memory=True),
    )
    assert guard.checked == 25, guard.checked
    print(f"ok  no host-device sync in {guard.checked} steady steps of a real Trainer.fit")


def check_fsdp() -> None:
    cb, seen = fit_and_record(4, strategy="fsdp")
    assert all(layer == "input" or calls >= 1 for layer, calls, _ in seen.rows)
    print(f"ok  FSDP: eligible {cb.eligible}, {len(seen.rows)} steps mixed")


def check_deepspeed() -> None:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        print("skip DeepSpeed: not installed (pip install deepspeed)")
        return
    for stage in (2, 3):
        cb, seen = fit_and_record(
            4, mlp=True, strategy=f"deepspeed_stage_{stage}", precision="bf16-mixed"
        )
        for layer, calls, loss in seen.rows:
            assert loss.dtype == torch.float32 and torch.isfinite(loss), (stage, loss)
            assert layer == "input" or calls == 1, (stage, layer, calls)
        print(f"ok  DeepSpeed ZeRO-{stage}: eligible {cb.eligible}, {len(seen.rows)} steps mixed")


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    for precision in ("16-mixed", "bf16-mixed", "bf16-true", "16-true"):
        check_precision(precision)
    check_no_sync()
    check_fsdp()
    check_deepspeed()
    if "--bench" in sys.argv:
        bench = ROOT / "benchmarks"
        timing = ["--rounds", "3", "--steps", "100", "--warmup", "20"]
        runs = [
            ["trainer_overhead.py", "--device", "cuda", "--batch-size", str(size), *timing]
            for size in (128, 512)
        ]
        runs += [
            [
                "loss.py",
                "--device",
                "cuda",
                "--rounds",
                "8",
                "--batch",
                str(b),
                "--classes",
                "32000",
            ]
            for b in (256, 1024, 4096)
        ]
        runs.append(
            ["compile_and_memory.py", "--device", "cuda", "--batch", "32", "--hidden", "64"]
        )
        for args in runs:
            print("$ python benchmarks/" + " ".join(args), flush=True)
            subprocess.run([sys.executable, str(bench / args[0]), *args[1:]], check=True)


if __name__ == "__main__":
    main()
