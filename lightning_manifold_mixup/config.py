"""Owns the callback's configuration: ``MixupConfig``, every argument validated in one place.

Every argument is checked once, when the frozen dataclass is built (also by
``dataclasses.replace``), all problems are reported together, and numbers are normalised
(numpy scalars become Python numbers). The arguments are documented once, in the docstring of
:class:`~lightning_manifold_mixup.ManifoldMixupCallback`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Literal, TypeGuard, get_args

import numpy as np

from lightning_manifold_mixup._lightning import MisconfigurationException
from lightning_manifold_mixup.draw import Draw, LamMode, sample_decision
from lightning_manifold_mixup.mixstyle import MixStyle
from lightning_manifold_mixup.nfm import NoisyFeatureMixup
from lightning_manifold_mixup.patchup import PatchUpSoft
from lightning_manifold_mixup.policies import Blend, MixPolicy

TargetMode = Literal["soft", "pair"]
LamTransform = Literal["none", "max"]
AlphaSchedule = Literal["constant", "linear", "cosine"]
Pairing = Literal["local", "global"]
PolicyName = Literal["blend", "nfm", "mixstyle", "patchup-soft"]

# The policies chosen by name (``policy="nfm"``), with their default arguments.
POLICIES: dict[str, type[MixPolicy]] = {
    "blend": Blend,
    "nfm": NoisyFeatureMixup,
    "mixstyle": MixStyle,
    "patchup-soft": PatchUpSoft,
}

# name: (what it must be, low bound, high bound, low bound excluded, integer, None allowed)
_NUMBERS: dict[str, tuple[str, float | None, float | None, bool, bool, bool]] = {
    "alpha": ("a number > 0 (Beta(alpha, alpha))", 0.0, None, True, False, False),
    "probability": ("in [0, 1]", 0.0, 1.0, False, False, False),
    "num_classes": ("an integer >= 2", 2, None, False, True, True),
    "seed": ("a non-negative integer or None", 0, None, False, True, True),
    "fixed_lam": ("in [0, 1] or None", 0.0, 1.0, False, False, True),
    "warmup_steps": ("an integer >= 0", 0, None, False, True, False),
    "stop_epoch": ("an integer >= 0 or None", 0, None, False, True, True),
    "cutmix_prob": ("in [0, 1]", 0.0, 1.0, False, False, False),
    "cutmix_alpha": (
        "a number > 0 or None (Beta(cutmix_alpha, cutmix_alpha))",
        0.0,
        None,
        True,
        False,
        True,
    ),
}
_CHOICES: dict[str, Any] = {
    "lam_mode": LamMode,
    "targets": TargetMode,
    "lam_transform": LamTransform,
    "alpha_schedule": AlphaSchedule,
    "pairing": Pairing,
}


@dataclasses.dataclass(frozen=True)
class MixupConfig:
    """The arguments of :class:`~lightning_manifold_mixup.ManifoldMixupCallback`, validated.

    Example:
        >>> MixupConfig(alpha=np.float32(0.5), layers=["net.1"]).alpha
        0.5
    """

    layers: tuple[str, ...] | None = None
    alpha: float = 2.0
    probability: float = 1.0
    lam_mode: LamMode = "batch"
    num_classes: int | None = None
    input_key: int | str = 0
    target_key: int | str = 1
    seed: int | None = None
    log: bool = True
    targets: TargetMode = "soft"
    layer_weights: tuple[float, ...] | None = None
    lam_transform: LamTransform = "none"
    fixed_lam: float | None = None
    alpha_schedule: AlphaSchedule = "constant"
    warmup_steps: int = 0
    stop_epoch: int | None = None
    cutmix_prob: float = 0.0
    pairing: Pairing = "local"
    attention_mask_key: str | None = "attention_mask"
    cutmix_alpha: float | None = None
    policy: PolicyName | MixPolicy = "blend"

    def __post_init__(self) -> None:
        """Validate every argument at once; raise one error listing each problem and its fix."""
        problems = _problems(self)
        if problems:
            raise MisconfigurationException("ManifoldMixupCallback: " + "; ".join(problems))
        for name, (_, _, _, _, integer, _) in _NUMBERS.items():
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, int(value) if integer else float(value))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(str(v) for v in self.layers))
        if self.layer_weights is not None:
            weights = tuple(float(v) for v in self.layer_weights)
            object.__setattr__(self, "layer_weights", weights)

    def mix_policy(self) -> MixPolicy:
        """The policy object: the one given, or the named one with its default arguments."""
        return self.policy if isinstance(self.policy, MixPolicy) else POLICIES[self.policy]()

    def sample(
        self,
        rng: np.random.Generator,
        alpha: float,
        batch_size: int,
        rows: slice | None,
        num_layers: int,
        layer_weights: np.ndarray | None,
    ) -> Draw | None:
        """:func:`~lightning_manifold_mixup.draw.sample_decision` with these arguments, at
        ``alpha`` (the schedule applied), over ``batch_size`` rows keeping ``rows``."""
        return sample_decision(
            rng,
            batch_size=batch_size,
            num_layers=num_layers,
            alpha=alpha,
            probability=self.probability,
            lam_mode=self.lam_mode,
            layer_weights=layer_weights,
            cutmix_prob=self.cutmix_prob,
            fixed_lam=self.fixed_lam,
            lam_transform=self.lam_transform,
            rows=rows,
            cutmix_alpha=None
            if self.cutmix_alpha is None
            else self.cutmix_alpha * alpha / self.alpha,
        )

    def hparams(self, layers: Sequence[str] | None = None, seed: int | None = None) -> dict:
        """Every argument as plain data; ``layers`` and ``seed`` as resolved for a fit, the
        policy as its name or its repr."""
        record = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("layers", "layer_weights"):
            if record[name] is not None:
                record[name] = list(record[name])
        if not isinstance(self.policy, str):
            record["policy"] = repr(self.policy)
        if layers:
            record["layers"] = list(layers)
        if seed is not None:
            record["seed"] = seed
        return record


def is_number(value: Any) -> TypeGuard[float | np.number]:
    """A real number (Python or numpy scalar); booleans are not numbers here."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


def _number_problem(name: str, value: Any) -> str | None:
    expected, lo, hi, lo_open, integer, optional = _NUMBERS[name]
    if value is None and optional:
        return None
    ok = is_number(value) and (not integer or isinstance(value, (int, np.integer)))
    ok = ok and math.isfinite(value)
    ok = ok and (lo is None or (value > lo if lo_open else value >= lo))
    ok = ok and (hi is None or value <= hi)
    return None if ok else f"{name} must be {expected}, got {value!r}"


def _choice_problem(name: str, value: Any) -> str | None:
    choices = get_args(_CHOICES[name])
    if value in choices:
        return None
    options = ", ".join(repr(c) for c in choices[:-1]) + f" or {choices[-1]!r}"
    return f"{name} must be {options}, got {value!r}"


def _problems(config: MixupConfig) -> list[str]:
    args = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    problems = [p for name in _NUMBERS if (p := _number_problem(name, args.get(name)))]
    problems += [p for name in _CHOICES if (p := _choice_problem(name, args.get(name)))]
    layers, weights = args.get("layers"), args.get("layer_weights")
    if isinstance(layers, str):
        problems.append(f"layers must be a list of names, not the string {layers!r}")
    elif layers is not None and len(layers) == 0:
        problems.append("layers is empty: give at least one name, or None for automatic")
    for name in ("input_key", "target_key"):
        key = args.get(name)
        if not isinstance(key, (int, str)) or isinstance(key, bool):
            problems.append(f"{name} must be an int or a str, got {key!r}")
    if args.get("input_key") == args.get("target_key"):
        problems.append(f"input_key and target_key are both {args.get('input_key')!r}")
    if weights is not None and (
        isinstance(weights, str)
        or len(weights) == 0
        or not all(is_number(w) and math.isfinite(w) and w >= 0 for w in weights)
        or sum(weights) <= 0
    ):
        problems.append(
            "layer_weights must be finite non-negative numbers with a positive sum, got "
            f"{weights!r}"
        )
    if args.get("cutmix_alpha") is not None and args.get("cutmix_prob") == 0:
        problems.append(
            "cutmix_alpha is set but cutmix_prob=0, so no batch uses CutMix: set cutmix_prob > 0 "
            "or leave cutmix_alpha=None"
        )
    cutmix = args.get("cutmix_prob")
    if is_number(cutmix) and cutmix > 0 and args.get("lam_mode") == "sample":
        problems.append("cutmix_prob > 0 needs lam_mode='batch' (one box per batch)")
    if not isinstance(args.get("log", True), bool):
        problems.append(f"log must be True or False, got {args.get('log')!r}")
    policy = args.get("policy")
    if not isinstance(policy, MixPolicy) and policy not in POLICIES:
        names = ", ".join(repr(n) for n in POLICIES)
        problems.append(
            f"policy must be one of {names} or a MixPolicy object (NoisyFeatureMixup(...), "
            f"MixStyle(...), PatchUpSoft(...)), got {policy!r}"
        )
    elif (policy == "patchup-soft" or isinstance(policy, PatchUpSoft)) and args.get(
        "lam_mode"
    ) == "sample":
        problems.append("policy='patchup-soft' needs lam_mode='batch' (one box per batch)")
    mask_key = args.get("attention_mask_key")
    if mask_key is not None and not isinstance(mask_key, str):
        problems.append(f"attention_mask_key must be a str or None, got {mask_key!r}")
    return problems


def layer_weight_array(weights: Sequence[float] | None, eligible: list[str]) -> Any:
    if weights is None:
        return None
    if len(weights) != len(eligible):
        raise MisconfigurationException(
            f"layer_weights has {len(weights)} entries but the eligible set has "
            f"{len(eligible)}: {eligible}. Give one weight per layer, in this order."
        )
    array = np.asarray(weights, dtype=np.float64)
    return array / array.sum()
