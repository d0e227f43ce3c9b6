"""No host reads of device data in the per-batch path, checked on the CPU with meta tensors.

Meta tensors have shapes but no data: ``.item()``, ``bool()``, ``.tolist()``, ``.cpu()``,
``nonzero`` and data-dependent indexing raise on them. On a GPU each of these would be a
host-device synchronisation, so a training step that runs on meta tensors has none. The step
here is the real one: the callback's hooks as Lightning calls them, the mixin's default
``training_step`` (loss and train metrics), backward and an optimizer step. Only Lightning's
``self.log`` is left out (its loop is not this package's code).

The first batches run on the CPU, up to the first mixed one: the callback reads the labels
once, in the first mixed batch, to check their range
(``tests/gpu/run_gpu_checks.py`` does the same warm-up under
``torch.cuda.set_sync_debug_mode("error")`` on a GPU).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from torch import nn

from conftest import MLPClassifier
from helpers import fake_trainer
from lightning_manifold_mixup import ManifoldMixupCallback, ManifoldMixupMixin


class ConvClassifier(ManifoldMixupMixin, L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.num_classes = 4
        self.net = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 4)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _batch(shape: tuple[int, ...], device: str) -> list[torch.Tensor]:
    if device == "meta":
        return [
            torch.empty(shape, device="meta"),
            torch.empty(shape[0], dtype=torch.long).to("meta"),
        ]
    return [torch.randn(shape), torch.randint(0, 4, (shape[0],))]


def _train(cb: ManifoldMixupCallback, model: Any, shape: tuple[int, ...], steps: int) -> list[Any]:
    """CPU batches up to the first mixed one (it checks the label range), then ``steps``
    batches with the model and data on the meta device; returns the meta steps' decisions."""
    model.log = lambda *args, **kwargs: None
    model.setup("fit")
    trainer = fake_trainer(estimated_stepping_batches=100)
    cb.on_fit_start(trainer, model)
    decisions = []

    def step(batch: list[torch.Tensor], opt: torch.optim.Optimizer) -> None:
        cb.on_train_batch_start(trainer, model, batch, 0)
        decisions.append(cb.current)
        loss = model.training_step(batch, 0)
        cb.on_before_backward(trainer, model, loss)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        cb.on_train_batch_end(trainer, model, {"loss": loss}, batch, 0)
        trainer.global_step += 1

    warmup = torch.optim.SGD(model.parameters(), lr=0.1)
    while decisions.count(None) == len(decisions):  # until one batch was mixed
        step(_batch(shape, "cpu"), warmup)
    warmed = len(decisions)
    model.to("meta")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(steps):
        step(_batch(shape, "meta"), opt)
    cb.teardown(trainer, model, "fit")
    return decisions[warmed:]


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"targets": "pair"},
        {"lam_mode": "sample"},
        {"probability": 0.5},
        {"fixed_lam": 0.3, "lam_transform": "max"},
        {"alpha_schedule": "cosine", "warmup_steps": 2},
        {"layer_weights": [0.1, 0.1, 0.8]},
    ],
    ids=str,
)
def test_mlp_steps_read_no_device_data(kwargs: dict[str, Any]) -> None:
    cb = ManifoldMixupCallback(layers=["input", "net.1", "net.3"], seed=0, **kwargs)
    decisions = _train(cb, MLPClassifier(), (6, 8), steps=12)
    mixed = [d for d in decisions if d is not None]
    assert mixed and all(d.lam.device.type == "meta" for d in mixed)
    assert {d.layer for d in mixed} >= {"net.1", "net.3"}  # hidden layers were mixed on meta


@pytest.mark.parametrize("criterion", ["ce", "bce"])
def test_conv_steps_with_cutmix_read_no_device_data(criterion: str) -> None:
    model = ConvClassifier()
    model.mixup_criterion = criterion  # type: ignore[assignment]
    cb = ManifoldMixupCallback(layers=["input", "net.1"], seed=0, cutmix_prob=0.5)
    decisions = _train(cb, model, (6, 3, 8, 8), steps=8)
    assert all(d is not None for d in decisions)


def test_meta_tensors_refuse_host_reads() -> None:
    """The proxy can fail: each kind of host read raises on a meta tensor."""
    t = torch.empty(3, device="meta")
    for read in (lambda: t.sum().item(), lambda: bool(t.sum()), t.tolist, t.nonzero, t.cpu):
        with pytest.raises((RuntimeError, NotImplementedError)):
            read()
