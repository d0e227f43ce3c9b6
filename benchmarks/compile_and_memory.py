"""Benchmarks 3 and 4: memory of a step with the callback, and torch.compile with the callback.

Memory: on CUDA, peak allocated bytes of a training step with the callback minus without it,
against the size of one copy of the mixed hidden tensor. On the CPU there is no peak counter;
the profiler's sum of bytes allocated during one step is reported instead (an upper bound on
what the step adds, not a peak).

Compile: steps per second of a torch.compile'd model with and without the callback, timed
interleaved after warm-up, and the number of graphs dynamo compiled (target: at most the
number of eligible layers + 1).

    python benchmarks/compile_and_memory.py                 # CPU, inductor
    python benchmarks/compile_and_memory.py --device cuda
    python benchmarks/compile_and_memory.py --batch 32 --hidden 64   # host-bound, as on a GPU

It also prints dynamo's counters (graphs, graph breaks, recompile-limit hits); for the
reasons, run with TORCH_LOGS="graph_breaks,recompiles" (add "guards" for the guard lists).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ManualDriver, interleaved_medians, machine, step_bytes, write_json
from step_overhead import Holder

from lightning_manifold_mixup import ManifoldMixupCallback
from lightning_manifold_mixup_recipes.models import MLP

LAYERS = ["input", "net.layers.1", "net.layers.3"]


def make(
    device: torch.device, batch: int, hidden: int = 1024
) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    net = MLP(784, 10, hidden=(hidden, hidden)).to(device)
    x = torch.randn(batch, 784, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    return net, x, y


class PlainMLP(MLP):
    """A separate class for the baseline: dynamo caches compiled frames per code object and
    does not tell apart two instances of one class by their hooks, so a hook-free instance
    compiled first could lend its graph to the hooked one (the callback then raises)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)


def step_fns(
    device: torch.device, batch: int, backend: str, hidden: int = 1024
) -> tuple[dict[str, Any], Any]:
    net, x, y = make(device, batch, hidden)
    mix_net = copy.deepcopy(net)
    plain_net = PlainMLP(784, 10, hidden=(hidden, hidden)).to(device)
    plain_net.load_state_dict(net.state_dict())
    plain_mod = Holder(plain_net, 10)
    mix_mod = Holder(mix_net, 10)
    plain_mod.net = torch.compile(plain_mod.net, backend=backend)  # type: ignore[assignment]
    mix_mod.net = torch.compile(mix_mod.net, backend=backend)  # type: ignore[assignment]
    opt_a = torch.optim.SGD(plain_mod.parameters(), lr=0.01)
    opt_b = torch.optim.SGD(mix_mod.parameters(), lr=0.01)
    driver = ManualDriver(ManifoldMixupCallback(layers=LAYERS, seed=0, log=False), mix_mod)

    def plain() -> None:
        loss = F.cross_entropy(plain_mod(x), y)
        opt_a.zero_grad(set_to_none=True)
        loss.backward()
        opt_a.step()

    def mixed() -> None:
        driver.train_step([x, y], opt_b)

    return {"compiled_plain": plain, "compiled_callback": mixed}, driver.close


def dynamo_counters() -> dict[str, int]:
    """Graphs compiled, graph breaks and recompile-limit hits since ``counters.clear()``.

    A hit of ``torch._dynamo.config.recompile_limit`` means a frame keeps failing its guards
    (e.g. an integer attribute that changes every step) and dynamo runs it uncompiled from
    then on: the "compiled" step is then an eager one. ``TORCH_LOGS=recompiles`` names the guard.
    """
    return {
        "graphs": int(counters["stats"]["unique_graphs"]),
        "graph_breaks": int(sum(counters["graph_break"].values())),
        "recompile_limit_hits": sum(
            n for reason, n in counters["unimplemented"].items() if "recompile" in reason.lower()
        ),
    }


def memory(device: torch.device, batch: int) -> dict[str, Any]:
    net, x, y = make(device, batch)
    hidden_bytes = batch * 1024 * 4
    mod = Holder(copy.deepcopy(net), 10)
    driver = ManualDriver(ManifoldMixupCallback(layers=["net.layers.1"], seed=0, log=False), mod)

    def plain() -> None:
        F.cross_entropy(net(x), y).backward()

    def mixed() -> None:
        b = [x, y]
        driver.start(b)
        mod.mixup_loss(mod(b[0]), b[1]).backward()
        driver.end(b)

    out: dict[str, Any] = {"hidden_tensor_bytes": hidden_bytes}
    for name, fn in (("plain", plain), ("callback", mixed)):
        fn()  # warm up allocator caches
        out[name] = step_bytes(fn, device)
    driver.close()
    out["extra_bytes"] = out["callback"] - out["plain"]
    out["extra_in_hidden_copies"] = out["extra_bytes"] / hidden_bytes
    out["measure"] = "cuda peak" if device.type == "cuda" else "cpu profiler allocated sum"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument(
        "--hidden", type=int, default=1024, help="MLP width (64: a host-bound step on the CPU)"
    )
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--steps", type=int, default=40, help="steps before counting graphs")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    device = torch.device(args.device)
    result: dict[str, Any] = {"machine": machine(), "args": vars(args)}
    print(f"machine: {result['machine']}")

    mem = memory(device, args.batch)
    result["memory"] = mem
    print(
        f"memory ({mem['measure']}): plain {mem['plain'] / 2**20:.2f} MiB, callback "
        f"{mem['callback'] / 2**20:.2f} MiB, extra {mem['extra_bytes'] / 2**20:.2f} MiB = "
        f"{mem['extra_in_hidden_copies']:.2f} copies of the mixed hidden tensor "
        f"({mem['hidden_tensor_bytes'] / 2**20:.2f} MiB)"
    )

    torch._dynamo.reset()
    counters.clear()
    fns, close = step_fns(device, args.batch, args.backend, args.hidden)
    for _ in range(args.steps):
        fns["compiled_callback"]()
    dynamo = dynamo_counters()
    med = interleaved_medians(fns, device, warmup=5, rounds=args.rounds, steps=5)
    # Graphs compiled while timing (the plain model's one graph, then nothing): more means a
    # guard keeps failing in steady state and the timings include compilation.
    timed = dynamo_counters()
    close()
    result["compile"] = {
        "median_s": med,
        "ratio": med["compiled_callback"] / med["compiled_plain"],
        "graphs_after_callback_steps": dynamo["graphs"],
        "eligible_layers": len(LAYERS),
        "dynamo_after_callback_steps": dynamo,
        "dynamo_after_timing": timed,
    }
    print(
        f"compile ({args.backend}): plain {1 / med['compiled_plain']:.1f} steps/s, callback "
        f"{1 / med['compiled_callback']:.1f} steps/s, ratio of step times "
        f"{med['compiled_callback'] / med['compiled_plain']:.3f}; graphs compiled over "
        f"{args.steps} mixed steps: {dynamo['graphs']} (bound: {len(LAYERS) + 1}: one per "
        f"layer choice + the first step's probe)"
    )
    print(
        f"dynamo over the {args.steps} mixed steps: graph breaks {dynamo['graph_breaks']}, "
        f"recompile-limit hits {dynamo['recompile_limit_hits']}; graphs after timing "
        f"{timed['graphs']} (expected {dynamo['graphs'] + 1}: + the plain model's)"
    )
    print(f"written: {write_json(f'compile_and_memory_{device.type}', result)}")


if __name__ == "__main__":
    main()
