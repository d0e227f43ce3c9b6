"""Manifold Mixup (Verma et al., ICML 2019) for PyTorch Lightning."""

from lightning_manifold_mixup.callback import ManifoldMixupCallback
from lightning_manifold_mixup.layers import candidate_layers, normalize_name, resolve_layers
from lightning_manifold_mixup.losses import (
    bce_softmax_loss,
    mixup_loss,
    pair_cross_entropy,
    soft_cross_entropy,
)
from lightning_manifold_mixup.mixin import ManifoldMixupMixin, dominant_class, mixed_accuracy
from lightning_manifold_mixup.mixing import (
    MixDecision,
    MixedTarget,
    batch_first_of,
    cutmix_box,
    cutmix_lam,
    cutmix_tensor,
    map_batch,
    map_nested,
    mix_batch,
    mix_nested,
    mix_targets,
    mix_targets_with_partner,
    mix_tensor,
    mix_with_partner,
    one_hot_mix,
    one_hot_pair,
    sample_decision,
)

__version__ = "0.1.0"

__all__ = [
    "ManifoldMixupCallback",
    "ManifoldMixupMixin",
    "MixDecision",
    "MixedTarget",
    "batch_first_of",
    "bce_softmax_loss",
    "candidate_layers",
    "cutmix_box",
    "cutmix_lam",
    "cutmix_tensor",
    "dominant_class",
    "map_batch",
    "map_nested",
    "mix_batch",
    "mix_nested",
    "mix_targets",
    "mix_targets_with_partner",
    "mix_tensor",
    "mix_with_partner",
    "mixed_accuracy",
    "mixup_loss",
    "normalize_name",
    "one_hot_mix",
    "one_hot_pair",
    "pair_cross_entropy",
    "resolve_layers",
    "sample_decision",
    "soft_cross_entropy",
]
