"""Smoke test of an installed wheel (run from outside the source tree).

    python tests/scripts/wheel_smoke.py

Checks that the package comes from site-packages (not the source tree), that its version is
the distribution's, that it ships py.typed and its license, that a short fit mixes, and that
the console script answers ``--help``.
"""

from __future__ import annotations

import importlib.metadata as metadata
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")


def main() -> None:
    import lightning.pytorch as pl
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    import lightning_manifold_mixup as lmm

    package = Path(lmm.__file__).resolve().parent
    assert "site-packages" in package.parts, f"imported from {package}, not an installed wheel"
    assert lmm.__version__ == metadata.version("lightning-manifold-mixup"), lmm.__version__
    assert (package / "py.typed").is_file()
    dist = metadata.distribution("lightning-manifold-mixup")
    assert any(Path(str(f)).name == "LICENSE" for f in dist.files or []), "no LICENSE in wheel"
    assert (package.parent / "lightning_manifold_mixup_recipes" / "cli.py").is_file()

    class Net(lmm.ManifoldMixupMixin, pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.num_classes = 3
            self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    cb = lmm.ManifoldMixupCallback(layers=["input", "net.1"], seed=0)
    trainer = pl.Trainer(
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        callbacks=[cb],
    )
    data = TensorDataset(torch.randn(16, 4), torch.randint(0, 3, (16,)))
    trainer.fit(Net(), DataLoader(data, batch_size=4))
    assert sum(cb.summary["layers"].values()) == 4, cb.summary

    script = shutil.which("lightning-manifold-mixup", path=str(Path(sys.executable).parent))
    assert script is not None, "console script not installed"
    usage = subprocess.run([script, "--help"], capture_output=True, text=True, check=True).stdout
    assert "compare" in usage and "fit" in usage, usage
    print(f"wheel smoke test passed: lightning-manifold-mixup {lmm.__version__} from {package}")


if __name__ == "__main__":
    main()
