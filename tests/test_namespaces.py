"""The callback and the mixin with ``lightning`` alone, ``pytorch_lightning`` alone, or both.

``pip install lightning`` installs both namespaces; a package missing is simulated in a
subprocess (``tests/scripts/namespace_fit.py`` hides it as if not installed).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "scripts" / "namespace_fit.py"


def _run(*args: str) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize(
    ("trainer", "blocked", "loaded"),
    [
        ("lightning", ["pytorch_lightning"], ["lightning"]),
        ("pytorch_lightning", ["lightning"], ["pytorch_lightning"]),
        ("lightning", [], ["lightning", "pytorch_lightning"]),
        ("pytorch_lightning", [], ["lightning", "pytorch_lightning"]),
    ],
    ids=["lightning-alone", "pytorch_lightning-alone", "both-lightning", "both-pytorch_lightning"],
)
def test_fits_with_either_namespaces_trainer_and_module(
    trainer: str, blocked: list[str], loaded: list[str]
) -> None:
    result = _run(trainer, *blocked)
    assert result["loaded"] == loaded
    # Every batch of both fits mixed; the second module builds its layers in configure_model.
    assert result["plain"] == {"steps": 4, "mixed": 4}
    assert result["late"] == {"steps": 4, "mixed": 4}
    # Configuration errors are the MisconfigurationException of every installed namespace.
    expected = [
        ns for ns in ("lightning.pytorch", "pytorch_lightning") if ns.split(".")[0] in loaded
    ]
    assert result["caught"] == expected


def test_without_lightning_the_import_error_names_the_pip_command() -> None:
    result = _run("lightning", "lightning", "pytorch_lightning")
    assert result == {
        "import_error": "lightning-manifold-mixup needs PyTorch Lightning: pip install "
        "lightning (or the legacy namespace: pip install pytorch-lightning)"
    }
