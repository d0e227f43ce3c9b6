"""Owns the Lightning namespace in use: ``lightning.pytorch``, ``pytorch_lightning``, or both.

``pip install lightning`` installs both namespaces, as two copies of the same classes; code
written for Lightning 1.x imports ``pytorch_lightning`` alone. The callback's base class and the
configuration error belong to every installed namespace, and module checks accept either
namespace's ``LightningModule``, so either Trainer works.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import TYPE_CHECKING, Any


def _namespaces() -> list[ModuleType]:
    found = []
    for top, module in (("lightning", "lightning.pytorch"), ("pytorch_lightning", None)):
        if importlib.util.find_spec(top) is not None:
            found.append(importlib.import_module(module or top))
    if not found:
        raise ImportError(
            "lightning-manifold-mixup needs PyTorch Lightning: pip install lightning "
            "(or the legacy namespace: pip install pytorch-lightning)"
        )
    return found


NAMESPACES = _namespaces()
MODULE_BASES: tuple[Any, ...] = tuple(ns.LightningModule for ns in NAMESPACES)

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from lightning.pytorch import Callback as CallbackBase
    from lightning.pytorch.utilities.exceptions import MisconfigurationException
else:
    pl = NAMESPACES[0]
    _callbacks = tuple(ns.Callback for ns in NAMESPACES)
    # One base class that is a Callback of every installed namespace.
    CallbackBase = _callbacks[0] if len(_callbacks) == 1 else type("Callback", _callbacks, {})
    _errors = tuple(
        importlib.import_module(f"{ns.__name__}.utilities.exceptions").MisconfigurationException
        for ns in NAMESPACES
    )
    MisconfigurationException = (
        _errors[0] if len(_errors) == 1 else type("MisconfigurationException", _errors, {})
    )

_utilities = importlib.import_module(f"{NAMESPACES[0].__name__}.utilities")
rank_zero_info = _utilities.rank_zero_info
rank_zero_warn = _utilities.rank_zero_warn
is_param_in_hook_signature = importlib.import_module(
    f"{NAMESPACES[0].__name__}.utilities.signature_utils"
).is_param_in_hook_signature


def overrides(module: Any, name: str) -> bool:
    """Whether ``module``'s class defines hook ``name`` itself, below the LightningModule of
    whichever namespace it derives from (Lightning's own ``is_overridden`` accepts only its
    namespace's modules)."""
    for base in MODULE_BASES:
        if isinstance(module, base):
            return getattr(type(module), name, None) is not getattr(base, name, None)
    return False
