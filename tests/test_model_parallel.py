"""Lightning's ModelParallelStrategy on the CPU (2 processes, gloo): FSDP2 and tensor parallelism.

Each run is a real 2-process fit launched by tests/scripts/model_parallel_run.py. The checks
recompute every step by hand on the unsharded weights: the loss of each process, and the SGD
update, which must equal lr times the mean over data-parallel replicas of the hand gradients.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import hand_mlp_loss, mlp_with
from helpers import draws

SCRIPT = Path(__file__).resolve().parent / "scripts" / "model_parallel_run.py"
LR, STEPS = 0.1, 6


def _launch(out: Path, tag: str, parallel: str, *args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), "--tag", tag, "--parallel", parallel]
    proc = subprocess.run(
        [*cmd, "--max-steps", str(STEPS), *args],
        env=env,
        cwd=out,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def _load(out: Path, tag: str) -> list[dict[str, Any]]:
    return [torch.load(out / f"{tag}_rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    _launch(out, "full", "fsdp", "--ckpt-every", "3")
    ckpt = next((out / "ckpt").glob("*step=3.ckpt"))  # a distributed checkpoint (a folder)
    _launch(out, "rest", "fsdp", "--resume", str(ckpt))
    return out


@pytest.fixture(scope="module")
def tp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tp")
    _launch(out, "full", "tp")
    return out


def _check_against_hand_sgd(records: list[dict[str, Any]], replicas: list[int]) -> None:
    """Each process's loss, and each step's update: weights - lr * (mean over replicas of
    the hand gradients), all on the unsharded weights."""
    for step in range(STEPS):
        before = records[0]["rows"][step]["weights"]
        grads: list[dict[str, torch.Tensor]] = []
        for rank, record in enumerate(records):
            row = record["rows"][step]
            model = mlp_with(row["weights"])
            loss = hand_mlp_loss(model, row)
            torch.testing.assert_close(row["loss"], loss.detach())
            if rank in replicas:
                loss.backward()
                grads.append({n: p.grad for n, p in model.named_parameters()})
        last = step + 1 == STEPS
        after = records[0]["final"] if last else records[0]["rows"][step + 1]["weights"]
        for name in grads[0]:
            mean_grad = sum(g[name] for g in grads) / len(grads)
            torch.testing.assert_close(after[name], before[name] - LR * mean_grad)


# ------------------------------------------------------------------------------ FSDP2


def test_fsdp_names_resolve_through_fully_shard(fsdp: Path) -> None:
    for record in _load(fsdp, "full"):
        types = record["module_types"]
        assert types["net"] == "FSDPSequential" and types["net.0"] == "FSDPLinear"
        assert record["eligible"] == ["input", "net.0", "net.3"]
        assert not record["mixed_in_validation"]
    chosen = {row["layer"] for record in _load(fsdp, "full") for row in record["rows"]}
    assert chosen == {"input", "net.0", "net.3"}  # a sharded module's output is mixed too


def test_fsdp_each_replica_mixes_its_own_shard(fsdp: Path) -> None:
    rank0, rank1 = (record["rows"] for record in _load(fsdp, "full"))
    assert draws(rank0) != draws(rank1)
    assert all(not torch.equal(a["x"], b["x"]) for a, b in zip(rank0, rank1, strict=True))


def test_fsdp_losses_and_updates_equal_the_hand_computation(fsdp: Path) -> None:
    _check_against_hand_sgd(_load(fsdp, "full"), replicas=[0, 1])


def test_fsdp_resume_from_a_distributed_checkpoint(fsdp: Path) -> None:
    full, rest = _load(fsdp, "full"), _load(fsdp, "rest")
    for rank in range(2):
        resumed, uninterrupted = rest[rank]["rows"], full[rank]["rows"][3:]
        assert [r["step"] for r in resumed] == [4, 5, 6]
        assert draws(resumed) == draws(uninterrupted)
        for name, value in uninterrupted[0]["weights"].items():
            assert torch.equal(resumed[0]["weights"][name], value)


# ------------------------------------------------------------------- tensor parallel


def test_tensor_parallel_processes_mix_their_shared_batch_the_same_way(tp: Path) -> None:
    rank0, rank1 = (record["rows"] for record in _load(tp, "full"))
    for a, b in zip(rank0, rank1, strict=True):
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["y"], b["y"])
    assert draws(rank0) == draws(rank1)
    # net.1 is the column-parallel half of the hidden units: each process mixes its shard.
    assert "net.1" in {row["layer"] for row in rank0}


def test_tensor_parallel_losses_and_updates_equal_the_hand_computation(tp: Path) -> None:
    _check_against_hand_sgd(_load(tp, "full"), replicas=[0])
