"""Losses: soft and pair forms agree, criteria match their definitions, float32 under autocast."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_manifold_mixup import (
    MixedTarget,
    bce_softmax_loss,
    mixup_loss,
    one_hot_mix,
    pair_cross_entropy,
    soft_cross_entropy,
)


def _batch(b: int = 6, c: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logits = torch.randn(b, c, requires_grad=True)
    y = torch.randint(0, c, (b,))
    index = torch.randperm(b)
    return logits, y, index


def test_soft_cross_entropy_of_one_hot_equals_class_index_cross_entropy() -> None:
    logits, y, _ = _batch()
    soft = F.one_hot(y, 5).float()
    torch.testing.assert_close(soft_cross_entropy(logits, soft), F.cross_entropy(logits, y))
    torch.testing.assert_close(soft_cross_entropy(logits, y), F.cross_entropy(logits, y))


def test_soft_cross_entropy_equals_its_definition() -> None:
    logits, y, index = _batch()
    target = one_hot_mix(y, torch.tensor(0.3), index, 5)
    expected = -(target * torch.log_softmax(logits, -1)).sum(-1).mean()
    torch.testing.assert_close(soft_cross_entropy(logits, target), expected)


@pytest.mark.parametrize("lam", [torch.tensor(0.3), torch.tensor([0.1, 0.9, 0.5, 0.2, 0.7, 1.0])])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_pair_and_soft_forms_give_the_same_loss_and_gradients(
    lam: torch.Tensor, smoothing: float
) -> None:
    logits, y, index = _batch()
    soft = one_hot_mix(y, lam, index, 5)
    pair = MixedTarget(y, y[index], lam)
    loss_soft = soft_cross_entropy(logits, soft, label_smoothing=smoothing)
    (grad_soft,) = torch.autograd.grad(loss_soft, logits)
    loss_pair = pair_cross_entropy(logits, pair, label_smoothing=smoothing)
    (grad_pair,) = torch.autograd.grad(loss_pair, logits)
    torch.testing.assert_close(loss_pair, loss_soft)
    torch.testing.assert_close(grad_pair, grad_soft)


def test_bce_softmax_equals_the_papers_criterion() -> None:
    logits, y, index = _batch()
    target = one_hot_mix(y, torch.tensor(0.7), index, 5)
    expected = torch.nn.BCELoss()(torch.softmax(logits, -1), target)
    torch.testing.assert_close(bce_softmax_loss(logits, target), expected)
    pair = MixedTarget(y, y[index], torch.tensor(0.7))
    torch.testing.assert_close(bce_softmax_loss(logits, pair), expected)
    torch.testing.assert_close(
        bce_softmax_loss(logits, y),
        torch.nn.BCELoss()(torch.softmax(logits, -1), F.one_hot(y, 5).float()),
    )


@pytest.mark.parametrize("criterion", ["ce", "bce"])
def test_losses_are_float32_and_finite_for_large_half_logits_under_autocast(
    criterion: str,
) -> None:
    logits = (torch.randn(4, 10) * 3e4).to(torch.bfloat16)
    y = torch.randint(0, 10, (4,))
    target = one_hot_mix(y, torch.tensor(0.5), torch.randperm(4), 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = mixup_loss(logits, target, criterion=criterion)  # type: ignore[arg-type]
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    ref = mixup_loss(logits.float(), target, criterion=criterion)  # type: ignore[arg-type]
    torch.testing.assert_close(loss, ref)
