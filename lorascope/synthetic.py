"""A synthetic memorization task with an exactly known information content: random key -> value facts.

Each fact is a sequence of ``key_tokens`` random key tokens followed by one value token drawn uniformly from a
set of ``values`` tokens; keys are distinct, so no fact says anything about another and a model can only get
the values right by storing them. The loss is on the value token only (labels are -100 elsewhere), so the
bits the data asks to learn are exactly ``facts * log2(values)``.

Used by ``lorascope calibrate`` (bits per LoRA parameter), the capacity validation tests, the demo and the
reproduction study.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lorascope.errors import InvalidOptionError

__all__ = ["FactsTask", "stored_bits"]


@dataclass(frozen=True)
class FactsTask:
    """``facts`` random key -> value facts over a vocabulary of ``vocab_size`` token ids.

    Keys use ids ``[0, vocab_size - values)``, values the last ``values`` ids, so a key token is never a
    value token.

    Examples
    --------
    >>> task = FactsTask(facts=100, vocab_size=64, values=16, key_tokens=3)
    >>> task.bits
    400.0
    >>> ids, labels = task.tensors()
    >>> tuple(ids.shape), int((labels != -100).sum())
    ((100, 4), 100)
    """

    facts: int
    vocab_size: int
    values: int
    key_tokens: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("facts", "vocab_size", "values", "key_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidOptionError(
                    f"The {name!r} parameter of FactsTask must be an int in the range [1, inf). Got {value!r} instead.")
        if not 2 <= self.values < self.vocab_size:
            raise InvalidOptionError(
                f"The 'values' parameter of FactsTask must be in [2, vocab_size) = [2, {self.vocab_size}). "
                f"Got {self.values!r} instead.")
        if (self.vocab_size - self.values) ** self.key_tokens < 2 * self.facts:
            raise InvalidOptionError(
                f"{self.facts} distinct keys of {self.key_tokens} tokens need more key ids than the "
                f"{self.vocab_size - self.values} left by {self.values} values; use longer keys or fewer facts.")

    @property
    def bits(self) -> float:
        """Information content of the task: ``facts * log2(values)`` bits."""
        return self.facts * math.log2(self.values)

    @property
    def bits_per_fact(self) -> float:
        return math.log2(self.values)

    @property
    def first_value_id(self) -> int:
        return self.vocab_size - self.values

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, labels)``, both ``(facts, key_tokens + 1)`` int64; labels are -100 except the value.

        The same seed gives the same facts on every platform (torch's CPU generator).
        """
        generator = torch.Generator().manual_seed(self.seed)
        key_ids = self.vocab_size - self.values
        keys = torch.empty(0, self.key_tokens, dtype=torch.long)
        while len(keys) < self.facts:  # draw, then drop repeated keys (rare unless the key space is small)
            draw = torch.randint(0, key_ids, (self.facts - len(keys), self.key_tokens), generator=generator)
            keys = torch.unique(torch.cat([keys, draw]), dim=0, sorted=False)
        keys = keys[torch.randperm(len(keys), generator=generator)[: self.facts]]
        values = self.first_value_id + torch.randint(0, self.values, (self.facts, 1), generator=generator)
        ids = torch.cat([keys, values], dim=1)
        labels = torch.full_like(ids, -100)
        labels[:, -1] = ids[:, -1]
        return ids, labels


@torch.no_grad()
def stored_bits(logits_at_value: torch.Tensor, task: FactsTask, values: torch.Tensor) -> float:
    """Bits of the task a model holds: :math:`\\sum_i (\\log_2 V - \\mathrm{CE}_i)` with the cross-entropy taken
    over the value set only (the model is not charged for the format), floored at 0.

    Parameters
    ----------
    logits_at_value : torch.Tensor
        ``(facts, vocab_size)`` logits at the position that predicts each value.
    task : FactsTask
    values : torch.Tensor
        ``(facts,)`` the value token ids.

    Examples
    --------
    >>> task = FactsTask(facts=4, vocab_size=8, values=4, key_tokens=2)
    >>> logits = torch.zeros(4, 8)
    >>> values = torch.tensor([4, 5, 6, 7])
    >>> stored_bits(logits, task, values)  # uniform over the values: nothing stored
    0.0
    >>> logits[torch.arange(4), values] = 100.0  # certain and right: 2 bits each
    >>> round(stored_bits(logits, task, values), 6)
    8.0
    """
    restricted = logits_at_value[:, task.first_value_id:].float()
    ce_nats = torch.nn.functional.cross_entropy(restricted, values - task.first_value_id, reduction="sum")
    return max(0.0, task.bits - float(ce_nats) / math.log(2))
