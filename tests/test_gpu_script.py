"""The GPU script imports and its checks run on the CPU where they can (no GPU in CI)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent / "gpu" / "run_gpu_checks.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("run_gpu_checks", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_script_imports_and_says_it_needs_a_gpu() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 1 and "needs a CUDA GPU" in proc.stderr


def test_precision_check_runs_on_the_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    _load().check_precision("bf16-mixed", accelerator="cpu")
    assert "ok  precision bf16-mixed: 6 steps" in capsys.readouterr().out
