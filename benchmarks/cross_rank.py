"""Benchmark 4: the cost of pairing="global" against "local" in a 2-process DDP step.

Two CPU processes (gloo, torch.multiprocessing.spawn, one thread each), each with its own
batch of 32 rows, train identical DDP copies of the MLP of step_overhead.py (manifold mixup
over {input, 2 hidden layers}). Variants, interleaved in each process:
  (a) plain   forward, class-index cross-entropy, backward (DDP all-reduce), SGD step
  (b) local   the same with ManifoldMixupCallback(pairing="local")
  (c) global  the same with ManifoldMixupCallback(pairing="global"): a batch-size check, a
              gather of the targets (and of the input or the hidden state) every step, and for
              hidden layers a gradient all-reduce in backward

Prints rank 0's medians and the ratios; writes JSON to benchmarks/results/.

    python benchmarks/cross_rank.py
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_only
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ManualDriver, interleaved_medians, machine, write_json
from step_overhead import Holder, make_case

from lightning_manifold_mixup import ManifoldMixupCallback

WORLD = 2


def build_variants(
    rank: int, batch: int
) -> tuple[dict[str, Callable[[], None]], list[Callable[[], None]]]:
    case = make_case("mlp", torch.device("cpu"), None)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(batch, *case["shape"], generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    modules = [Holder(copy.deepcopy(case["net"]), 10) for _ in range(3)]
    ddps = [DistributedDataParallel(m) for m in modules]
    opts = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in modules]

    def step(opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def plain() -> None:
        step(opts[0], F.cross_entropy(ddps[0](x), y))

    def with_callback(i: int, pairing: Any) -> tuple[Callable[[], None], Callable[[], None]]:
        cb = ManifoldMixupCallback(
            layers=case["layers"], alpha=2.0, seed=0, log=False, pairing=pairing
        )
        driver = ManualDriver(cb, modules[i], global_rank=rank, world_size=WORLD)

        def run() -> None:
            driver.train_step([x, y], opts[i], forward=ddps[i])

        return run, driver.close

    local, close_local = with_callback(1, "local")
    global_, close_global = with_callback(2, "global")
    variants = {"a_plain": plain, "b_local": local, "c_global": global_}
    return variants, [close_local, close_global]


def worker(rank: int, args: argparse.Namespace, store: str, results: dict[str, Any]) -> None:
    torch.set_num_threads(1)  # two processes on the benchmark's cores, one each
    rank_zero_only.rank = rank  # spawned by hand, so Lightning's rank_zero_* need telling
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        variants, closers = build_variants(rank, args.batch)
        med = interleaved_medians(
            variants,
            torch.device("cpu"),
            warmup=args.warmup,
            rounds=args.rounds,
            steps=args.steps,
        )
        for close in closers:
            close()
        gathered: list[Any] = [None] * WORLD
        dist.all_gather_object(gathered, med)
        if rank == 0:
            results["by_rank"] = gathered
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=32, help="rows per rank")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, mp.Manager() as manager:
        shared = manager.dict()
        mp.spawn(worker, args=(args, str(Path(tmp) / "store"), shared), nprocs=WORLD)
        by_rank = list(shared["by_rank"])
    med = by_rank[0]
    a, b, c = med["a_plain"], med["b_local"], med["c_global"]
    results: dict[str, Any] = {
        "machine": {**machine(), "processes": WORLD, "torch_threads_per_process": 1},
        "args": vars(args),
        "model": "mlp",
        "median_s_by_rank": by_rank,
        "b/a": b / a,
        "c/a": c / a,
        "c/b": c / b,
    }
    print(f"machine: {results['machine']}")
    print(
        "| model | batch/rank | ranks | a plain ms | b local ms | c global ms | b/a | c/a | c/b |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print(
        f"| mlp | {args.batch} | {WORLD} | {a * 1e3:.2f} | {b * 1e3:.2f} | {c * 1e3:.2f} "
        f"| {b / a:.3f} | {c / a:.3f} | {c / b:.3f} |"
    )
    print(f"written: {write_json('cross_rank_cpu', results)}")


if __name__ == "__main__":
    main()
