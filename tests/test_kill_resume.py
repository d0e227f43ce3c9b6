"""A run killed with SIGKILL after a checkpoint resumes with exactly the uninterrupted draws."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parent / "scripts" / "record_run.py"


def _run(out: Path, *args: str, wait: bool = True) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--out", str(out), *args],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    if wait:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-3000:]
    return proc


def _rows(out: Path, rank: int) -> list[dict[str, Any]]:
    path = out / f"draws.rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _kill_after_checkpoint(out: Path, devices: int) -> Path:
    proc = _run(
        out,
        "--max-steps",
        "12",
        "--ckpt-every",
        "4",
        "--sleep",
        "0.3",
        "--devices",
        str(devices),
        wait=False,
    )
    ckpt = out / "ckpt"
    deadline = time.time() + 240
    while time.time() < deadline:
        done = (out / "draws.rank0.jsonl").exists() and len(_rows(out, 0)) >= 6
        if done and list(ckpt.glob("*step=4.ckpt")):
            break
        if proc.poll() is not None:
            pytest.fail(
                f"run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
            )  # type: ignore[union-attr]
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(_rows(out, 0)) < 12  # it really was cut short
    return next(ckpt.glob("*step=4.ckpt"))


def _check(tmp_path: Path, devices: int) -> None:
    full, killed, resumed = tmp_path / "full", tmp_path / "killed", tmp_path / "resumed"
    _run(full, "--max-steps", "12", "--devices", str(devices))
    ckpt = _kill_after_checkpoint(killed, devices)
    _run(resumed, "--max-steps", "12", "--resume", str(ckpt), "--devices", str(devices))
    for rank in range(devices):
        reference = _rows(full, rank)
        assert len(reference) == 12
        assert _rows(resumed, rank) == reference[4:]
        assert _rows(killed, rank)[:4] == reference[:4]


def test_killed_single_process_run_resumes_the_exact_stream(tmp_path: Path) -> None:
    _check(tmp_path, devices=1)


@pytest.mark.slow
def test_killed_two_process_ddp_run_resumes_every_ranks_stream(tmp_path: Path) -> None:
    _check(tmp_path, devices=2)
