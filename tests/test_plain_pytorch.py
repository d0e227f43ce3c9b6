"""docs/plain-pytorch.md: the functional API in a hand-written loop and under Lightning Fabric."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

DOC = Path(__file__).resolve().parents[1] / "docs" / "plain-pytorch.md"


def _run(section: str) -> dict[str, Any]:
    part = DOC.read_text().split(f"## {section}", 1)[1]
    code = re.search(r"```python\n(.*?)```", part, re.S)
    assert code is not None
    namespace: dict[str, Any] = {"__name__": "docs_plain_pytorch"}
    exec(compile(code.group(1), str(DOC), "exec"), namespace)
    return namespace


@pytest.mark.parametrize(
    ("section", "steps"), [("A hand-written loop", 200), ("Lightning Fabric", 160)]
)
def test_the_documented_loop_trains_with_mixed_batches(section: str, steps: int) -> None:
    ns = _run(section)
    losses = ns["losses"]
    assert len(losses) == steps
    # Mixed targets keep the loss above zero, but the learnable rule is learnt.
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.8 * first
    model = ns["model"]
    with torch.no_grad():
        accuracy = (model(ns["x_all"]).argmax(1) == ns["y_all"]).float().mean()
    assert accuracy > 0.8
    assert all(not m._forward_hooks for m in model.modules())  # no hook outlived its step


def test_the_loop_mixes_the_chosen_layer_by_the_paper_formula() -> None:
    from lightning_manifold_mixup import mix_tensor

    ns = _run("A hand-written loop")  # defines mixing_hook and the model
    model, hook = ns["model"], ns["mixing_hook"]
    x, lam, index = torch.randn(4, 10), torch.tensor(0.3), torch.tensor([2, 0, 3, 1])
    handle = model[1].register_forward_hook(hook(lam, index))
    try:
        got = model(x)
    finally:
        handle.remove()
    with torch.no_grad():
        h = model[1](model[0](x))
        expected = model[4](model[3](model[2](lam * h + (1 - lam) * h[index])))
    torch.testing.assert_close(got.detach(), expected)
    assert torch.equal(mix_tensor(h, lam, index), lam * h + (1 - lam) * h[index])
