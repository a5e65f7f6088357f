"""How many bits a dataset asks a fine-tuning update to learn.

Two sources, both in bits per example so that they scale to another dataset size of the same data:

From a recording (:func:`information_from_steps`; ``lorascope.workflows.runs.information_from_run`` reads a file)
    *Description length*: the training loss of the first epoch summed over the tokens it is computed on,
    in bits. Every first-epoch example is scored before the model has trained on it, so this is the
    prequential code length of the data given the starting model, an upper bound on the information the data
    holds for that model (it includes the irreducible noise of the data).

    *Absorbed*: the description length minus the code length of the same examples under the trained model,
    estimated from the training loss at the end of the run (its last epoch, or the last tenth of the steps):
    the information the full fine-tuning update actually took in. Only meaningful when the run saw its data
    more than once or the data generalizes; on a single pass over unrelated facts it is about zero.

    These describe a run as it ran. What its data asks under the recipe you plan, the number ``recommend`` and
    ``analyze`` use, is :mod:`lorascope.analysis.recipe`'s.

From the dataset size alone (:func:`information_from_size`)
    SFT: ``bits_per_token`` (default 1 bit, the rate of typical LLM data; Schulman et al., "LoRA Without
    Regret", 2025) times the tokens the loss is computed on. A description-length-style upper bound: data the
    base model already predicts well asks for less. RL with a scalar reward: ``bits_per_episode`` (default 1)
    per episode (LoRA Without Regret: O(1) bits per episode).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xarray as xr

from lorascope._checks import check_positive
from lorascope.errors import InvalidOptionError

__all__ = [
    "DEFAULT_BITS_PER_EPISODE",
    "DEFAULT_BITS_PER_TOKEN",
    "BitsEstimate",
    "RecordedInformation",
    "StepArrays",
    "information_from_size",
    "information_from_steps",
    "recorded_dataset_examples",
    "recorded_vocab_size",
    "step_arrays",
]

DEFAULT_BITS_PER_TOKEN = 1.0
"""Bits per trained token assumed for SFT data when only its size is known (~0.69 nats; LoRA Without Regret)."""
DEFAULT_BITS_PER_EPISODE = 1.0
"""Bits per episode assumed for RL with a scalar reward (O(1); LoRA Without Regret)."""
TASKS = ("sft", "rl")
FIRST_EPOCH_SPIKE = 2.0
"""A first-epoch step loss above this multiple of the first step's is a spike: the rate is above its stable range
(on SmolLM2 SFT, full fine-tuning at 1e-2 rose from 3.19 to 10.8 nats, capped at ln V, and its code length of 128
examples came out 1.9x a LoRA's on the same examples; docs/realdata/smollm2_lora_probes_sft_seed1.json)."""
_TAIL_FRACTION = 0.1  # share of a single-epoch run's last steps whose loss stands for the trained model's


@dataclass(frozen=True)
class BitsEstimate:
    """Bits the data asks to learn, and how they grow with the dataset size.

    .. math::

        B(N) = F + b N \\quad (g = 1), \\qquad B(N) = (F + b N_{\\mathrm{ref}}) (N / N_{\\mathrm{ref}})^g

    with :math:`b` the bits per additional example, :math:`F` a one-time cost every dataset pays once (the format
    a probe learns in its first steps), and :math:`g` the growth exponent fitted on probes of several dataset sizes
    (1: linear, random facts; below 1: data that generalises).

    Attributes
    ----------
    bits_per_example : float
    source : str
        ``"recording"``, ``"dataset size"`` or ``"episodes"``.
    basis : str
        The measure used: ``"absorbed under the planned recipe"``, ``"absorbed"``, ``"description length"``,
        ``"bits per token"`` or ``"bits per episode"``.
    upper_bound : bool
        True when the number is an upper bound on what the data asks (description length, size assumption).
    explanation : str
        One sentence a user can check.
    one_time_bits : float
        :math:`F`.
    exponent : float
        :math:`g`.
    reference_examples : float, optional
        :math:`N_{\\mathrm{ref}}`, the dataset size the growth law is anchored at (needed when :math:`g \\ne 1`).
    relative_error : float
        One standard error of the bits, relative (0 when not measured).
    growth_source : str
        Where :math:`g` comes from.
    ceiling_per_example : float, optional
        The most an example can ask, its prequential code length: :math:`B(N) \\le F + d N` however :math:`g` was
        fitted (a fitted :math:`g > 1` cannot run past memorising every example).
    """

    bits_per_example: float
    source: str
    basis: str
    upper_bound: bool
    explanation: str
    one_time_bits: float = 0.0
    exponent: float = 1.0
    reference_examples: float | None = None
    relative_error: float = 0.0
    growth_source: str = "linear: each additional example asks the same bits"
    ceiling_per_example: float | None = None

    def __post_init__(self) -> None:
        if self.exponent != 1.0 and not (self.reference_examples or 0) > 0:
            raise InvalidOptionError("A growth exponent other than 1 needs the dataset size it is anchored at.")

    def bits(self, examples: float) -> float:
        """Bits asked by ``examples`` examples of the same data."""
        if self.exponent == 1.0:
            return self.one_time_bits + self.bits_per_example * examples
        reference = float(self.reference_examples or 0)
        law = (self.one_time_bits + self.bits_per_example * reference) * (examples / reference) ** self.exponent
        if self.ceiling_per_example is None:
            return law
        return min(law, self.one_time_bits + self.ceiling_per_example * examples)

    def examples_for(self, bits: float) -> float:
        """The dataset size whose data asks ``bits`` bits (0 when the one-time cost alone exceeds them)."""
        if self.exponent == 1.0:
            return max(0.0, bits - self.one_time_bits) / self.bits_per_example
        reference = float(self.reference_examples or 0)
        law = reference * (bits / (self.one_time_bits + self.bits_per_example * reference)) ** (1 / self.exponent)
        if self.ceiling_per_example is None:
            return law
        return max(law, max(0.0, bits - self.one_time_bits) / self.ceiling_per_example)  # bits(N) is the min

    def to_dict(self) -> dict[str, Any]:
        return {"bits_per_example": self.bits_per_example, "source": self.source, "basis": self.basis,
                "upper_bound": self.upper_bound, "explanation": self.explanation,
                "one_time_bits": self.one_time_bits, "exponent": self.exponent,
                "reference_examples": self.reference_examples, "relative_error": self.relative_error,
                "growth_source": self.growth_source, "ceiling_per_example": self.ceiling_per_example}


def information_from_size(*, examples: float, tokens_per_example: float | None = None, task: str = "sft",
                          bits_per_token: float = DEFAULT_BITS_PER_TOKEN,
                          bits_per_episode: float = DEFAULT_BITS_PER_EPISODE) -> BitsEstimate:
    """Bits per example from the dataset size alone.

    .. math:: b_{\\mathrm{sft}} = \\beta_{\\mathrm{token}} \\, T, \\qquad b_{\\mathrm{rl}} = \\beta_{\\mathrm{episode}}

    with :math:`T` the trained (completion) tokens per example.

    Parameters
    ----------
    examples : float
        Number of examples (SFT) or episodes (RL); only checked here.
    tokens_per_example : float, optional
        Trained tokens per example; required for ``task="sft"``.
    task : {"sft", "rl"}
    bits_per_token, bits_per_episode : float
        The assumed rates.

    Examples
    --------
    >>> information_from_size(examples=1000, tokens_per_example=200).bits(1000)
    200000.0
    >>> information_from_size(examples=10_000, task="rl").bits_per_example
    1.0
    """
    check_positive("examples", examples)
    if task not in TASKS:
        raise InvalidOptionError(f"The 'task' parameter must be one of {TASKS}. Got {task!r} instead.")
    if task == "rl":
        check_positive("bits_per_episode", bits_per_episode)
        return BitsEstimate(float(bits_per_episode), "episodes", "bits per episode", False,
                            f"RL with a scalar reward: {bits_per_episode:g} bit(s) per episode (O(1) bits per "
                            "episode; LoRA Without Regret, 2025)")
    if tokens_per_example is None:
        raise InvalidOptionError("The information of SFT data needs its size in tokens: give tokens per example "
                                 "(or total tokens, or a JSONL dataset to count).")
    check_positive("tokens_per_example", tokens_per_example)
    check_positive("bits_per_token", bits_per_token)
    return BitsEstimate(float(bits_per_token * tokens_per_example), "dataset size", "bits per token", True,
                        f"{bits_per_token:g} bit per trained token x {tokens_per_example:,.0f} tokens per example "
                        "(typical LLM data; an upper bound: data the base model already predicts asks for less)")


@dataclass(frozen=True)
class RecordedInformation:
    """The information of a recorded run's data, in bits.

    Attributes
    ----------
    description_length_bits : float
        First-epoch training loss summed over the loss tokens, in bits.
    absorbed_bits : float or None
        ``description_length_bits`` minus the first epoch's examples coded by the trained model (the final
        loss), floored at 0; None when the run has too few steps to tell.
    epoch_examples : int
        Examples of the first epoch (the dataset size when known, else every example of the run).
    epoch_steps : int
        Steps of the first epoch that carry a loss.
    epochs : float
        Examples seen over the dataset size (NaN when the dataset size is unknown).
    final_loss_nats : float
        Mean loss per token standing for the trained model.
    token_basis : str
        ``"loss tokens"`` (labels != -100) or ``"all tokens"`` (when the run did not record loss tokens).
    marginal_bits_per_example : float
        Description length per example over the second half of the first epoch: what one more example costs
        once what all examples share (the format, the output vocabulary) has been learned.
    marginal_absorbed_per_example : float or None
        The same minus the trained model's code length per example.
    notes : list of str
    """

    description_length_bits: float
    absorbed_bits: float | None
    epoch_examples: int
    epoch_steps: int
    epochs: float
    final_loss_nats: float
    token_basis: str
    marginal_bits_per_example: float = math.nan
    marginal_absorbed_per_example: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def description_length_per_example(self) -> float:
        return self.description_length_bits / self.epoch_examples

    @property
    def absorbed_per_example(self) -> float | None:
        return None if self.absorbed_bits is None else self.absorbed_bits / self.epoch_examples

    def estimate(self) -> BitsEstimate:
        """The run read at its own end: the marginal absorbed bits when it saw its data more than once, else the
        marginal description length (an upper bound). ``recommend`` and ``analyze`` no longer use it: they read a
        probe at the planned recipe (:mod:`lorascope.analysis.recipe`); it stays as the baseline the recipe studies
        compare against (docs/information.md, "old, each at its own end").

        Marginal (second half of the first epoch) rather than average: what every example shares is learned
        once, early in the first epoch, and scaling that one-time cost with the dataset size over-states the
        bits a larger dataset asks (on random facts the first-epoch average was 10.7 bits per 8-bit fact).
        """
        absorbed = self.marginal_absorbed_per_example
        if absorbed is not None and self.epochs > 1.0 and absorbed > 0:
            return BitsEstimate(absorbed, "recording", "absorbed", False,
                                f"full fine-tuning absorbed {absorbed:,.3g} bits per additional example (second "
                                f"half of the first epoch; {self.absorbed_bits:,.0f} bits from all "
                                f"{self.epoch_examples:,} examples)")
        return BitsEstimate(self.marginal_bits_per_example, "recording", "description length", True,
                            f"first-epoch log-loss: {self.marginal_bits_per_example:,.3g} bits per additional "
                            f"example (second half of the first epoch; {self.description_length_bits:,.0f} bits "
                            f"from all {self.epoch_examples:,} examples; an upper bound)")

    def to_dict(self) -> dict[str, Any]:
        return {"description_length_bits": self.description_length_bits, "absorbed_bits": self.absorbed_bits,
                "epoch_examples": self.epoch_examples, "epoch_steps": self.epoch_steps,
                "epochs": None if math.isnan(self.epochs) else self.epochs,
                "final_loss_nats": self.final_loss_nats, "token_basis": self.token_basis,
                "marginal_bits_per_example": (self.marginal_bits_per_example
                                              if math.isfinite(self.marginal_bits_per_example) else None),
                "marginal_absorbed_per_example": self.marginal_absorbed_per_example,
                "notes": list(self.notes)}


def information_from_steps(steps: xr.Dataset, *, dataset_examples: int | None = None,
                           vocab_size: int | None = None) -> RecordedInformation:
    """The description length and absorbed information of a recorded run, from its per-step rows.

    .. math::

        L_{\\mathrm{DL}} = \\frac{1}{\\ln 2} \\sum_{t \\in \\mathrm{epoch\\ 1}} \\ell_t \\, n_t, \\qquad
        I_{\\mathrm{absorbed}} = \\max\\Bigl(0,\\ L_{\\mathrm{DL}} - \\frac{\\bar\\ell_{\\mathrm{end}}}{\\ln 2}
        \\sum_{t \\in \\mathrm{epoch\\ 1}} n_t\\Bigr)

    with :math:`\\ell_t` the step's mean training loss (nats per token), :math:`n_t` its loss tokens and
    :math:`\\bar\\ell_{\\mathrm{end}}` the token-weighted mean loss of the last epoch (of the last tenth of the
    steps for a run of one epoch or less).

    Parameters
    ----------
    steps : xarray.Dataset
        A run's steps view (``loss``, ``batch_examples``, ``batch_tokens``, ``batch_loss_tokens``,
        ``examples_seen``).
    dataset_examples : int, optional
        Examples in one epoch. Without it every step counts as first-epoch (an over-estimate for a run that
        repeated its data).
    vocab_size : int, optional
        The output vocabulary: a step's loss is counted at most at a uniform code over it (:func:`step_arrays`).

    Raises
    ------
    InvalidOptionError
        If no step has a finite loss with known examples and tokens, or ``dataset_examples`` is not positive.
    """
    if dataset_examples is not None:
        check_positive("dataset_examples", dataset_examples)
    arrays = step_arrays(steps, vocab_size)
    loss, examples, seen, tokens, usable = arrays.loss, arrays.examples, arrays.seen, arrays.tokens, arrays.usable
    notes, token_basis = list(arrays.notes), arrays.token_basis
    if dataset_examples is None:
        epochs = math.nan
        first = usable
        notes.append("the dataset size is unknown (not in the run's config): every step is taken as first-epoch")
    else:
        epochs = float(seen[-1] / dataset_examples)
        first = usable & (seen - examples < dataset_examples)  # the step started within the first epoch
        if seen[-1] < dataset_examples:
            notes.append(f"the run saw {int(seen[-1]):,} of {dataset_examples:,} examples: its first epoch is "
                         "incomplete, bits per example come from what it saw")
    epoch_examples = int(examples[first].sum())
    description_length = float(np.sum(loss[first] * tokens[first]) / math.log(2))
    spike = _first_epoch_spike(loss[first])
    if spike:
        notes.append(spike)
    if dataset_examples is not None and epochs > 1.0:
        tail = usable & (seen - examples >= seen[-1] - dataset_examples)  # the last epoch
    else:
        index = np.flatnonzero(usable)
        tail = np.zeros_like(usable)
        tail[index[-max(1, int(round(_TAIL_FRACTION * index.size))):]] = True
    final_loss = float(np.sum(loss[tail] * tokens[tail]) / np.sum(tokens[tail]))
    absorbed = marginal_absorbed = None
    if int(first.sum()) >= 2:
        absorbed = max(0.0, description_length - final_loss * float(tokens[first].sum()) / math.log(2))
    # The marginal rate: the first epoch's steps after half of its examples.
    first_index = np.flatnonzero(first)
    done = np.cumsum(examples[first_index]) - examples[first_index]  # examples before each first-epoch step
    late = first_index[done >= epoch_examples / 2] if first_index.size >= 2 else first_index
    if not late.size:  # a last step holding more than half of the epoch: it alone is the second half
        late = first_index[-1:]
    late_examples = float(examples[late].sum())
    if not late_examples > 0:  # no first-epoch step (examples seen corrupt or past the dataset from the start)
        return RecordedInformation(description_length, absorbed, epoch_examples, int(first.sum()), epochs,
                                   final_loss, token_basis, math.nan, None, notes)
    marginal = float(np.sum(loss[late] * tokens[late]) / math.log(2) / late_examples)
    if absorbed is not None:
        marginal_absorbed = max(0.0, float(np.sum((loss[late] - final_loss) * tokens[late]) / math.log(2)
                                           / late_examples))
    return RecordedInformation(description_length, absorbed, epoch_examples, int(first.sum()), epochs, final_loss,
                               token_basis, marginal, marginal_absorbed, notes)


def _first_epoch_spike(loss: np.ndarray) -> str | None:
    """A note when the first epoch's loss rose past :data:`FIRST_EPOCH_SPIKE` times its first step's."""
    if loss.size < 2 or not loss[0] > 0:
        return None
    peak = int(np.argmax(loss))
    if not loss[peak] > FIRST_EPOCH_SPIKE * loss[0]:
        return None
    return (f"the loss rose from {loss[0]:.3g} to {loss[peak]:.3g} nats in the first epoch (step {peak + 1} of it): "
            "a learning rate above its stable range; the description length, and the bits absorbed, count the "
            "recovery from it, so they over-state what the data asks: probe at a lower rate")


@dataclass(frozen=True)
class StepArrays:
    """A run's per-step rows as float64 arrays, with the steps usable for information (a finite loss, known
    examples, tokens and examples seen) and the token basis (loss tokens, or all tokens when not recorded)."""

    loss: np.ndarray
    examples: np.ndarray
    seen: np.ndarray
    tokens: np.ndarray
    usable: np.ndarray
    token_basis: str
    notes: tuple[str, ...]


def step_arrays(steps: xr.Dataset, vocab_size: int | None = None) -> StepArrays:
    """The per-step arrays information is computed from.

    With ``vocab_size`` V, a step's loss above :math:`\\ln V` nats per token is taken as :math:`\\ln V`: a
    switching code sends each batch with the model or with a uniform code over the vocabulary, whichever is
    shorter (the bit per batch that says which is not counted), so the code length never exceeds sending the
    tokens plain. It binds
    where a learner is worse than a uniform guess on examples it has not seen yet: a high learning rate memorising
    random facts is confidently wrong on the next ones (docs/information.md); on text it does not bind.

    Raises
    ------
    InvalidOptionError
        If no step has a finite loss with known examples and tokens.
    """
    notes: tuple[str, ...] = ()
    loss = steps["loss"].values.astype(np.float64)
    examples = steps["batch_examples"].values.astype(np.float64)
    seen = steps["examples_seen"].values.astype(np.float64)
    tokens = (steps["batch_loss_tokens"].values if "batch_loss_tokens" in steps else
              np.full(loss.shape, -1)).astype(np.float64)
    token_basis = "loss tokens"
    if not np.any(tokens > 0):
        tokens = steps["batch_tokens"].values.astype(np.float64)
        token_basis = "all tokens"
        notes = ("the run did not record loss tokens (labels != -100): every input token is counted, an "
                 "over-estimate when prompts are masked; pass labels to the model or rec.log(loss_tokens=)",)
    usable = np.isfinite(loss) & (examples > 0) & (tokens > 0) & (seen > 0)
    if vocab_size is not None and vocab_size > 1:
        uniform = math.log(vocab_size)
        above = int(np.count_nonzero(usable & (loss > uniform)))
        if above:
            loss = np.minimum(loss, uniform)
            notes += (f"{above} step(s) had a loss above a uniform guess over the {vocab_size:,}-token vocabulary "
                      f"({uniform / math.log(2):.1f} bits per token), counted at that (a switching code): the model "
                      "was confidently wrong on examples it had not seen",)
    if not usable.any():
        raise InvalidOptionError("The run has no step with a finite loss and known examples and tokens: its "
                                 "information cannot be estimated.")
    return StepArrays(loss, examples, seen, tokens, usable, token_basis, notes)


def recorded_vocab_size(config: Mapping[str, Any]) -> int | None:
    """The output vocabulary a run's config records (the transformers config of ``config["model"]``), or None."""
    model = (config.get("model") or {}).get("config") or {}
    text = model.get("text_config") if isinstance(model.get("text_config"), Mapping) else model
    size = text.get("vocab_size") if isinstance(text, Mapping) else None
    return int(size) if isinstance(size, numbers.Integral) and int(size) > 1 else None


def recorded_dataset_examples(config: Mapping[str, Any]) -> int | None:
    """The dataset size a run's config records (``config["dataset"]["examples"]``), or None."""
    recorded = (config.get("dataset") or {}).get("examples")
    return int(recorded) if isinstance(recorded, numbers.Integral) and int(recorded) > 0 else None
