"""Owns the public namespace of the math: every plain-torch function of the package, in one.

Each function lives in the module that owns its concern (:mod:`~lightning_manifold_mixup.draw`,
:mod:`~lightning_manifold_mixup.layout`, :mod:`~lightning_manifold_mixup.policies`,
:mod:`~lightning_manifold_mixup.targets`); this module gathers them for use without the
callback, e.g. in a hand-written training loop (see ``docs/recipes-plain-pytorch.md``).

Example:
    >>> import torch
    >>> h = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> mix_tensor(h, torch.tensor(0.75), torch.tensor([1, 0]))
    tensor([[0.7500, 0.2500],
            [0.2500, 0.7500]])
"""

from lightning_manifold_mixup.draw import (
    Box,
    Draw,
    KeyedStream,
    LamMode,
    MixDecision,
    cutmix_box,
    cutmix_lam,
    host_to_device,
    lam_tensor,
    sample_decision,
)
from lightning_manifold_mixup.layout import (
    batch_first_of,
    is_batch_major,
    map_batch,
    map_nested,
    tensors,
)
from lightning_manifold_mixup.policies import (
    Blend,
    CutMix,
    MixPolicy,
    cutmix_tensor,
    mix_batch,
    mix_tensor,
    mix_with_partner,
    permute_rows,
)
from lightning_manifold_mixup.targets import (
    MixedTarget,
    mix_targets,
    mix_targets_with_partner,
    one_hot_mix,
    one_hot_pair,
    soft_targets,
)

__all__ = [
    "Blend",
    "Box",
    "CutMix",
    "Draw",
    "KeyedStream",
    "LamMode",
    "MixDecision",
    "MixPolicy",
    "MixedTarget",
    "batch_first_of",
    "cutmix_box",
    "cutmix_lam",
    "cutmix_tensor",
    "host_to_device",
    "is_batch_major",
    "lam_tensor",
    "map_batch",
    "map_nested",
    "mix_batch",
    "mix_targets",
    "mix_targets_with_partner",
    "mix_tensor",
    "mix_with_partner",
    "one_hot_mix",
    "one_hot_pair",
    "permute_rows",
    "sample_decision",
    "soft_targets",
    "tensors",
]
