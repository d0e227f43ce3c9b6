"""Fingerprints of trained weights under many callback settings, for bit-for-bit comparisons.

Each case fits a small model for a few steps with a fixed seed, one torch thread and
``deterministic=True``, and prints the sha256 of its trained state dict together with the
logged mixing summary. Two versions of the package give the same lines exactly when they mix
and train bit for bit alike::

    python tests/scripts/weights_fingerprint.py > before.txt
    # ... change the code ...
    python tests/scripts/weights_fingerprint.py | diff before.txt -
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_manifold_mixup import ManifoldMixupCallback, ManifoldMixupMixin

warnings.filterwarnings("ignore")


class Net(ManifoldMixupMixin, L.LightningModule):
    def __init__(self, kind: str, num_classes: int = 4) -> None:
        super().__init__()
        self.num_classes = num_classes
        if kind == "mlp":
            self.net = nn.Sequential(
                nn.Linear(6, 16),
                nn.ReLU(),
                nn.Linear(16, 16),
                nn.ReLU(),
                nn.Linear(16, num_classes),
            )
        else:
            self.net = nn.Sequential(
                nn.Conv2d(2, 4, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(4, 4, 3, padding=1),
                nn.ReLU(),
                nn.Flatten(),
                nn.Linear(4 * 8 * 8, num_classes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        if self.num_classes == 0:
            return nn.functional.binary_cross_entropy_with_logits(logits.float(), y.float())
        return self.mixup_loss(logits, y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def data(kind: str, targets: str) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    n = 48
    x = torch.randn(n, 6, generator=g) if kind == "mlp" else torch.randn(n, 2, 8, 8, generator=g)
    if targets == "float":
        y = (torch.rand(n, 4, generator=g) > 0.5).float()
    else:
        y = torch.randint(0, 4, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)


CASES: dict[str, tuple[str, str, dict[str, Any], dict[str, Any]]] = {
    "default": ("mlp", "int", {}, {}),
    "input_only": ("mlp", "int", {"layers": ["input"], "alpha": 1.0}, {}),
    "pair": ("mlp", "int", {"targets": "pair"}, {}),
    "sample_lam": ("mlp", "int", {"lam_mode": "sample"}, {}),
    "sample_pair": ("mlp", "int", {"lam_mode": "sample", "targets": "pair"}, {}),
    "float_targets": ("mlp", "float", {}, {}),
    "max_fixed": ("mlp", "int", {"lam_transform": "max", "layer_weights": [1, 2, 3]}, {}),
    "fixed_lam": ("mlp", "int", {"fixed_lam": 0.3}, {}),
    "cosine_prob": ("mlp", "int", {"alpha_schedule": "cosine", "probability": 0.6}, {}),
    "bf16": ("mlp", "int", {}, {"precision": "bf16-mixed"}),
    "bf16_pair": ("mlp", "int", {"targets": "pair"}, {"precision": "bf16-mixed"}),
    "accumulate": ("mlp", "int", {}, {"accumulate_grad_batches": 2}),
    "cutmix_input": ("cnn", "int", {"layers": ["input"], "cutmix_prob": 1.0}, {}),
    "cutmix_hidden": ("cnn", "int", {"layers": ["net.1", "net.3"], "cutmix_prob": 1.0}, {}),
    "cutmix_hidden_pair": (
        "cnn",
        "int",
        {"layers": ["input", "net.1"], "cutmix_prob": 0.5, "targets": "pair"},
        {},
    ),
    "cnn_blend_sample": ("cnn", "int", {"lam_mode": "sample"}, {}),
}


def run(name: str) -> str:
    kind, targets, cb_args, trainer_args = CASES[name]
    torch.manual_seed(0)
    model = Net(kind)
    if targets == "float":
        model.num_classes = 0
    layers = cb_args.pop("layers", ["input", "net.1", "net.3"])
    cb = ManifoldMixupCallback(layers=layers, seed=3, **cb_args)
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        deterministic=True,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb],
        **trainer_args,
    )
    trainer.fit(model, data(kind, targets))
    digest = hashlib.sha256(b"".join(v.numpy().tobytes() for v in model.state_dict().values()))
    return f"{name}: {digest.hexdigest()[:24]} {cb.summary}"


def main() -> None:
    torch.set_num_threads(1)
    for name in CASES:
        print(run(name), flush=True)


if __name__ == "__main__":
    main()
