"""What one optimizer step consumed: the examples, tokens and losses of its forward passes.

Counts stay on the device (an attention-mask sum is a device tensor) until the writer thread moves them to the
host, so counting never synchronizes the training loop. The recorder keeps two tallies per step, what the
training loop told it (``Recorder.log``) and what its forward hooks counted; a value the loop gave wins.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

# Label id that a loss ignores (the transformers / torch cross-entropy convention).
IGNORED_LABEL = -100


def count_batch(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int | None, Any]:
    """Examples and tokens of one forward call: the leading dimension of ``input_ids`` (or of the first tensor
    argument) and the number of unmasked tokens (``attention_mask.sum()``, kept on the device) or, for integer
    token-id input without a mask, its number of elements."""
    ids = kwargs.get("input_ids")
    if ids is None:
        ids = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if ids is None:
        ids = next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
    if not isinstance(ids, torch.Tensor) or ids.ndim == 0:
        return None, None
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.shape[:2] == ids.shape[:2]:
        tokens: Any = mask.detach().sum()
    elif not ids.is_floating_point() and ids.ndim == 2:
        tokens = ids.numel()
    else:
        tokens = None
    return int(ids.shape[0]), tokens


def count_loss_tokens(kwargs: dict[str, Any]) -> Any:
    """Tokens the loss of one forward call is computed on: ``(labels != -100).sum()`` (kept on the device), or
    None without integer ``labels``. For a causal LM whose first label is not masked this counts one token per
    sequence more than the shifted loss uses."""
    labels = kwargs.get("labels")
    if isinstance(labels, torch.Tensor) and not labels.is_floating_point() and labels.ndim >= 1:
        return labels.detach().ne(IGNORED_LABEL).sum()
    return None


def dataset_config(loader: Any) -> dict[str, Any]:
    """``{"dataset": {"examples": N}}`` for a training data loader whose dataset has a length (the epoch size
    that ``recommend`` needs to find a probe run's first epoch), else ``{}``."""
    try:
        return {"dataset": {"examples": int(len(loader.dataset))}}
    except (AttributeError, TypeError):
        return {}


@dataclass
class BatchTally:
    """The running totals of one optimizer step, from one source (the loop's ``log`` calls, or the forward
    hooks). None is "not seen"; tokens and losses may be device tensors.

    Attributes
    ----------
    examples
        Examples over the step's forward passes.
    passes
        Examples of each forward pass, in order.
    tokens, loss_tokens
        Unmasked input tokens, and tokens the loss is computed on.
    loss_sum, loss_count
        Sum and number of the per-pass losses.
    loss_share_of_step
        Every pass's loss is already its share of the whole step's loss (their sum is the step's loss).
    """

    examples: int | None = None
    passes: list[int] | None = None
    tokens: Any = None
    loss_tokens: Any = None
    loss_sum: Any = 0.0
    loss_count: int = 0
    loss_share_of_step: bool = True

    def add_examples(self, examples: int) -> None:
        """One forward pass of ``examples`` examples."""
        self.examples = (self.examples or 0) + examples
        self.passes = [*(self.passes or []), examples]

    def add_tokens(self, tokens: Any) -> None:
        self.tokens = _added(self.tokens, tokens)

    def add_loss_tokens(self, loss_tokens: Any) -> None:
        self.loss_tokens = _added(self.loss_tokens, loss_tokens)

    def add_loss(self, loss: Any, *, share_of_step: bool = False) -> None:
        """One pass's loss (a tensor stays on its device); ``share_of_step``: it is already normalized over the
        whole step (a model given transformers' ``num_items_in_batch``)."""
        value = loss.detach().float().reshape(()) if isinstance(loss, torch.Tensor) else float(loss)
        self.loss_sum = self.loss_sum + value
        self.loss_count += 1
        self.loss_share_of_step = self.loss_share_of_step and share_of_step

    def add_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Count the inputs of one forward call of the model (:func:`count_batch`, :func:`count_loss_tokens`)."""
        examples, tokens = count_batch(args, kwargs)
        if examples is not None:
            self.add_examples(examples)
        if tokens is not None:
            self.add_tokens(tokens)
        loss_tokens = count_loss_tokens(kwargs)
        if loss_tokens is not None:
            self.add_loss_tokens(loss_tokens)

    def mean_loss(self) -> Any:
        """The step's loss: the mean of the per-pass losses, or their sum when each is a share of the step's;
        None without any."""
        if not self.loss_count:
            return None
        if self.loss_share_of_step:
            return self.loss_sum
        return self.loss_sum / self.loss_count


@dataclass(frozen=True)
class StepBatch:
    """What one optimizer step consumed, each value from the loop's log if it gave one, else from the hooks."""

    examples: int | None = None
    tokens: Any = None
    loss_tokens: Any = None
    loss: Any = None
    passes: list[int] | None = None
    loss_shares_step: bool = False  # the loss is the sum of per-pass shares of the step's loss

    @classmethod
    def of(cls, logged: BatchTally, counted: BatchTally) -> StepBatch:
        """Combine the two tallies of a step: a value the loop logged wins over the counted one."""
        losses = logged if logged.loss_count else counted
        return cls(examples=_first(logged.examples, counted.examples), tokens=_first(logged.tokens, counted.tokens),
                   loss_tokens=_first(logged.loss_tokens, counted.loss_tokens), loss=losses.mean_loss(),
                   passes=_first(logged.passes, counted.passes),
                   loss_shares_step=bool(losses.loss_count) and losses.loss_share_of_step)

    def pass_sizes(self, n_passes: int) -> Sequence[float] | None:
        """Examples of each of the step's ``n_passes`` backward passes; taken as equal when the forward passes
        were not seen one by one. None when unknown."""
        sizes: Sequence[float] | None = self.passes
        if (sizes is None or len(sizes) != n_passes) and isinstance(self.examples, int) and self.examples > 0:
            sizes = [self.examples / n_passes] * n_passes
        return sizes


def _added(total: Any, value: Any) -> Any:
    value = value.detach() if isinstance(value, torch.Tensor) else value
    return value if total is None else total + value


def _first(preferred: Any, fallback: Any) -> Any:
    return fallback if preferred is None else preferred
