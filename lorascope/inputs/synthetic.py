"""Synthetic data with known content: random key -> value facts, and a Markov-chain "pretraining language".

**Facts.**
Each fact is a sequence of ``key_tokens`` random key tokens followed by one value token drawn uniformly from a
set of ``values`` tokens; keys are distinct, so no fact says anything about another and a model can only get
the values right by storing them. The loss is on the value token only (labels are -100 elsewhere), so the
bits the data asks to learn are exactly ``facts * log2(values)``.

**Markov language.** Sequences from a fixed random sparse Markov chain: a cheap generic pretraining phase, so a
model built from a config starts fine-tuning as a trained model (with an output head that can be confident)
rather than from random weights.

Used by ``lorascope calibrate`` (bits per LoRA parameter), the capacity validation tests, the demo and the
reproduction study.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from lorascope.errors import InvalidOptionError

__all__ = ["FactsTask", "markov_batches", "pretrain_on_markov", "stored_bits"]


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


_LOG_TEMPERATURES = torch.linspace(-2.0, 5.0, 71)  # logit scales e^-2 .. e^5 in steps of 0.1


@torch.no_grad()
def stored_bits(logits_at_value: torch.Tensor, task: FactsTask, values: torch.Tensor, *,
                fit_scale: bool = True) -> float:
    r"""Bits of the task a model holds: :math:`\max_s \sum_i (\log_2 V - \mathrm{CE}_i(s))`, floored at 0.

    :math:`\mathrm{CE}_i(s)` is the cross-entropy in bits of fact i's value under ``s * logits`` restricted to
    the value tokens (the model is not charged for the format). Each term is a code-length saving, so the sum is
    a lower bound on the information the model holds about the values given the keys. The one fitted logit scale
    ``s`` (on a grid, ``fit_scale=True``) keeps a model that ranks the right value first but cannot be confident,
    e.g. behind a frozen output head with small norms, from being counted as knowing nothing; one scalar fitted
    on hundreds of facts adds a negligible bias.

    Parameters
    ----------
    logits_at_value : torch.Tensor
        ``(facts, vocab_size)`` logits at the position that predicts each value.
    task : FactsTask
    values : torch.Tensor
        ``(facts,)`` the value token ids.
    fit_scale : bool, default True
        Fit the logit scale; False scores the logits as they are.

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
    >>> logits[torch.arange(4), values] = 0.5  # right but unconfident: the fitted scale recovers it
    >>> round(stored_bits(logits, task, values, fit_scale=False), 2), round(stored_bits(logits, task, values), 2)
    (2.02, 8.0)
    """
    restricted = logits_at_value[:, task.first_value_id:].double()
    targets = values - task.first_value_id
    scales = _LOG_TEMPERATURES.double().exp() if fit_scale else torch.ones(1, dtype=torch.float64)
    best_ce_nats = min(float(torch.nn.functional.cross_entropy(s * restricted, targets, reduction="sum"))
                       for s in scales)
    return max(0.0, task.bits - best_ce_nats / math.log(2))


MAX_MARKOV_TOKENS = 2048


def markov_batches(vocab_size: int, *, batch_size: int, length: int, generator: torch.Generator,
                   sparsity: float = 8.0) -> Iterator[torch.Tensor]:
    """An endless stream of ``(batch_size, length)`` token sequences from a fixed random sparse Markov chain.

    Transition rows are uniform draws raised to the power ``sparsity`` and normalized, so each token has a few
    likely successors: a language a small model learns in a few hundred steps.
    """
    transitions = torch.rand(vocab_size, vocab_size, generator=generator) ** sparsity
    transitions /= transitions.sum(1, keepdim=True)
    while True:
        ids = torch.empty(batch_size, length, dtype=torch.long)
        ids[:, 0] = torch.randint(0, vocab_size, (batch_size,), generator=generator)
        for t in range(1, length):
            ids[:, t] = torch.multinomial(transitions[ids[:, t - 1]], 1, generator=generator).squeeze(1)
        yield ids


def pretrain_on_markov(model: torch.nn.Module, vocab_size: int, *, steps: int, seed: int = 0, batch_size: int = 32,
                       length: int = 24, lr: float = 3e-3) -> float:
    """Train every parameter of ``model`` (a causal LM taking ``input_ids`` and ``labels``) on the Markov language
    with AdamW for ``steps`` steps; returns the last loss."""
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    # The chain's dense transition matrix is vocab^2: a large vocabulary pretrains on its first MAX_MARKOV_TOKENS ids.
    stream = markov_batches(min(vocab_size, MAX_MARKOV_TOKENS), batch_size=batch_size, length=length,
                            generator=generator)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        ids = next(stream).to(device)
        loss = _loss(model(input_ids=ids, labels=ids))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.item()


def _loss(output: Any) -> torch.Tensor:
    return output["loss"] if isinstance(output, dict) else output.loss
