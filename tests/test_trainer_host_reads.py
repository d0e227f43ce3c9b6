"""A real ``Trainer.fit`` reads no device data on the host in steady-state steps.

On a GPU every read of tensor data by the host (``.item()``, ``float(t)``, ``bool(t)``,
``nonzero``, printing a value) and every tensor made from host numbers (``torch.tensor(0.5)``
on the device, a ``self.log`` of a Python float) waits for the device. Here a
``TorchDispatchMode`` records these operations over whole training steps of a real fit on the
CPU (callback hooks, the mixin's default ``training_step``, backward, the optimizer, Lightning's
logging and progress bar), from one batch start to the next. Logging steps
(``log_every_n_steps``) may read the values they log; every other step must read nothing.
"""

from __future__ import annotations

import sys
import weakref
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import MLPClassifier, RecordingLogger, make_loader
from lightning_manifold_mixup import ManifoldMixupCallback

HOST_READS = {
    "_local_scalar_dense",  # .item(), float(t), int(t), bool(t)
    "is_nonzero",
    "nonzero",
    "equal",
    "lift_fresh",  # torch.tensor(<host data>)
    "lift_fresh_copy",
    "scalar_tensor",  # a tensor from a Python number
}


class _Reads(TorchDispatchMode):
    """Records host reads of device data.

    On the CPU every tensor lives on the host, so the mode models the device: a tensor is
    "host" when it came from an explicit copy to the CPU (``t.to("cpu", copy=True)``, the one
    way to fetch a value) or was computed from host tensors only; reading a host tensor is
    free. Tensors made from numpy arrays by the package's ``host_to_device`` are exempt: on CUDA
    that helper pins the buffer and copies it asynchronously.
    """

    def __init__(self, host: dict[int, weakref.ref]) -> None:
        super().__init__()
        self.ops: list[str] = []
        self._host = host  # shared by the steps: a value fetched once stays on the host

    def _is_host(self, t: Any) -> bool:
        ref = self._host.get(id(t))
        return ref is not None and ref() is t

    def _mark(self, out: Any) -> None:
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self._host[id(t)] = weakref.ref(t)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if name == "_to_copy" and kwargs.get("device") == torch.device("cpu"):
            self.ops.append("to_host")
            self._mark(out)
        elif tensors and all(self._is_host(t) for t in tensors):
            self._mark(out)
        elif name in HOST_READS and not _called_from("host_to_device"):
            self.ops.append(name)
        return out


def _called_from(function: str) -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name == function:
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


class StepReads(L.Callback):
    """Records host reads from one batch start to the next, for steps >= ``warmup``.

    Listed first, so its batch start runs before any other callback's.
    """

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.mode: _Reads | None = None
        self.per_step: dict[int, list[str]] = {}
        self.host: dict[int, weakref.ref] = {}

    def _close(self) -> None:
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
            self.mode = None

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._close()
        if trainer.global_step >= self.warmup:
            self.mode = _Reads(self.host)
            self.per_step[trainer.global_step] = self.mode.ops
            self.mode.__enter__()

    def on_train_end(self, *args: Any) -> None:
        self._close()

    def on_exception(self, *args: Any) -> None:
        self._close()


class PlainLogging(L.LightningModule):
    """The usual user module: logs its loss with ``prog_bar=True`` every step."""

    def __init__(self) -> None:
        super().__init__()
        self.net = MLPClassifier().net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self(batch[0]), batch[1])
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(module: L.LightningModule, callbacks: list[L.Callback], steps: int = 30) -> StepReads:
    reads = StepReads(warmup=5)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=RecordingLogger(),
        log_every_n_steps=10,
        callbacks=[reads, *callbacks],
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(module, make_loader(n=512, batch_size=16))
    return reads


def _split(reads: StepReads) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """(logging steps, other steps); Lightning logs after steps 9, 19, 29 (0-based)."""
    logging = {s: ops for s, ops in reads.per_step.items() if (s + 1) % 10 == 0}
    other = {s: ops for s, ops in reads.per_step.items() if (s + 1) % 10 != 0}
    return logging, other


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"targets": "pair"}, {"lam_mode": "sample"}, {"probability": 0.5}, {"log": False}],
    ids=str,
)
def test_mixin_with_callback_reads_nothing_between_logging_steps(kwargs: dict[str, Any]) -> None:
    cb = ManifoldMixupCallback(layers=["input", "net.1", "net.3"], seed=0, **kwargs)
    logging, other = _split(_fit(MLPClassifier(), [cb]))
    assert len(other) >= 20
    assert {s: ops for s, ops in other.items() if ops} == {}
    assert all(ops.count("to_host") == 1 for ops in logging.values())  # one fetch


def test_callback_on_a_plain_module_adds_no_host_reads() -> None:
    """The user's own per-step loss logging reads every step; the callback adds nothing."""
    cb = ManifoldMixupCallback(layers=["input", "net.1", "net.3"], seed=0, num_classes=4)
    with_cb = _fit(PlainLogging(), [cb])
    without = _fit(PlainLogging(), [])
    assert [len(ops) for ops in with_cb.per_step.values()] == [
        len(ops) for ops in without.per_step.values()
    ]


def test_the_recorder_sees_per_step_reads() -> None:
    """The check can fail: a module that logs prog_bar metrics every step is caught."""
    _, other = _split(_fit(PlainLogging(), []))
    assert all(ops for ops in other.values())
