"""Host work per training step of a real ``Trainer.fit``, counted instead of timed.

On a small, host-bound step the cost of the callback is host work: tensor operations
dispatched (each a few microseconds of Python and dispatcher time on the CPU, a kernel launch on
a GPU) and Python function calls. Both are counted exactly, so versions and variants compare
side by side without the noise of a shared machine's clock. The variants and the model are
those of ``trainer_overhead.py`` (CPU preset: MLP 32-64-64-10, batch 32, Lightning's default
logging); counts are per step over the steps after ``--warmup``.

    python benchmarks/host_work.py                                # this checkout
    python benchmarks/host_work.py --tree ../other-checkout       # and another, side by side

``--tree`` runs the same count in a subprocess that imports the package and
``benchmarks/trainer_overhead.py`` from that checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
VARIANTS = ("plain_log", "plain+cb", "mixin+cb", "inline")


def count(bench_dir: Path, variants: list[str], warmup: int, steps: int) -> dict[str, Any]:
    sys.path.insert(0, str(bench_dir))
    import tempfile

    import lightning as L
    import torch
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.data import DataLoader
    from trainer_overhead import Batches, make_module, preset

    from lightning_manifold_mixup import ManifoldMixupCallback

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: Counter[str] = Counter()

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
            self.ops[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    class Counting(L.Callback):
        def __init__(self) -> None:
            self.mode = Ops()
            self.calls = 0

        def _profile(self, frame: Any, event: str, arg: Any) -> None:
            if event == "call":
                self.calls += 1

        def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
            if trainer.global_step == warmup:
                self.mode.__enter__()
                sys.setprofile(self._profile)

        def on_train_end(self, trainer: L.Trainer, *args: Any) -> None:
            sys.setprofile(None)
            self.mode.__exit__(None, None, None)

    out: dict[str, Any] = {}
    cfg = preset(torch.device("cpu"), 0)
    for variant in variants:
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(1)
        batches = [
            [torch.randn(32, *cfg["shape"], generator=g), torch.randint(0, 10, (32,), generator=g)]
            for _ in range(16)
        ]
        loader = DataLoader(
            Batches(batches * ((warmup + steps) // 16 + 1)), batch_size=None, shuffle=False
        )
        counting = Counting()
        callbacks: list[L.Callback] = [counting]
        if variant.endswith("+cb"):
            callbacks.append(ManifoldMixupCallback(layers=cfg["layers"], seed=0, num_classes=10))
        with tempfile.TemporaryDirectory() as logdir:
            trainer = L.Trainer(
                accelerator="cpu",
                devices=1,
                max_steps=warmup + steps,
                logger=CSVLogger(logdir),
                callbacks=callbacks,
                enable_progress_bar=False,
                enable_model_summary=False,
                enable_checkpointing=False,
            )
            trainer.fit(make_module(variant, cfg["net"]()), loader)
        out[variant] = {
            "ops": sum(counting.mode.ops.values()) / steps,
            "calls": counting.calls / steps,
            "by_op": {op: n / steps for op, n in counting.mode.ops.most_common()},
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, default=None, help="another checkout to compare")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--ops", action="store_true", help="list the operations per step")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bench-dir", type=Path, default=HERE, help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.json:  # the subprocess of --tree
        print(json.dumps(count(args.bench_dir, args.variants, args.warmup, args.steps)))
        return
    results = {"this checkout": count(HERE, args.variants, args.warmup, args.steps)}
    if args.tree is not None:
        tree = args.tree.resolve()
        command = [sys.executable, __file__, "--json", "--bench-dir", str(tree / "benchmarks")]
        command += ["--warmup", str(args.warmup), "--steps", str(args.steps)]
        command += ["--variants", *args.variants]
        env = {**os.environ, "PYTHONPATH": str(tree)}
        done = subprocess.run(command, env=env, cwd=tree, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(done.stderr[-2000:])
        results[str(args.tree)] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"per training step, after {args.warmup} warm-up steps, over {args.steps} steps")
    print(f"{'variant':<12}" + "".join(f"{name:>34}" for name in results))
    for variant in args.variants:
        row = ""
        for res in results.values():
            base, r = res.get("plain_log"), res[variant]
            ratio = f" ({r['ops'] / base['ops']:.2f}x)" if base else ""
            row += f"{r['ops']:>9.1f} ops{ratio:>8} {r['calls']:>8.0f} calls"
        print(f"{variant:<12}{row}")
    if args.ops:
        for variant in args.variants:
            print(f"\n{variant}: operations per step")
            names = sorted({op for res in results.values() for op in res[variant]["by_op"]})
            for op in names:
                counts = [res[variant]["by_op"].get(op, 0.0) for res in results.values()]
                print(f"  {op:<32}" + "".join(f"{c:>10.2f}" for c in counts))


if __name__ == "__main__":
    main()
