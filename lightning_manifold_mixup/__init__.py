"""Manifold Mixup (Verma et al., ICML 2019) for PyTorch Lightning."""

from lightning_manifold_mixup.callback import ManifoldMixupCallback
from lightning_manifold_mixup.draw import MixDecision, cutmix_box, cutmix_lam, sample_decision
from lightning_manifold_mixup.layers import candidate_layers, normalize_name, resolve_layers
from lightning_manifold_mixup.losses import (
    bce_softmax_loss,
    mixup_loss,
    pair_cross_entropy,
    soft_cross_entropy,
)
from lightning_manifold_mixup.mixin import ManifoldMixupMixin, dominant_class, mixed_accuracy
from lightning_manifold_mixup.mixstyle import MixStyle
from lightning_manifold_mixup.nfm import NoisyFeatureMixup
from lightning_manifold_mixup.patchup import PatchUpSoft
from lightning_manifold_mixup.policies import MixPolicy, cutmix_tensor, mix_batch, mix_tensor
from lightning_manifold_mixup.targets import MixedTarget, mix_targets, one_hot_mix

__version__ = "0.3.0"

__all__ = [
    "ManifoldMixupCallback",
    "ManifoldMixupMixin",
    "MixDecision",
    "MixPolicy",
    "MixStyle",
    "MixedTarget",
    "NoisyFeatureMixup",
    "PatchUpSoft",
    "bce_softmax_loss",
    "candidate_layers",
    "cutmix_box",
    "cutmix_lam",
    "cutmix_tensor",
    "dominant_class",
    "mix_batch",
    "mix_targets",
    "mix_tensor",
    "mixed_accuracy",
    "mixup_loss",
    "normalize_name",
    "one_hot_mix",
    "pair_cross_entropy",
    "resolve_layers",
    "sample_decision",
    "soft_cross_entropy",
]
