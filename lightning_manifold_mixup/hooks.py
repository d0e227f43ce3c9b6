"""``HookSet``: the forward hooks on the eligible layers and the window in which they mix.

A layer's output is mixed only inside ``training_step`` (the window opens at the batch start
and closes when ``training_step`` returns) and during backward (activation checkpointing
recomputes forwards there; those runs get the same mix and are not counted). Forwards by
other callbacks, by ``on_before_optimizer_step`` or by validation see the unmixed model.

In the first training step of a fit every eligible layer is checked: it must run and its
output must hold something to mix. Layers that run more than once in a step are reported.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_manifold_mixup._lightning import pl, rank_zero_warn
from lightning_manifold_mixup.layout import describe, map_batch

Mixer = Callable[[str, nn.Module, Any], Any]


class HookSet:
    """Forward hooks on the eligible layers, the mixing window, run counts and checks."""

    def __init__(self) -> None:
        self.handles: list[RemovableHandle] = []
        self.in_step = False
        self.in_backward = False
        self._chosen: Callable[[], str | None] = _nothing
        self.calls = 0  # runs of the chosen layer in this step (not counting recomputation)
        self.probe: dict[str, int] | None = None  # runs per layer in the first step
        self._warned: set[str] = set()
        self._unwrap: Callable[[], None] | None = None

    def install(
        self,
        pl_module: pl.LightningModule,
        layers: dict[str, nn.Module],
        mix: Mixer,
        check: Mixer,
        chosen: Callable[[], str | None],
    ) -> None:
        """Hook ``layers``; ``chosen()`` names the layer the batch in flight is mixed at,
        ``mix(name, module, output)`` mixes its output and ``check`` inspects every layer's
        output in the first training step."""
        self.remove()
        self._chosen = chosen
        self.probe = dict.fromkeys(layers, 0)
        self._warned = set()
        for name, module in layers.items():
            self.handles.append(module.register_forward_hook(self._hook(name, mix, check)))
        self._wrap_training_step(pl_module)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        if self._unwrap is not None:
            self._unwrap()
            self._unwrap = None
        self.disarm()

    def arm(self) -> None:
        """Open the window for a new batch."""
        self.calls = 0
        self.in_step, self.in_backward = True, False

    def disarm(self) -> None:
        self.in_step = self.in_backward = False

    def _hook(self, name: str, mix: Mixer, check: Mixer) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if not (self.in_step or self.in_backward):
                return None  # a forward outside the training step (another hook, a probe)
            if self.probe is not None and not self.in_backward:
                self.probe[name] += 1
                if self.probe[name] == 1:
                    check(name, module, output)
            if self._chosen() != name:
                return None
            if not self.in_backward:
                self.calls += 1
                if self.calls == 2:
                    self.warn_repeated({name: 2})
            return mix(name, module, output)

        return hook

    def finish_probe(self) -> None:
        """After the first training step's forwards: every eligible layer ran."""
        probe, self.probe = self.probe, None
        if probe is None:
            return
        silent = [name for name, runs in probe.items() if runs == 0]
        if silent:
            raise RuntimeError(
                f"ManifoldMixupCallback: layers {silent} did not run during the first training "
                "step: mixing there would mix the targets and not the features. Remove them "
                "from layers, or make sure training_step calls them."
            )
        self.warn_repeated({name: runs for name, runs in probe.items() if runs > 1})

    def check_chosen_ran(self, layer: str | None) -> None:
        """``layer`` (hooked and chosen for the batch in flight) ran in this step."""
        if layer is not None and self.calls == 0:
            raise RuntimeError(
                f"ManifoldMixupCallback: layer {layer!r} was chosen but did not run "
                "during this training step, so the targets were mixed and the features were "
                "not. Remove it from layers, or make sure training_step calls it."
            )

    def warn_repeated(self, runs: dict[str, int]) -> None:
        """Warn once per layer that runs more than once in a training step."""
        fresh = {name: n for name, n in runs.items() if name not in self._warned}
        if not fresh:
            return
        self._warned.update(fresh)
        rank_zero_warn(
            f"ManifoldMixupCallback: layers run more than once per training step {fresh} "
            "(weight sharing, recurrence, or several forwards in one step). When one of them "
            "is chosen, every run gets the same mix; leave them out of layers if that is "
            "not intended."
        )

    def _wrap_training_step(self, pl_module: pl.LightningModule) -> None:
        """Close the window when ``training_step`` returns."""
        original = pl_module.training_step

        @functools.wraps(original)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            try:
                return original(*args, **kwargs)
            finally:
                self.in_step = False

        pl_module.__dict__["training_step"] = training_step

        def unwrap() -> None:
            if pl_module.__dict__.get("training_step") is training_step:
                del pl_module.__dict__["training_step"]

        self._unwrap = unwrap


def _nothing() -> None:
    return None


def check_output(name: str, module: nn.Module, output: Any, rows: int) -> None:
    """First training step: a layer's output holds something to mix, in the layout its module
    declares (``map_batch`` refuses integer batch tensors and ambiguous axes)."""
    if map_batch(output, _same, rows, where=f"layer {name!r}", module=module)[1] == 0:
        raise ValueError(no_float_output(name, output, rows))


def no_float_output(name: str, output: Any, rows: int) -> str:
    return (
        f"ManifoldMixupCallback: layer {name!r} returned {describe(output)}, which holds no "
        f"floating tensor with batch dimension {rows} to mix. Choose layers whose output is a "
        "(B, ...) float tensor (or a tuple/dict holding one)."
    )


def _same(t: Tensor) -> Tensor:
    return t
