"""Owns Hugging Face ``transformers`` models and their batches (no ``transformers`` import).

Three things go wrong when a Hugging Face model meets mixed targets or token batches, and this
module holds the checks and the fix the callback applies:

- **The model's own loss.** A ``*ForSequenceClassification`` model called with ``labels=``
  computes its loss from them. Mixed labels are float soft targets (or a
  :class:`~lightning_manifold_mixup.mixing.MixedTarget`), so the model infers
  ``config.problem_type = "multi_label_classification"`` for good and trains with BCE on
  logits, or fails. :func:`guard_hf_labels` refuses that call before any optimizer step.
- **Padding.** Hidden states of two rows are mixed position by position, but each row keeps
  its own attention mask in every later layer, so the partner's tokens beyond the row's own
  length would be dropped. :func:`union_attention_mask` gives mixed rows the union of both
  masks.
- **Token ids as input.** Integer ``input_ids`` cannot be mixed; :func:`check_input_mixable`
  refuses ``"input"`` in the eligible set at the first batch instead of when it is drawn.

Models are recognised by duck typing: a module with a ``config`` that has a ``problem_type``
attribute (every ``transformers.PreTrainedModel``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any

from torch import Tensor, nn

from lightning_manifold_mixup._lightning import rank_zero_warn
from lightning_manifold_mixup.layers import is_hf_model
from lightning_manifold_mixup.layout import describe, tensors
from lightning_manifold_mixup.targets import MixedTarget

# The training batch in flight (the callback's InFlight: ``original``, the batch's own target;
# ``target``, the mixed one that replaced it; ``decision``; ``mask_length``), or None.
InFlight = Callable[[], Any]
# Registers a forward hook (a pre-hook with kwargs when pre=True) for the fit: HookSet.add.
AddHook = Callable[..., None]


def _config(module: nn.Module) -> Any:
    return module.config


def _is_class_labels(target: Any) -> bool:
    return isinstance(target, Tensor) and not target.is_floating_point()


def _fix_message(
    name: str, module: nn.Module, target_key: int | str, found: str, maps: bool = False
) -> str:
    """The refusal's text; ``maps``: the targets are class maps (token labels), whose models
    compute a cross-entropy that a MixedTarget pair cannot enter (no problem_type switch)."""
    kind = type(module).__name__
    where = "(the LightningModule itself)" if name == "" else f"at {name!r}"
    key = repr(target_key)
    fails = (
        "its own cross-entropy from them, which cannot take a MixedTarget pair of label maps "
        "and their weight: it fails, or trains on one side of each pair only."
        if maps
        else "its own loss, and on mixed targets (float soft targets or a MixedTarget) it "
        "switches config.problem_type to 'multi_label_classification' for good and trains "
        "with BCE on logits, or fails."
    )
    return (
        f"ManifoldMixupCallback: {kind} {where} was called with the training targets "
        f"(batch[{key}], {found}) as an argument. A Hugging Face model given labels computes "
        f"{fails} Call the model without labels and compute the mixup loss:\n"
        f"    inputs = {{k: v for k, v in batch.items() if k != {key}}}\n"
        "    out = self.model(**inputs)\n"
        f"    loss = self.mixup_loss(out.logits, batch[{key}])\n"
        "(mixup_loss from ManifoldMixupMixin, or lightning_manifold_mixup.mixup_loss)."
    )


def guard_hf_labels(
    model: nn.Module, add: AddHook, in_flight: InFlight, target_key: int | str
) -> None:
    """Hooks that stop a Hugging Face model from computing its loss on the training targets.

    On every submodule that :func:`is_hf_model`, a forward pre-hook raises ``RuntimeError``
    (with the fix in its message) when one of the call's arguments is the batch's class labels
    or their mixed replacement, or any :class:`MixedTarget`; it raises before the forward
    runs, so the model's config is never touched. Float targets (multi-label, regression) are
    left alone: the model's loss for them is the same on mixed and unmixed batches. As a
    backstop for copies of the targets (``labels.clone()``), a forward hook restores
    ``config.problem_type`` and raises if the forward changed it while integer class labels
    were being mixed.

    Args:
        model: searched with ``named_modules()`` (a LightningModule).
        add: registers a hook, ``add(module, fn, pre=...)`` (:meth:`HookSet.add`).
        in_flight: returns the training batch in flight (its ``original`` and mixed
            ``target``), None outside training batches (validation is never checked).
        target_key: where the targets sit in the batch, for the message.
    """
    for name, module in model.named_modules():
        if is_hf_model(module):
            _guard_one(name, module, add, in_flight, target_key)


def _guard_one(
    name: str, module: nn.Module, add: AddHook, in_flight: InFlight, target_key: int | str
) -> None:
    before: list[Any] = []

    def pre_hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        flight = in_flight()
        before[:] = [_config(mod).problem_type]
        if flight is None:
            return
        original, mixed = flight.original, flight.target
        labels = _is_class_labels(original)
        maps = labels and original.ndim >= 2
        for value in (*args, *kwargs.values()):
            if isinstance(value, MixedTarget):
                raise RuntimeError(_fix_message(name, mod, target_key, "a MixedTarget", maps))
            if labels and value is not None and (value is original or value is mixed):
                found = "the class labels" if value is original else "the mixed soft targets"
                raise RuntimeError(_fix_message(name, mod, target_key, found, maps))

    def post_hook(mod: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        flight = in_flight()
        if not before or flight is None or not _is_class_labels(flight.original):
            return
        old, new = before[0], _config(mod).problem_type
        if new != old and new != "single_label_classification":
            _config(mod).problem_type = old
            raise RuntimeError(
                _fix_message(name, mod, target_key, "a copy of the mixed targets")
                + f"\nThe forward set config.problem_type to {new!r}; it was restored to {old!r}."
            )

    add(module, pre_hook, pre=True)
    add(module, post_hook)


def union_attention_mask(mask: Tensor, partner: Tensor) -> Tensor:
    """The attention mask of mixed rows: a position is kept where either row has a token.

    Mixing hidden states position by position puts the partner's tokens at positions where
    the row itself may be padding. With the row's own mask, later layers never attend to those
    positions and the partner's tokens beyond the row's length are lost, while the targets
    still credit the partner with ``1 - lam``; with the union both rows' tokens stay visible.

    Args:
        mask: ``(B, L)`` attention mask (1/True = token, 0/False = padding), any dtype.
        partner: the partner rows' masks, ``mask[index]``, same shape.

    Returns:
        ``(B, L)`` mask of ``mask``'s dtype and device.

    Example:
        >>> import torch
        >>> mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
        >>> union_attention_mask(mask, mask[torch.tensor([1, 0])])
        tensor([[1, 1, 1, 0],
                [1, 1, 1, 0]])
    """
    return (mask.bool() | partner.to(mask.device).bool()).to(mask.dtype)


def union_batch_masks(
    batch: Any, x: Any, key: str, partner: Callable[[Tensor], Tensor]
) -> int | None:
    """Replace the attention mask of a mixed batch by :func:`union_attention_mask`, in place.

    The mask is looked up at ``batch[key]`` (a tokenizer's dict batch), else at ``x[key]``
    (the input, for ``(encoding, labels)`` batches). A batch without it is left alone.

    Args:
        batch: the training batch.
        x: the batch's input (``batch[input_key]``).
        key: the mask's key, e.g. ``"attention_mask"``.
        partner: the partner rows of a ``(B, ...)`` tensor (the pairing's, for this batch).

    Returns:
        The mask's length ``L`` when one was found and replaced, else None.
    """
    for holder in (batch, x):
        mask = holder.get(key) if isinstance(holder, MutableMapping) else None
        if isinstance(mask, Tensor):
            holder[key] = union_attention_mask(mask, partner(mask))
            return int(mask.shape[-1])
    return None


class MaskUnion:
    """Union attention masks for mixed batches, and a warning where they cannot help.

    The model reads the mask before the mixed layer runs, so the union is applied to the
    whole batch. It is only worth it when the mixed layer's output has a token dimension of
    the mask's length (embeddings, encoder blocks); for a pooled ``(B, H)`` output it only
    makes rows attend to their own padding, and a warning (once per layer) says so.

    Args:
        key: the mask's key (``attention_mask_key``); None disables the union.
    """

    def __init__(self, key: str | None) -> None:
        self.key = key
        self._warned: set[str] = set()

    def apply(self, batch: Any, x: Any, partner: Callable[[Tensor], Tensor]) -> int | None:
        """Union the masks of a mixed batch (see :func:`union_batch_masks`); the mask's
        length, or None when there is none (or the union is off)."""
        if self.key is None:
            return None
        return union_batch_masks(batch, x, self.key, partner)

    def watch(
        self,
        add: AddHook,
        modules: Mapping[str, nn.Module],
        names: Sequence[str],
        in_flight: InFlight,
    ) -> None:
        """Forward hooks on the layers ``names`` that check the mixed output's token dimension.

        ``in_flight`` returns the batch in flight (its ``decision`` and the ``mask_length`` of
        the mask replaced by the union), so batches without such a mix are never checked.
        Registered only when the union is on and ``modules`` hold a Hugging Face model
        (:func:`is_hf_model`), so other models carry no extra hook.
        """
        if self.key is None or not any(is_hf_model(m) for m in modules.values()):
            return

        def checker(name: str) -> Callable[[nn.Module, Any, Any], None]:
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                flight = in_flight()
                if flight is None or flight.mask_length is None or name in self._warned:
                    return
                if flight.decision is not None and flight.decision.layer == name:
                    self._check(name, output, flight.mask_length)

            return hook

        for name in names:
            if name in modules:
                add(modules[name], checker(name))

    def _check(self, name: str, output: Any, length: int) -> None:
        first = next(iter(tensors(output)), None)
        if first is None or (first.ndim >= 3 and first.shape[1] == length):
            return
        self._warned.add(name)
        rank_zero_warn(
            f"ManifoldMixupCallback: layer {name!r} returned {describe(first)}, with no token "
            f"dimension of the attention mask's length {length}, but the mask at {self.key!r} "
            "was replaced by the union of each mixed pair's masks, which only helps where "
            "per-token states are mixed: here rows attend to their own padding for nothing. "
            "Set attention_mask_key=None to mix pooled representations, or mix per-token "
            "layers (embeddings, encoder blocks)."
        )


def check_input_mixable(x: Any, rows: int, input_key: int | str) -> None:
    """Refuse input mixup of a batch input with no floating tensor (token ids), at once.

    Raises:
        ValueError: naming the input and the way out (mix a hidden layer, e.g. the
            embeddings' output, instead of ``"input"``).

    Example:
        >>> import torch
        >>> check_input_mixable(torch.randn(2, 3), 2, 0)
        >>> check_input_mixable(torch.tensor([[5, 7]]), 1, "input_ids")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: input mixup needs a floating-point input: ...
    """
    if not any(t.is_floating_point() and t.ndim and t.shape[0] == rows for t in tensors(x)):
        raise ValueError(
            "input mixup needs a floating-point input: layers lists 'input', but the batch "
            f"input at input_key={input_key!r} holds no floating-point tensor "
            f"({describe(x)}), e.g. token ids, which cannot be mixed. "
            "Remove 'input' from layers and mix a hidden layer instead (for a Hugging Face "
            "model, the embeddings' output such as 'model.bert.embeddings', or an encoder "
            "block)."
        )
