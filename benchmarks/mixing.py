"""Benchmark 6: the hidden-state mix alone, forward + backward.

For a hidden tensor h (requires grad) and a permutation index, the backward of
  indexing   lam * h + (1 - lam) * h[index]          (autograd's index backward: scatter-add)
  package    mix_tensor(h, lam, index)               (index_select, mix in place on the copy)
is timed side by side after the same forward, with the gradient of a fixed upstream tensor.
Prints the median time of each and the ratio indexing / package (> 1: the package is faster),
and checks that both give the same output and gradient.

    python benchmarks/mixing.py
    python benchmarks/mixing.py --device cuda
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved_medians, machine, write_json

from lightning_manifold_mixup import mix_tensor

SHAPES = {"resnet_stage (128, 64, 32, 32)": (128, 64, 32, 32), "mlp (256, 1024)": (256, 1024)}


def variants(shape: tuple[int, ...], device: torch.device) -> dict[str, Callable[[], None]]:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(shape, generator=g).to(device).requires_grad_(True)
    upstream = torch.randn(shape, generator=g).to(device)
    index = torch.randperm(shape[0], generator=g).to(device)
    lam = torch.tensor(0.3, device=device)

    def indexing() -> None:
        h.grad = None
        (lam * h + (1 - lam) * h[index]).backward(upstream)

    def package() -> None:
        h.grad = None
        mix_tensor(h, lam, index).backward(upstream)

    # Same value and gradient before timing anything.
    indexing()
    expected = h.grad.clone()  # type: ignore[union-attr]
    package()
    torch.testing.assert_close(h.grad, expected)
    with torch.no_grad():
        torch.testing.assert_close(mix_tensor(h, lam, index), lam * h + (1 - lam) * h[index])
    return {"indexing": indexing, "package": package}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    results = {}
    for label, shape in SHAPES.items():
        med = interleaved_medians(
            variants(shape, device), device, warmup=3, rounds=args.rounds, steps=args.steps
        )
        ratio = med["indexing"] / med["package"]
        results[label] = {**{k: v * 1e3 for k, v in med.items()}, "indexing/package": ratio}
        print(
            f"{label}: indexing {med['indexing'] * 1e3:.2f} ms, package "
            f"{med['package'] * 1e3:.2f} ms, indexing/package {ratio:.2f}x"
        )
    path = write_json("mixing", {"machine": machine(), "device": str(device), "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
