"""Owns finding the layers to mix: name matching through wrappers and automatic selection.

Strategies and tools insert segments into module names (DDP's ``module``, FSDP's
``_fsdp_wrapped_module``, activation checkpointing's ``_checkpoint_wrapped_module``,
``torch.compile``'s ``_orig_mod``). Names here are always compared with those segments
removed, so one configuration works under every strategy.

Example:
    >>> normalize_name("net._orig_mod.layer1._checkpoint_wrapped_module")
    'net.layer1'
"""

from __future__ import annotations

import difflib
import re
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

from torch import fx, nn

INPUT = "input"
WRAPPER_SEGMENTS = frozenset(
    {"module", "_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"}
)

# Leaf modules whose output is a natural mixing point in a plain stack of layers.
_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardtanh,
    nn.Softplus,
)


def normalize_name(name: str) -> str:
    """Drop wrapper segments (see module docstring) from a dotted module name."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_SEGMENTS)


def named_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Map each normalized submodule name to its outermost module (the root is excluded).

    A wrapper and the module it wraps share a normalized name; the wrapper comes first in
    ``named_modules()`` and is kept, so a hook on it sees the wrapped module's output once.
    """
    out: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        key = normalize_name(name)
        if key and key not in out:
            out[key] = module
    return out


def glob_to_regex(pattern: str) -> re.Pattern[str]:
    """Compile a dotted-name glob: ``*`` and ``?`` stay within one segment, ``**`` spans dots.

    Example:
        >>> bool(glob_to_regex("net.layer*").fullmatch("net.layer1.0"))
        False
        >>> bool(glob_to_regex("net.**.conv1").fullmatch("net.layer1.0.conv1"))
        True
    """
    out, i = [], 0
    while i < len(pattern):
        ch = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if ch == "*":
            out.append("[^.]*")
        elif ch == "?":
            out.append("[^.]")
        elif ch == "[":
            end = pattern.find("]", i + 1)
            if end == -1:
                out.append(re.escape(ch))
            else:
                body = pattern[i + 1 : end]
                out.append("[^" + body[1:] + "]" if body.startswith("!") else "[" + body + "]")
                i = end
        else:
            out.append(re.escape(ch))
        i += 1
    return re.compile("".join(out))


def unwrap_module(module: nn.Module) -> nn.Module:
    """The module inside any wrappers (compile, checkpointing, FSDP, DDP), or ``module``."""
    while True:
        inner = next(
            (
                getattr(module, s)
                for s in WRAPPER_SEGMENTS
                if isinstance(getattr(module, s, None), nn.Module)
            ),
            None,
        )
        if inner is None:
            return module
        module = inner


def _children(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, child in unwrap_module(module).named_children():
        yield name, unwrap_module(child)


def _is_stage(module: nn.Module) -> bool:
    """A Sequential whose every element is itself a composite block (e.g. a ResNet stage)."""
    return (
        isinstance(module, nn.Sequential)
        and len(module) > 0
        and all(any(True for _ in _children(block)) for block in module)
    )


def _has_own_forward(module: nn.Module) -> bool:
    """False for plain containers: a Sequential that only chains its elements, a ModuleList."""
    forward = type(module).forward
    return forward is not nn.Sequential.forward and forward is not nn.Module.forward


class _OneLevelTracer(fx.Tracer):
    """Traces only ``root.forward``: every submodule call stays one opaque node."""

    def __init__(self, root: nn.Module) -> None:
        super().__init__()
        self._root = root

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return m is not self._root


def _on_every_path(module: nn.Module) -> set[str] | None:
    """Submodule calls in ``module.forward`` that all of its input's data passes through.

    Traces the forward one level deep with ``torch.fx`` and keeps the submodules (relative
    dotted names) called once and whose removal disconnects the first input from the output: a
    child bypassed by a skip connection or a parallel branch, or called several times, is left
    out. ``None`` when the forward cannot be
    traced (data-dependent control flow, no forward).
    """
    # The forward runs once on symbolic values: attributes it assigns (a cached activation)
    # would keep those values, so the module's own attributes are put back afterwards.
    saved = dict(vars(module))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            graph = _OneLevelTracer(module).trace(module)
        except Exception:
            return None
        finally:
            vars(module).clear()
            vars(module).update(saved)
    nodes = list(graph.nodes)
    source = next((n for n in nodes if n.op == "placeholder"), None)
    sink = next((n for n in nodes if n.op == "output"), None)
    if source is None or sink is None:
        return None

    def reaches_output(removed: str) -> bool:
        stack, seen = [source], {source}
        while stack:
            node = stack.pop()
            if node is sink:
                return True
            for user in node.users:
                if user not in seen and not (user.op == "call_module" and user.target == removed):
                    seen.add(user)
                    stack.append(user)
        return False

    calls = Counter(str(n.target) for n in nodes if n.op == "call_module")
    # A module called twice (a shared activation) would be mixed at each call: never a cut.
    return {t for t, count in calls.items() if count == 1 and not reaches_output(t)}


def _collect(
    module: nn.Module, prefix: str, in_stack: bool, out: list[str], path: set[str] | None
) -> None:
    """Append candidates under ``module``; ``path`` holds its submodules on every data path."""
    if path is None and _has_own_forward(module):
        path = _on_every_path(module)
    kids = [
        (name, child)
        for name, child in _children(module)
        if path is None
        or name in path
        # A container's elements called one by one (a loop over a ModuleList).
        or (not _has_own_forward(child) and any(t.startswith(name + ".") for t in path))
    ]
    stages = [name for name, child in kids if _is_stage(child)]
    for name, child in kids:
        full = f"{prefix}.{name}" if prefix else name
        if len(stages) >= 2:
            # A backbone with several stages: its stage outputs are the boundaries.
            if name in stages:
                out.append(full)
            continue
        sub = (
            None
            if path is None or name in path
            else {t[len(name) + 1 :] for t in path if t.startswith(name + ".")}
        )
        if isinstance(child, _ACTIVATIONS):
            out.append(full)
        elif not any(True for _ in child.children()):
            continue
        elif not _has_own_forward(child):
            _collect(child, full, True, out, sub)
        elif in_stack and sum(_is_stage(c) for _, c in _children(child)) < 2:
            out.append(full)  # a block in a stack of blocks: its insides are never searched
        else:
            _collect(child, full, False, out, None)


def candidate_layers(model: nn.Module) -> list[str]:
    """Layers that ``layers=None`` selects: outputs of blocks and stages, never their insides.

    Only submodules that every path from a module's input to its output runs through are
    considered: a child that a skip connection or a parallel branch bypasses (and everything
    inside it) is never selected, since mixing there would leave the bypass unmixed. That is
    read from each module's ``forward``, traced one level deep with ``torch.fx``; a forward
    that cannot be traced (data-dependent control flow) is taken as running every child.
    Among those submodules, from the root down:

    1. A module with two or more *stages* (Sequentials whose elements are all composite
       blocks, like ``layer1..layer4`` of a ResNet) contributes its stages and nothing else.
    2. A plain Sequential (one that only chains its elements) or ModuleList is searched; each
       composite element with its own ``forward`` is a *block* (a transformer encoder layer, a
       residual block): it is selected and its insides never are. An element holding two or
       more stages (a whole backbone in a Sequential) is searched instead.
    3. Activation modules (ReLU, GELU, ...) met on the way are selected: the hidden layers of
       an MLP.
    4. Other composite modules are searched; other leaves (Linear, Conv, norms, dropout) are
       never selected.
    5. Blocks of a Hugging Face model that run several times per forward (ALBERT's shared
       layers) are dropped (see :func:`reused_blocks`).
    6. Inside a Hugging Face model only per-token layers are kept: its blocks, or its
       embeddings' output when no block is left (see :func:`per_token_choice`); never the
       pooled output, where the attention-mask union would only cost.

    The result holds normalized names and never the input; add ``"input"`` yourself.

    Example:
        >>> mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
        ...                     nn.Linear(8, 2))
        >>> candidate_layers(mlp)
        ['1', '3']
    """
    out: list[str] = []
    root = unwrap_module(model)
    _collect(root, "", isinstance(root, (nn.Sequential, nn.ModuleList)), out, None)
    seen: dict[str, None] = {}
    for name in out:
        seen.setdefault(normalize_name(name), None)
    shared = reused_blocks(model, list(seen))
    return per_token_choice(model, [name for name in seen if name not in shared])


def _listing(names: Sequence[str], limit: int = 40) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _unknown_name_error(name: str, available: Sequence[str]) -> ValueError:
    close = difflib.get_close_matches(name, available, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else "."
    shown = _listing(available)
    return ValueError(
        f"unknown layer {name!r}{hint} Available: 'input', {shown}. "
        "Use names as model.named_modules() spells them (wrapper segments such as "
        "'_orig_mod' or '_fsdp_wrapped_module' removed), or glob patterns like 'net.layer*'."
    )


def resolve_layers(model: nn.Module, layers: Sequence[str] | None) -> list[str]:
    """Expand names and glob patterns into the eligible set, in the order given.

    Args:
        model: the module whose submodules are matched (a LightningModule).
        layers: names, glob patterns and/or ``"input"``; ``None`` selects automatically
            with :func:`candidate_layers`.

    Raises:
        ValueError: for an unknown name (with close matches), a pattern that matches nothing,
            or an empty result.
    """
    available = list(named_layers(model))
    if layers is None:
        chosen = candidate_layers(model)
        if not chosen:
            raise ValueError(
                f"could not select layers automatically for {type(model).__name__}: no "
                "stage, block or activation module was found. Pass layers=[...] with names "
                f"from: {', '.join(available[:40])}"
            )
        return chosen
    if isinstance(layers, str):
        raise TypeError(
            f"layers must be a list of names, not the string {layers!r}; write [{layers!r}]"
        )
    if len(layers) == 0:
        raise ValueError(
            "layers is empty: give at least one layer name (e.g. ['input', 'net.layer1']) or "
            "layers=None to select automatically"
        )
    out: list[str] = []
    for pattern in layers:
        if pattern == INPUT:
            matches = [INPUT]
        elif any(ch in pattern for ch in "*?["):
            regex = glob_to_regex(normalize_name(pattern))
            matches = [n for n in available if regex.fullmatch(n)]
            if not matches:
                raise ValueError(
                    f"layer pattern {pattern!r} matches no submodule ('*' stays within one "
                    f"dotted segment, '**' spans several). Available: {_listing(available)}"
                )
        else:
            norm = normalize_name(pattern)
            if norm not in available:
                raise _unknown_name_error(pattern, available)
            matches = [norm]
        out.extend(m for m in matches if m not in out)
    return out


def is_hf_model(module: nn.Module) -> bool:
    """Whether ``module`` looks like a ``transformers.PreTrainedModel``: ``config.problem_type``.

    Example:
        >>> from types import SimpleNamespace
        >>> m = nn.Linear(2, 2)
        >>> is_hf_model(m)
        False
        >>> m.config = SimpleNamespace(problem_type=None)
        >>> is_hf_model(m)
        True
    """
    config = getattr(module, "config", None)
    return config is not None and hasattr(config, "problem_type")


def _hf_roots(model: nn.Module, modules: dict[str, nn.Module]) -> list[str]:
    """Normalized names of the outermost Hugging Face models in ``model`` (``""``: itself)."""
    if is_hf_model(model):
        return [""]
    found = [name for name, module in modules.items() if is_hf_model(module)]
    return [n for n in found if not any(n.startswith(other + ".") for other in found)]


def per_token_choice(model: nn.Module, candidates: Sequence[str]) -> list[str]:
    """``candidates`` with a Hugging Face model's pooled layers replaced by per-token ones.

    Inside each Hugging Face model only the blocks are kept (candidates in a ``ModuleList``
    or ``Sequential``: encoder layers, decoder layers, vision stages); the pooler's
    activation (BERT's ``pooler.activation``, ALBERT's ``pooler_activation``) is dropped. A
    model left with no block (ALBERT, whose shared blocks :func:`reused_blocks` drops) gets
    its embeddings' output instead (``<model>.embeddings``), when it has one. Candidates
    outside Hugging Face models are kept as they are.
    """
    modules = named_layers(model)
    out = list(candidates)
    for root in _hf_roots(model, modules):
        prefix = f"{root}." if root else ""
        inside = [name for name in out if name.startswith(prefix)]
        blocks = [name for name in inside if _in_stack(name, modules, model)]
        if blocks:
            out = [name for name in out if name not in inside or name in blocks]
            continue
        last = (n for n in modules if n.startswith(prefix) and n.rpartition(".")[2] == "embeddings")
        embeddings = next(last, None)
        if embeddings is not None:
            out = [name for name in out if name not in inside] + [embeddings]
    return out


def reused_blocks(model: nn.Module, candidates: Sequence[str]) -> set[str]:
    """The ``candidates`` (normalized names) to drop: blocks of a Hugging Face model that run
    several times per forward, each run mixed again (not the paper's one mix at one depth).

    ALBERT-style models share blocks across depth. Blocks are the candidates that sit in a
    ``ModuleList`` or ``Sequential``; a model is flagged when it holds fewer distinct blocks
    than the block calls its config declares (``num_hidden_layers``, times
    ``inner_group_num`` where the config has it). Encoder-decoder models hold more blocks than
    ``num_hidden_layers`` (both stacks), so they are never flagged.
    """
    modules = named_layers(model)
    flagged: set[str] = set()
    for root in _hf_roots(model, modules):
        root_module = model if root == "" else modules[root]
        prefix = f"{root}." if root else ""
        blocks = [
            name
            for name in candidates
            if name.startswith(prefix) and _in_stack(name, modules, model)
        ]
        if 0 < len({id(modules[n]) for n in blocks}) < _block_runs(root_module.config):
            flagged.update(blocks)
    return flagged


def _block_runs(config: Any) -> int:
    """Block calls per forward that a config declares: ``num_hidden_layers``, times ALBERT's
    ``inner_group_num`` (the blocks each layer group runs in turn); 0 when unknown."""
    depth = getattr(config, "num_hidden_layers", None)
    inner = getattr(config, "inner_group_num", 1)
    if not isinstance(depth, int) or not isinstance(inner, int):
        return 0
    return depth * inner


def _in_stack(name: str, modules: dict[str, nn.Module], model: nn.Module) -> bool:
    parent_name = name.rpartition(".")[0]
    parent = modules.get(parent_name, model) if parent_name else model
    return isinstance(parent, (nn.ModuleList, nn.Sequential))
