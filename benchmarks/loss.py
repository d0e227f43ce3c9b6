"""Benchmark 2: the mixed-target loss against plain class-index cross-entropy.

For B=256 and C in {10, 1000, 32000}, forward + backward of
  plain   F.cross_entropy(logits, y)                         (class indices, no mixing)
  soft    one_hot_mix(...) then soft_cross_entropy           (builds a (B, C) target)
  pair    MixedTarget(y_a, y_b, lam) then pair_cross_entropy (no (B, C) target)
Reports median time, the ratio to plain, and memory: on CUDA the peak allocated during the
step minus before it; on the CPU the bytes the profiler saw allocated during one step (a sum of
allocations, not a peak: the CPU allocator exposes no peak).

    python benchmarks/loss.py
    python benchmarks/loss.py --device cuda
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved_medians, machine, step_bytes, write_json

from lightning_manifold_mixup import MixedTarget, one_hot_mix
from lightning_manifold_mixup.losses import pair_cross_entropy, soft_cross_entropy


def variants(b: int, c: int, device: torch.device) -> dict[str, Callable[[], None]]:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(b, c, generator=g).to(device).requires_grad_(True)
    y = torch.randint(0, c, (b,), generator=g).to(device)
    index = torch.randperm(b, generator=g).to(device)
    lam = torch.tensor(0.3, device=device)

    def plain() -> None:
        F.cross_entropy(logits, y).backward()

    def soft() -> None:
        soft_cross_entropy(logits, one_hot_mix(y, lam, index, c)).backward()

    def pair() -> None:
        pair_cross_entropy(logits, MixedTarget(y, y[index], lam)).backward()

    return {"plain": plain, "soft": soft, "pair": pair}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 1000, 32000])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    device = torch.device(args.device)
    out: dict[str, Any] = {"machine": machine(), "args": vars(args), "cases": {}}
    print(f"machine: {out['machine']}")
    print(
        "| C | plain ms | soft ms | pair ms | soft/plain | pair/plain "
        "| plain MB | soft MB | pair MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for c in args.classes:
        fns = variants(args.batch, c, device)
        med = interleaved_medians(fns, device, warmup=5, rounds=args.rounds, steps=args.steps)
        mem = {k: step_bytes(fn, device) for k, fn in fns.items()}
        out["cases"][str(c)] = {"median_s": med, "bytes": mem}
        mb = {k: v / 2**20 for k, v in mem.items()}
        print(
            f"| {c} | {med['plain'] * 1e3:.3f} | {med['soft'] * 1e3:.3f} | {med['pair'] * 1e3:.3f} "
            f"| {med['soft'] / med['plain']:.2f} | {med['pair'] / med['plain']:.2f} "
            f"| {mb['plain']:.1f} | {mb['soft']:.1f} | {mb['pair']:.1f} |"
        )
    print(f"written: {write_json(f'loss_{device.type}', out)}")


if __name__ == "__main__":
    main()
