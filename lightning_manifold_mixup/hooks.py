"""Owns the forward hooks of a fit: registering them so copies are never mixed, closing the
mixing window, and the first step's check of every layer.

A layer's output is mixed only inside ``training_step`` (the window opens at the batch start
and closes when the strategy's ``training_step`` returns) and during backward (activation
checkpointing recomputes forwards there; those runs get the same mix and are not counted).
Forwards by other callbacks, by ``on_before_optimizer_step`` or by validation see the unmixed
model. The window's state belongs to the batch in flight (its ``in_step`` and
``in_backward``); this module closes it.

What a hooked module holds is plain data: a :class:`Hook` with a token and a key. The work
lives in the ``HookSet`` of the running fit, found through the token, and it is done only for
the module object the hook was registered on. So a module pickles, ``torch.save``-s and
deep-copies at any point of a fit, and a copy (an EMA or mean teacher, a snapshot) or an
unpickled module is never mixed or counted: its hooks find no live set, or a different module.

In the first training step of a fit every eligible layer is checked: it must run and its
output must hold something to mix. Layers that run more than once in a step are reported.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_manifold_mixup._lightning import pl, rank_zero_warn
from lightning_manifold_mixup.layout import describe, map_batch

OnOutput = Callable[[str, nn.Module, Any, Any], Any]  # (layer name, module, args, output)

_LIVE: dict[int, HookSet] = {}  # token -> the hook set of a fit in progress
_TOKENS = itertools.count(1)


class Hook:
    """A forward (pre-)hook as stored on a module: a token and a key, nothing else.

    It calls the function its live :class:`HookSet` registered under ``key``, and only when the
    module it runs on is the module object that function was registered for. Copies and
    unpickled modules carry the same token and key, find no live set or another module, and
    return None (their forward is untouched).
    """

    __slots__ = ("key", "token")

    def __init__(self, token: int, key: int) -> None:
        self.token = token
        self.key = key

    def __call__(self, module: nn.Module, *args: Any) -> Any:
        hooks = _LIVE.get(self.token)
        if hooks is None:
            return None
        owner, fn = hooks.entries[self.key]
        if owner is not module:
            return None
        return fn(module, *args)


class _StepWindow:
    """The strategy's ``training_step`` while a fit runs: it closes the mixing window when the
    step returns (stored on the strategy, which user code does not copy or pickle)."""

    __slots__ = ("original", "token")

    def __init__(self, token: int, original: Callable[..., Any]) -> None:
        self.token = token
        self.original = original

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.original(*args, **kwargs)
        finally:
            hooks = _LIVE.get(self.token)
            if hooks is not None and hooks.flight is not None:
                hooks.flight.in_step = False


class HookSet:
    """Forward hooks on the eligible layers, the closing of the mixing window, run counts and
    the first step's checks."""

    def __init__(self) -> None:
        self.handles: list[RemovableHandle] = []
        self.entries: dict[int, tuple[nn.Module, Callable[..., Any]]] = {}
        self.token = 0
        self.flight: Any = None  # the batch in flight, whose window _StepWindow closes
        self.calls = 0  # runs of the chosen layer in this step (not counting recomputation)
        self.probe: dict[str, int] | None = None  # runs per layer in the first step
        self._warned: set[str] = set()
        self._strategy: Any = None
        self._own_step: Any = None  # a training_step in the strategy's __dict__ before ours

    def install(
        self, trainer: pl.Trainer, layers: dict[str, nn.Module], on_output: OnOutput
    ) -> None:
        """Hook ``layers``: ``on_output(name, module, args, output)`` runs after each forward
        of each of them (the callback's; it returns the mixed output or None)."""
        self.remove()
        self.token = next(_TOKENS)
        _LIVE[self.token] = self
        self.probe = dict.fromkeys(layers, 0)
        self._warned = set()
        for name, module in layers.items():
            self.add(module, functools.partial(on_output, name))
        self._wrap_training_step(trainer.strategy)

    def add(self, module: nn.Module, fn: Callable[..., Any], *, pre: bool = False) -> None:
        """Run ``fn`` as a forward hook of ``module`` (a forward pre-hook with kwargs when
        ``pre``) until :meth:`remove`; only ``module`` itself, not a copy, runs it."""
        key = len(self.entries)
        self.entries[key] = (module, fn)
        hook = Hook(self.token, key)
        if pre:
            self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        else:
            self.handles.append(module.register_forward_hook(hook))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.entries = {}
        _LIVE.pop(self.token, None)
        strategy, self._strategy = self._strategy, None
        window = None if strategy is None else strategy.__dict__.get("training_step")
        if isinstance(window, _StepWindow) and window.token == self.token:
            if self._own_step is None:
                del strategy.__dict__["training_step"]
            else:  # the strategy's own instance attribute, put back
                strategy.__dict__["training_step"] = self._own_step
        self.disarm()

    def arm(self, flight: Any) -> None:
        """A new batch in flight (its window open)."""
        self.calls = 0
        self.flight = flight

    def disarm(self) -> None:
        self.flight = None

    def count(self, name: str, module: nn.Module, output: Any, rows: int) -> None:
        """First training step: count a layer's run; at its first, its output must hold
        something to mix, in the layout its module declares (``map_batch`` refuses integer
        batch tensors and ambiguous axes)."""
        assert self.probe is not None
        self.probe[name] += 1
        if self.probe[name] == 1:
            where = f"layer {name!r}"
            if map_batch(output, _same, rows, where=where, module=module)[1] == 0:
                raise ValueError(no_float_output(name, output, rows))

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

    def check_chosen_ran(self, flight: Any) -> None:
        """The layer chosen for the batch in flight (``flight.decision.layer``) ran in this
        step; if not, the batch's decision is dropped and the error raised."""
        decision = None if flight is None else flight.decision
        layer = None if decision is None else decision.layer
        if layer not in (None, "input") and self.calls == 0:
            flight.decision = None
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

    def _wrap_training_step(self, strategy: Any) -> None:
        """Close the window when the strategy's ``training_step`` (which Lightning calls for
        every training step, around the module's) returns."""
        self._own_step = strategy.__dict__.get("training_step")
        strategy.__dict__["training_step"] = _StepWindow(self.token, strategy.training_step)
        self._strategy = strategy


def no_float_output(name: str, output: Any, rows: int) -> str:
    return (
        f"ManifoldMixupCallback: layer {name!r} returned {describe(output)}, which holds no "
        f"floating tensor with batch dimension {rows} to mix. Choose layers whose output is a "
        "(B, ...) float tensor (or a tuple/dict holding one)."
    )


def _same(t: Tensor) -> Tensor:
    return t
