"""Run the frozen blocks below the first trained one once, and train on their outputs.

When only the last blocks of a model are adapted (LoRA on block 29 of 30, say), the embeddings and the blocks
below see fixed inputs and have no trainable weight, so every pass through them repeats the same computation.
:class:`FrozenPrefix` keeps their output (the hidden states entering the first trained block) and runs the model
from there: the model's own forward, with ``inputs_embeds`` set to the kept states and its block list cut to
the trained blocks and those above them. This is exact only where the model's forward passes ``inputs_embeds``
straight to its first block (Llama, Qwen, SmolLM, and Gemma in transformers 5, whose embedding module scales; not
GPT-2, which adds position embeddings to them), so :func:`frozen_prefix` checks, on the model, that the first kept
block receives the kept states unchanged and that both routes give the same logits, before it returns one.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["FrozenPrefix", "frozen_prefix", "last_position_logits"]

_BLOCK_LISTS = ("layers", "layer", "h", "blocks", "block")
"""Attribute names under which transformers models keep their blocks (the names roles.block_index reads)."""
AGREEMENT = 1e-4
"""Largest difference between the two routes' logits, relative to the largest logit, accepted as the same."""


class _Captured(Exception):
    """Raised by the pre-hook to stop a forward pass once the first trained block's input is known."""

    def __init__(self, states: torch.Tensor) -> None:
        super().__init__()
        self.states = states


@dataclass(frozen=True)
class FrozenPrefix:
    """The blocks ``blocks[:first]`` of a model, run once per input.

    ``owner`` holds the block list as its attribute ``attribute``; :meth:`states` returns what enters
    ``blocks[first]``, and inside :meth:`skipping` the model, given those states as ``inputs_embeds``, runs only
    ``blocks[first:]``, its final norm and its head.
    """

    owner: nn.Module
    attribute: str
    first: int

    @property
    def blocks(self) -> nn.ModuleList:
        blocks: nn.ModuleList = getattr(self.owner, self.attribute)
        return blocks

    def states(self, model: nn.Module, ids: torch.Tensor, batch: int = 512) -> torch.Tensor:
        """The hidden states entering ``blocks[first]`` for ``ids`` (shape ``(count, length, width)``)."""
        block = self.blocks[self.first]
        return torch.cat([_entering(block, model, input_ids=ids[i:i + batch]) for i in range(0, len(ids), batch)])

    @contextlib.contextmanager
    def skipping(self) -> Iterator[None]:
        """Within the block, the model's block list holds only ``blocks[first:]``."""
        full = self.blocks
        setattr(self.owner, self.attribute, nn.ModuleList(list(full)[self.first:]))
        try:
            yield
        finally:
            setattr(self.owner, self.attribute, full)


def frozen_prefix(model: nn.Module, first: int, probe: torch.Tensor) -> FrozenPrefix | None:
    """A :class:`FrozenPrefix` of ``model`` below block ``first``, or None where skipping is unsafe or useless.

    None when ``first`` is 0, the model has not exactly one block list (an encoder-decoder has two), its forward
    takes no ``inputs_embeds``, or, on the token ids ``probe``, the logits at the last position computed through
    the kept states differ from the full forward's by more than :data:`AGREEMENT` of the largest logit.
    """
    if first <= 0 or "inputs_embeds" not in _forward_parameters(model):
        return None
    lists = [(module, name) for module in model.modules() for name, child in module.named_children()
             if name in _BLOCK_LISTS and isinstance(child, nn.ModuleList) and len(child) > first]
    if len(lists) != 1:
        return None
    prefix = FrozenPrefix(lists[0][0], lists[0][1], first)
    with torch.no_grad():
        try:
            full = last_position_logits(model, input_ids=probe)
            states = prefix.states(model, probe)
            with prefix.skipping():
                entered = _entering(prefix.blocks[0], model, inputs_embeds=states)
                skipped = last_position_logits(model, inputs_embeds=states)
        except (RuntimeError, TypeError, ValueError, IndexError):  # a forward that cannot start at a block
            return None
    # the forward hands inputs_embeds to the first block unchanged (no position embedding added, no rescaling) ...
    if not torch.equal(entered, states):
        return None
    # ... and what follows gives the full forward's logits
    scale = float(full.abs().max()) or 1.0
    if full.shape != skipped.shape or float((full - skipped).abs().max()) > AGREEMENT * scale:
        return None
    return prefix


@torch.no_grad()
def _entering(block: nn.Module, model: nn.Module, **inputs: torch.Tensor) -> torch.Tensor:
    """The hidden states entering ``block`` when ``model`` runs on ``inputs``; the forward stops there."""

    def capture(module: nn.Module, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
        states = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(states, torch.Tensor):
            raise TypeError("the block's input is not a tensor")
        raise _Captured(states.detach())

    handle = block.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        model(**inputs, **_no_cache(_forward_parameters(model)))
    except _Captured as captured:
        return captured.states
    finally:
        handle.remove()
    raise RuntimeError("the model's forward never reached the block")


def last_position_logits(model: nn.Module, **inputs: torch.Tensor) -> torch.Tensor:
    """The ``(batch, vocab)`` logits at the last position of ``inputs`` (``input_ids`` or ``inputs_embeds``).

    The head runs at that position only where the forward takes ``logits_to_keep`` (transformers causal LMs): the
    head of a large vocabulary costs more than a block. The position is passed as an index tensor, which gives
    a contiguous input to the head (an ``int`` gives a strided view, which was several times slower on CPU here).
    """
    length = next(iter(inputs.values())).shape[1]
    accepted = _forward_parameters(model)
    extra: dict[str, object] = dict(_no_cache(accepted))
    if "logits_to_keep" in accepted:
        extra["logits_to_keep"] = torch.tensor([length - 1], device=next(iter(inputs.values())).device)
    out = model(**inputs, **extra)
    logits = out if isinstance(out, torch.Tensor) else out["logits"] if isinstance(out, dict) else out.logits
    return logits[:, -1, :]


def _forward_parameters(model: nn.Module) -> frozenset[str]:
    """Keyword parameters of the forward of ``model``, or of the model PEFT wraps."""
    unwrap = getattr(model, "get_base_model", None)  # a PeftModel's forward takes **kwargs
    target = unwrap() if callable(unwrap) else model
    try:
        return frozenset(inspect.signature(target.forward).parameters)
    except (TypeError, ValueError):
        return frozenset()


def _no_cache(accepted: frozenset[str]) -> dict[str, bool]:
    """``use_cache=False`` where the forward (its keyword parameters ``accepted``) takes it: no key / value cache
    is built for a training step."""
    return {"use_cache": False} if "use_cache" in accepted else {}
