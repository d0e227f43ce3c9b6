"""Input mixup through the callback against the field's mixup: host work and time per step.

Each variant is a real ``Trainer.fit`` of the same small CNN (conv 3-8, max pool, conv 8-16,
global average pool, linear 16-10) on the same batches of 32 images 3x8x8 (a step of a few
milliseconds, much of it host work), with the defaults a user has (a CSV logger,
``log_every_n_steps=50``) and the loss logged as most users log it (``self.log("train_loss",
loss, on_step=True, on_epoch=True, prog_bar=True)``); only how the batch is mixed differs:

  plain        no mixing, no callback
  floor        plain + an empty ``lightning.Callback``: what Lightning charges for any callback
               (it calls every hook of every callback), the floor under the callback
  callback     ``ManifoldMixupCallback(layers=["input"], alpha=1.0, num_classes=10)`` on the
               plain module, loss ``mixup_loss(logits, y)``
  mixin+cb     the callback on a ``ManifoldMixupMixin`` module, loss ``self.mixup_loss``
  timm         ``timm.data.Mixup(mixup_alpha=1.0, cutmix_alpha=0.0, label_smoothing=0.0)`` in
               training_step, ``timm.loss.SoftTargetCrossEntropy``
  torchvision  ``torchvision.transforms.v2.MixUp(alpha=1.0, num_classes=10)`` in training_step,
               ``F.cross_entropy`` on its soft targets
  by_hand      mixup written by hand in training_step, as the mixup paper's code: a numpy
               Beta(1, 1) lam, ``torch.randperm``, ``lam * CE(y_a) + (1 - lam) * CE(y_b)``

Counted as ``host_work.py`` counts, but each count in a fit of its own: tensor operations
dispatched (``TorchDispatchMode``) and Python function calls (``sys.setprofile``, without the
counting mode's own calls) per step, over ``--count-steps`` steps after ``--warmup``. Timed:
one fit per variant per round, variants interleaved, the steps after ``--warmup`` timed, median
over ``--rounds`` (1 torch thread). The targets (issue 26): the callback at or below the best
peer (timm, torchvision, by hand) in operations, and within 5 % of it in Python calls.

    python benchmarks/peers.py                          # counts and times, about 1-2 minutes
    python benchmarks/peers.py --quick                  # a smoke run
    python benchmarks/peers.py --detail                 # what the callback adds over the best peer
    python benchmarks/peers.py --tree ../other-checkout # also count the callback of another core

``--tree`` counts ``plain``, ``floor`` and the two callback variants again in a subprocess that
imports the package from that checkout (counts only; the peers do not depend on it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader

from lightning_manifold_mixup import ManifoldMixupCallback, ManifoldMixupMixin, mixup_loss

HERE = Path(__file__).resolve().parent
VARIANTS = ("plain", "floor", "callback", "mixin+cb", "timm", "torchvision", "by_hand")
CALLBACKS = ("callback", "mixin+cb")
PEERS = ("timm", "torchvision", "by_hand")
BATCH, SHAPE, CLASSES = 32, (3, 8, 8), 10


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, CLASSES),
    )


class Plain(L.LightningModule):
    """The user's module of every variant; subclasses change only ``loss``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = small_cnn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self(x), y)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.loss(x, y)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


class WithCallback(Plain):
    """A plain module trained with the callback: y arrives as float (B, 10) soft targets."""

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return mixup_loss(self(x), y)


class WithMixin(ManifoldMixupMixin, Plain):
    """The mixin's module trained with the callback; ``training_step`` is ``Plain``'s (the
    mixin's default one logs differently, which would not compare with the peers)."""

    training_step = Plain.training_step

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.mixup_loss(self(x), y)


class Timm(Plain):
    def __init__(self) -> None:
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy

        super().__init__()
        self.mixup = Mixup(
            mixup_alpha=1.0, cutmix_alpha=0.0, label_smoothing=0.0, num_classes=CLASSES
        )
        self.criterion = SoftTargetCrossEntropy()

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # timm mixes x in place; the stored batches stay convex combinations of themselves,
        # which changes no count.
        x, y = self.mixup(x, y)
        return self.criterion(self(x), y)


class Torchvision(Plain):
    def __init__(self) -> None:
        from torchvision.transforms import v2

        super().__init__()
        self.mixup = v2.MixUp(alpha=1.0, num_classes=CLASSES)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, y = self.mixup(x, y)
        return F.cross_entropy(self(x), y)


class ByHand(Plain):
    def __init__(self) -> None:
        super().__init__()
        self.rng = np.random.default_rng(0)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        lam = float(self.rng.beta(1.0, 1.0))
        index = torch.randperm(x.shape[0])
        logits = self(lam * x + (1 - lam) * x[index])
        return lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[index])


MODULES: dict[str, type[Plain]] = {
    "plain": Plain,
    "floor": Plain,
    "callback": WithCallback,
    "mixin+cb": WithMixin,
    "timm": Timm,
    "torchvision": Torchvision,
    "by_hand": ByHand,
}


class Ops(TorchDispatchMode):
    """Counts every tensor operation dispatched, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


class Probe(L.Callback):
    """From step ``warmup`` to the end of the fit: the wall time, and with ``count`` the tensor
    operations (``"ops"``) or the Python calls by code object (``"calls"``). Each is counted in
    a fit of its own, so the calls of the counting dispatch mode are not among the calls."""

    def __init__(self, warmup: int, count: str | None) -> None:
        self.warmup, self.count = warmup, count
        self.mode = Ops()
        self.calls: Counter[Any] = Counter()
        self.start = self.seconds = 0.0
        self.steps = 0

    def _profile(self, frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            self.calls[frame.f_code] += 1

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.warmup:
            if self.count == "ops":
                self.mode.__enter__()
            if self.count == "calls":
                sys.setprofile(self._profile)
            self.start = time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.seconds = time.perf_counter() - self.start
        if self.count == "calls":
            sys.setprofile(None)
        if self.count == "ops":
            self.mode.__exit__(None, None, None)
        self.steps = trainer.global_step - self.warmup


def fit(variant: str, warmup: int, steps: int, count: str | None) -> Probe:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    batches = [
        [torch.randn(BATCH, *SHAPE, generator=g), torch.randint(0, CLASSES, (BATCH,), generator=g)]
        for _ in range(16)
    ]
    # With batch_size=None the loader hands each step a new list holding the stored tensors,
    # so the callback's in-place rewrite of the batch never reaches the stored one.
    loader = DataLoader(batches * ((warmup + steps) // 16 + 1), batch_size=None, shuffle=False)
    probe = Probe(warmup, count)
    callbacks: list[L.Callback] = [probe]
    if variant == "floor":
        callbacks.append(L.Callback())
    if variant in CALLBACKS:
        callbacks.append(ManifoldMixupCallback(layers=["input"], alpha=1.0, num_classes=CLASSES))
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
        trainer.fit(MODULES[variant](), loader)
    return probe


def function_name(code: Any) -> str:
    """``folder/file.py:qualname``, or ``<frozen abc>:qualname`` for a file with no folder."""
    path = Path(code.co_filename)
    where = f"{path.parent.name}/{path.name}" if path.parent.name else path.name
    return f"{where}:{code.co_qualname}"


def count(variants: list[str], warmup: int, steps: int) -> dict[str, Any]:
    """Operations and Python calls per step of each variant, totals and by name."""
    out: dict[str, Any] = {}
    for variant in variants:
        ops = fit(variant, warmup, steps, count="ops").mode.ops
        by_fn: Counter[str] = Counter()
        for code, n in fit(variant, warmup, steps, count="calls").calls.items():
            by_fn[function_name(code)] += n
        out[variant] = {
            "ops": sum(ops.values()) / steps,
            "calls": sum(by_fn.values()) / steps,
            "by_op": {op: n / steps for op, n in ops.most_common()},
            "by_fn": {fn: n / steps for fn, n in by_fn.most_common()},
        }
    return out


def time_steps(variants: list[str], warmup: int, steps: int, rounds: int) -> dict[str, list[float]]:
    """Seconds per step of each variant in each round; the variants alternate within a round,
    so slow drifts of a shared machine spread over all of them."""
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(rounds):
        for variant in variants:
            probe = fit(variant, warmup, steps, count=None)
            times[variant].append(probe.seconds / probe.steps)
    return times


def count_other_tree(tree: Path, warmup: int, steps: int) -> dict[str, Any]:
    variants = ["plain", "floor", *CALLBACKS]
    command = [sys.executable, __file__, "--json", "--warmup", str(warmup)]
    command += ["--count-steps", str(steps), "--variants", *variants]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(command, env=env, cwd=tree, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_detail(counts: dict[str, Any], callback: str, key: str, peer: str, top: int) -> None:
    """The operations (``key="by_op"``) or functions (``"by_fn"``) whose per-step counts differ
    most between the callback and the peer, less Lightning's charge for any callback (floor
    minus plain) when both ran; functions are also summed by the folder of their file."""
    terms = [(1.0, counts[callback]), (-1.0, counts[peer])]
    if "floor" in counts and "plain" in counts:
        terms += [(-1.0, counts["floor"]), (1.0, counts["plain"])]
    less = ", less floor minus plain" if len(terms) == 4 else ""
    names = {n for _, run in terms for n in run[key]}
    extra = {n: sum(sign * run[key].get(n, 0.0) for sign, run in terms) for n in names}
    what = "tensor operations" if key == "by_op" else "Python calls"
    print(f"\n{what} per step, {callback} minus {peer}{less}: {sum(extra.values()):+.1f}")
    if key == "by_fn":
        folders: Counter[str] = Counter()
        for n, d in extra.items():
            folders[n.split(":")[0].rsplit("/", 1)[0]] += d
        shown = (f"{f} {d:+.1f}" for f, d in folders.most_common() if abs(d) >= 0.5)
        print("  by folder: " + ", ".join(shown))
    for n in sorted((n for n in names if abs(extra[n]) >= 0.5), key=lambda n: -abs(extra[n]))[:top]:
        mine, theirs = counts[callback][key].get(n, 0.0), counts[peer][key].get(n, 0.0)
        print(f"  {extra[n]:+8.1f}  {n}  ({callback} {mine:.1f}, {peer} {theirs:.1f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=20, help="untimed, uncounted steps")
    parser.add_argument("--count-steps", type=int, default=100)
    parser.add_argument("--steps", type=int, default=100, help="timed steps per fit")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="10 counted, 30 timed, 1 round")
    parser.add_argument("--no-time", action="store_true", help="counts only")
    parser.add_argument("--tree", type=Path, default=None, help="another checkout to count")
    parser.add_argument("--detail", action="store_true", help="what the callback adds")
    parser.add_argument("--top", type=int, default=40, help="rows of --detail")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.warmup, args.count_steps, args.steps, args.rounds = 5, 10, 30, 1
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)  # Lightning's and the callback's notes at every fit
    torch.set_num_threads(1)
    if args.json:  # the subprocess of --tree
        print(json.dumps(count(args.variants, args.warmup, args.count_steps)))
        return

    counts = count(args.variants, args.warmup, args.count_steps)
    other = (
        None if args.tree is None else count_other_tree(args.tree, args.warmup, args.count_steps)
    )
    times = {} if args.no_time else time_steps(args.variants, args.warmup, args.steps, args.rounds)
    ms = {v: 1e3 * statistics.median(t) for v, t in times.items()}

    print(
        f"small CNN, batch {BATCH} x {SHAPE}, 1 torch thread; per step: counts over "
        f"{args.count_steps} steps, median ms over {args.rounds} rounds of {args.steps} steps "
        f"(after {args.warmup} warm-up steps each); ratios to floor"
    )
    floor = counts.get("floor")
    for v in args.variants:
        c = counts[v]
        row = f"  {v:<12}{c['ops']:>7.1f} ops"
        row += f" ({c['ops'] / floor['ops']:.2f}x)" if floor else ""
        row += f" {c['calls']:>7.0f} calls"
        row += f" ({c['calls'] / floor['calls']:.2f}x)" if floor else ""
        if v in ms:
            spread = f"[{1e3 * min(times[v]):.2f}-{1e3 * max(times[v]):.2f}]"
            row += f" {ms[v]:>7.3f} ms {spread:>13}"
            row += f" ({ms[v] / ms['floor']:.2f}x)" if "floor" in ms else ""
        if other is not None and v in other:
            row += f"   {args.tree}: {other[v]['ops']:.1f} ops {other[v]['calls']:.0f} calls"
        print(row)

    peers = [p for p in PEERS if p in counts]
    for cb in (c for c in CALLBACKS if c in counts and peers):
        for key, slack, what in (("ops", 1.0, "at or below"), ("calls", 1.05, "within 5 % of")):
            best = min(peers, key=lambda p: counts[p][key])
            mine, theirs = counts[cb][key], counts[best][key]
            met = "met" if mine <= slack * theirs else "NOT met"
            print(
                f"target: {cb} {what} the best peer in {key}: {mine:.1f} against {best} "
                f"{theirs:.1f} ({mine / theirs:.3f}x): {met}"
            )
    if args.detail:  # against the best peer in each count
        for cb in (c for c in CALLBACKS if c in counts and peers):
            for key, total in (("by_op", "ops"), ("by_fn", "calls")):
                best = min(peers, key=lambda p: counts[p][total])
                print_detail(counts, cb, key, best, args.top)

    # Imported here, not at the top: _common imports the tests' helpers of this checkout, which
    # need not fit the package of another checkout that the --tree subprocess imports.
    from _common import machine, write_json

    write_json(
        "peers",
        {
            "machine": machine(),
            "args": {**vars(args), "tree": str(args.tree)},
            "counts": counts,
            "other_tree": other,
            "ms_per_step": ms,
            "all": times,
        },
    )


if __name__ == "__main__":
    main()
