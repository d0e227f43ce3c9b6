"""Benchmark 1: the cost of a full training step with the callback, side by side.

Variants, interleaved in one process, identical models and batches:
  (a) plain     forward, class-index cross-entropy, backward, SGD step
  (b) callback  the same with ManifoldMixupCallback (manifold mixup over {input, 2 hidden layers})
  (c) inline    mixing written inside forward, as the paper's reference code does it

Prints medians and the ratios b/a and b/c; writes JSON to benchmarks/results/.

    python benchmarks/step_overhead.py            # CPU sizes (narrow ResNet, small batch)
    python benchmarks/step_overhead.py --device cuda --precision bf16   # GPU sizes
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ManualDriver, interleaved_medians, machine, write_json

from lightning_manifold_mixup import ManifoldMixupCallback, ManifoldMixupMixin
from lightning_manifold_mixup_recipes.models import MLP, PreActResNet18


class Holder(ManifoldMixupMixin, L.LightningModule):
    def __init__(self, net: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.net = net
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _stages(net: nn.Module) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """The network split at its mixing points: stage i's output is mixing point i + 1."""
    if isinstance(net, MLP):
        layers = net.layers
        return [
            lambda x: layers[1](layers[0](x.flatten(1))),
            lambda h: layers[3](layers[2](h)),
            lambda h: net.head(h),
        ]
    assert isinstance(net, PreActResNet18)
    return [
        lambda x: net.layer1(net.conv1(x)),
        net.layer2,
        lambda h: net.linear(
            F.adaptive_avg_pool2d(F.relu(net.bn(net.layer4(net.layer3(h)))), 1).flatten(1)
        ),
    ]


def make_case(name: str, device: torch.device, dtype: torch.dtype | None) -> dict[str, Any]:
    if name == "preactresnet18":
        cpu = device.type == "cpu"
        net: nn.Module = PreActResNet18(num_classes=10, width=16 if cpu else 64)
        batch, shape, layers = (
            (32 if cpu else 128),
            (3, 32, 32),
            ["input", "net.layer1", "net.layer2"],
        )
    else:
        net = MLP(784, 10, hidden=(1024, 1024))
        batch, shape, layers = 256, (784,), ["input", "net.layers.1", "net.layers.3"]
    return {"net": net, "batch": batch, "shape": shape, "layers": layers}


def build_variants(
    case: dict[str, Any], device: torch.device, autocast_dtype: torch.dtype | None
) -> tuple[dict[str, Callable[[], None]], Callable[[], None]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(case["batch"], *case["shape"], generator=g).to(device)
    y = torch.randint(0, 10, (case["batch"],), generator=g).to(device)
    nets = [copy.deepcopy(case["net"]).to(device) for _ in range(3)]
    opts = [torch.optim.SGD(n.parameters(), lr=0.01, momentum=0.9) for n in nets]

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)

    def step(opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def plain() -> None:
        with autocast():
            out = nets[0](x)
        step(opts[0], F.cross_entropy(out.float(), y))

    module = Holder(nets[1], 10)
    cb = ManifoldMixupCallback(layers=case["layers"], alpha=2.0, seed=0, log=False)
    driver = ManualDriver(cb, module)

    def callback() -> None:
        batch = [x, y]
        driver.start(batch)
        with autocast():
            out = module(batch[0])
        step(opts[1], module.mixup_loss(out, batch[1]))
        driver.end(batch)

    stages = _stages(nets[2])
    rng = np.random.default_rng(0)
    eye = torch.eye(10, device=device)

    def inline() -> None:
        k = int(rng.integers(3))
        lam = torch.tensor(rng.beta(2.0, 2.0), dtype=torch.float32).to(device, non_blocking=True)
        index = torch.from_numpy(rng.permutation(x.shape[0])).to(device, non_blocking=True)
        with autocast():
            h = x
            for i, stage in enumerate(stages):
                if i == k:
                    h = h * lam.to(h.dtype) + h[index] * (1 - lam).to(h.dtype)
                h = stage(h)
        target = lam * eye[y] + (1 - lam) * eye[y[index]]
        step(opts[2], F.cross_entropy(h.float(), target))

    return {"a_plain": plain, "b_callback": callback, "c_inline": inline}, driver.close


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["32", "bf16"], default="32")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--models", nargs="+", default=["preactresnet18", "mlp"])
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    results: dict[str, Any] = {"machine": machine(), "args": vars(args), "cases": {}}
    print(f"machine: {results['machine']}")
    print("| model | batch | a plain ms | b callback ms | c inline ms | b/a | b/c |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        case = make_case(name, device, dtype)
        variants, close = build_variants(case, device, dtype)
        med = interleaved_medians(
            variants, device, warmup=args.warmup, rounds=args.rounds, steps=args.steps
        )
        close()
        a, b, c = med["a_plain"], med["b_callback"], med["c_inline"]
        results["cases"][name] = {
            "batch": case["batch"],
            "median_s": med,
            "b/a": b / a,
            "b/c": b / c,
        }
        print(
            f"| {name} | {case['batch']} | {a * 1e3:.2f} | {b * 1e3:.2f} | {c * 1e3:.2f} "
            f"| {b / a:.3f} | {b / c:.3f} |"
        )
    print(f"written: {write_json(f'step_overhead_{device.type}', results)}")


if __name__ == "__main__":
    main()
