"""Checks that need a CUDA GPU; not part of the default test run (no GPU in CI).

    python tests/gpu/run_gpu_checks.py

1. 16-mixed, bf16-mixed, bf16-true and 16-true fits of a small PreActResNet18 with the
   callback: finite float32 loss, hidden states mixed in the run's dtype.
2. No host-device synchronisation in the callback's per-batch path: after one warm-up batch
   (the label-range check reads the labels once), batches run under
   torch.cuda.set_sync_debug_mode("error").
3. FSDP (Lightning's FSDPStrategy, 1 device): names resolve through the wrappers and the
   chosen layer is mixed.
4. DeepSpeed ZeRO stages 2 and 3 (1 device, bf16-mixed), when deepspeed is installed
   (``pip install deepspeed``); Lightning refuses DeepSpeed on the CPU, so it runs only here.
Prints one line per check and exits non-zero on the first failure.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import ManualDriver  # noqa: E402

from lightning_manifold_mixup import ManifoldMixupCallback  # noqa: E402
from lightning_manifold_mixup.classifier import MixupClassifier  # noqa: E402
from lightning_manifold_mixup.models import PreActResNet18  # noqa: E402

LAYERS = ["input", "net.layer1", "net.layer2"]


def loader(n: int = 64) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(
        torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
    )
    return DataLoader(ds, batch_size=16)


class Seen(L.Callback):
    def __init__(self, mixup: ManifoldMixupCallback) -> None:
        self.mixup, self.rows = mixup, []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, *a: Any) -> None:
        self.rows.append((self.mixup.current.layer, self.mixup._calls, outputs["loss"].detach()))


def fit_and_record(
    max_steps: int, accelerator: str = "gpu", **trainer_kwargs: Any
) -> tuple[ManifoldMixupCallback, Seen]:
    """A short fit of a narrow PreActResNet18 with the callback; returns what it saw.

    ``accelerator="cpu"`` is for the smoke test in tests/test_gpu_script.py only."""
    cb = ManifoldMixupCallback(layers=LAYERS, seed=0)
    seen = Seen(cb)
    model = MixupClassifier(PreActResNet18(num_classes=10, width=16), 10)
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


def check_no_sync() -> None:
    device = torch.device("cuda")
    model = MixupClassifier(PreActResNet18(num_classes=10, width=16), 10).to(device)
    cb = ManifoldMixupCallback(layers=LAYERS, seed=0, log=False)
    driver = ManualDriver(cb, model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    batches = [[x.to(device), y.to(device)] for x, y in loader()]
    driver.train_step(list(batches[0]), opt)  # the one-time label-range check reads labels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch in batches[1:]:
            driver.train_step(list(batch), opt)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    driver.close()
    print(f"ok  no host-device sync in {len(batches) - 1} steps")


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
        cb, seen = fit_and_record(4, strategy=f"deepspeed_stage_{stage}", precision="bf16-mixed")
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


if __name__ == "__main__":
    main()
