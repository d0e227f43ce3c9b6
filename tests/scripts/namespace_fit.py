"""Fit with the callback under one Lightning namespace, the others made unimportable.

    python tests/scripts/namespace_fit.py TRAINER [BLOCKED ...]

TRAINER is ``lightning`` or ``pytorch_lightning``: whose Trainer and LightningModule to use.
Each BLOCKED top-level package is hidden as if not installed (``sys.modules[name] = None``:
imports fail and ``importlib.util.find_spec`` finds nothing). Prints one JSON line.
"""

from __future__ import annotations

import importlib
import json
import sys
import warnings

warnings.filterwarnings("ignore")


def main() -> None:
    trainer_ns, blocked = sys.argv[1], sys.argv[2:]
    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        from lightning_manifold_mixup import ManifoldMixupCallback, ManifoldMixupMixin
    except ImportError as err:
        print(json.dumps({"import_error": str(err)}))
        return

    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    L = importlib.import_module("lightning.pytorch" if trainer_ns == "lightning" else trainer_ns)

    class Net(ManifoldMixupMixin, L.LightningModule):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.num_classes = 3
            self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class LateNet(Net):
        """Builds a layer in configure_model: the callback checks names after that hook."""

        def configure_model(self) -> None:
            self.head = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.net(x))

    def fit(model: Net, **callback_args: object) -> dict[str, int]:
        cb = ManifoldMixupCallback(seed=0, **callback_args)  # type: ignore[arg-type]
        trainer = L.Trainer(
            max_epochs=1,
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            callbacks=[cb],
        )
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(
            torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)
        )
        trainer.fit(model, DataLoader(data, batch_size=4))
        return {"steps": trainer.global_step, "mixed": sum(cb.summary["layers"].values())}

    loaded = [n for n in ("lightning", "pytorch_lightning") if sys.modules.get(n) is not None]
    result: dict[str, object] = {
        "plain": fit(Net(), layers=["input", "net.1"]),
        "late": fit(LateNet(), layers=["net.1", "head"]),
        "loaded": sorted(loaded),
    }
    # A configuration error is an instance of every loaded namespace's MisconfigurationException.
    caught = []
    for ns in ("lightning.pytorch", "pytorch_lightning"):
        if ns.split(".")[0] in blocked:
            continue
        exc = importlib.import_module(f"{ns}.utilities.exceptions").MisconfigurationException
        try:
            ManifoldMixupCallback(alpha=-1.0)
        except exc:
            caught.append(ns)
    result["caught"] = caught
    print(json.dumps(result))


if __name__ == "__main__":
    main()
