"""The bits a dataset asks a LoRA to hold under a planned recipe, read from a full fine-tuning probe.

What full fine-tuning absorbs depends on how long and how hard it trains, not only on the data: more epochs and a
higher learning rate memorise more (issue 13 measured a 19x spread on real text across probe recipes). So the
bits to learn are defined for the *planned* recipe, as a code-length saving on the loss tokens (the unit
``lorascope calibrate`` measures capacity in):

.. math::

    a(E) = \\underbrace{\\frac{1}{\\ln 2}\\,\\frac{\\sum_{t \\in \\mathrm{late}} \\ell_t n_t}
           {\\sum_{t \\in \\mathrm{late}} m_t}}_{d:\\ \\mathrm{prequential\\ code\\ per\\ example}}
           \\; - \\; \\frac{\\bar\\ell(E)\\, \\bar n}{\\ln 2}

- :math:`d`, the prequential (online) code length per example: the first-epoch training loss of the steps after
  half of the first epoch, each example scored before the model trained on it (Blier & Ollivier, 2018). Reading
  the second half leaves out the one-time format cost (the output vocabulary, the template), which every example
  shares and the first steps learn: charging it per example over-states what a larger dataset asks.
- :math:`F`, the one-time cost: what the first half of the first epoch paid above the second half's rate
  (:math:`\\sum_{t \\in \\mathrm{early}} (\\ell_t n_t / \\ln 2 - d\\, m_t)^+`). It is absorbed once, whatever the
  dataset size, so the bits of :math:`N` examples are :math:`F + a(E) N`, not :math:`N` times the first epoch's average.
- :math:`\\bar\\ell(E)`, the code length per token under the model at the end of the planned recipe's
  :math:`E` epochs: the token-weighted training loss over the last quarter epoch of examples before :math:`E N`
  (:data:`END_WINDOW`), :math:`\\bar n` the loss tokens per example. A probe that ran at least :math:`E` epochs
  is read at :math:`E`, whatever its own length; a shorter probe is extrapolated from its per-epoch curve
  :math:`a(2), a(3), \\dots` (a power law in :math:`E`; in proportion to :math:`E` when it has one such point),
  never past :math:`d`, and says so.

:math:`a(E)` counts what generalises and what is memorised alike (the training loss of a later epoch falls below
the held-out loss as examples are memorised): both fill an adapter. Its uncertainty combines the step-to-step
noise of the two means (one standard error each).

The learning rate and batch size are not transformed: a probe at another learning rate measures another recipe.
The estimate says so, with the direction of the error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import xarray as xr

from lorascope._checks import check_positive
from lorascope.analysis.information import BitsEstimate, step_arrays
from lorascope.errors import InvalidOptionError

__all__ = ["END_WINDOW", "LR_TOLERANCE", "MIN_SIZE_RATIO", "ProbeRecipe", "Recipe", "RecipeInformation",
           "bits_for_plan", "extrapolate_epochs", "information_as_run", "information_for_recipe"]

END_WINDOW = 0.25
"""Share of an epoch, before the planned end, whose training loss stands for the trained model's code length."""
LR_TOLERANCE = 1.5
"""Learning rates within this factor count as the same recipe."""
RESOLUTION = 0.01
"""Share of the code length below which absorbed bits are not told from zero (when the step noise is smaller)."""
DEFAULT_EPOCH_EXPONENT = 1.0
"""How a(E) grows with the epochs when a probe has fewer than two whole epochs past the first to fit it: in
proportion. Measured exponents: 0.6-1.2 (SmolLM2 on docstrings, epochs 2 to 8; random facts, epochs 4 to 16)."""
EXTRAPOLATION_ERROR = 0.5
"""Relative error added per doubling of the epochs a probe is extrapolated over: probes of 4 epochs extrapolated to
16 missed the measured bits by 0.53x to 1.4x (docs/information/recipe_consistency.json)."""
MIN_SIZE_RATIO = 1.5
"""Probes' dataset sizes must span at least this factor for a growth exponent to be fitted."""
MIN_LATE_STEPS = 2  # the marginal code length reads at least this many steps of the first epoch's second half


@dataclass(frozen=True)
class Recipe:
    """The planned fine-tuning recipe the bits are asked for.

    Attributes
    ----------
    epochs : float
        Passes over the data.
    learning_rate : float, optional
        The full fine-tuning learning rate of the plan (what the probe should run at); only compared.
    batch_size : int, optional
        Examples per optimizer step; only compared.
    """

    epochs: float = 1.0
    learning_rate: float | None = None
    batch_size: int | None = None

    def __post_init__(self) -> None:
        check_positive("epochs", self.epochs, "the planned recipe")
        if self.learning_rate is not None:
            check_positive("learning_rate", self.learning_rate, "the planned recipe")
        if self.batch_size is not None:
            check_positive("batch_size", self.batch_size, "the planned recipe")

    def to_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "learning_rate": self.learning_rate, "batch_size": self.batch_size}


@dataclass(frozen=True)
class ProbeRecipe:
    """What a probe ran: its epochs (examples seen over the dataset size), peak learning rate, batch size and
    learning-rate schedule (``"constant"``, ``"decaying"`` when it ends under half its peak, ``"varying"``), each
    None when the run does not say."""

    epochs: float
    learning_rate: float | None
    batch_size: float | None
    schedule: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "learning_rate": self.learning_rate, "batch_size": self.batch_size,
                "schedule": self.schedule}


@dataclass(frozen=True)
class RecipeInformation:
    """The bits per example full fine-tuning absorbs under a planned recipe, from one probe.

    Attributes
    ----------
    absorbed_per_example : float
        :math:`a(E)` at the planned epochs, in bits.
    one_time_bits : float
        :math:`F`.
    relative_error : float
        One standard error of it, relative: the step-to-step noise of the two losses, plus
        :data:`EXTRAPOLATION_ERROR` per doubling of the epochs when extrapolated.
    code_length_per_example : float
        :math:`d`, the prequential code length per additional example: the most an example can ask.
    end_loss_nats : float
        :math:`\\bar\\ell(E)`, nats per loss token.
    loss_tokens_per_example : float
    dataset_examples : int
    read_at_epochs : float
        The epoch the end loss was read at: the planned one, or the probe's last when extrapolated.
    extrapolated : bool
        The probe ran fewer epochs than planned.
    below_resolution : bool
        The probe absorbed less than it resolves (one standard error, at least :data:`RESOLUTION` of the code
        length): ``absorbed_per_example`` is that resolution, an upper bound.
    per_epoch : tuple of (epochs, bits per example)
        :math:`a(E)` at each whole epoch the probe completed.
    probe, planned : ProbeRecipe, Recipe
    token_basis : str
    notes : list of str
    """

    absorbed_per_example: float
    one_time_bits: float
    relative_error: float
    code_length_per_example: float
    end_loss_nats: float
    loss_tokens_per_example: float
    dataset_examples: int
    read_at_epochs: float
    extrapolated: bool
    below_resolution: bool
    per_epoch: tuple[tuple[float, float], ...]
    probe: ProbeRecipe
    planned: Recipe
    token_basis: str
    notes: list[str] = field(default_factory=list)

    @property
    def absorbed_bits(self) -> float:
        """Bits the probe's whole dataset asks under the planned recipe: :math:`F + a(E) N`."""
        return self.one_time_bits + self.absorbed_per_example * self.dataset_examples

    def estimate(self) -> BitsEstimate:
        """The per-example estimate :func:`lorascope.recommend` scales to the planned dataset."""
        read = (f"extrapolated from the probe's {self.probe.epochs:.3g} epochs" if self.extrapolated
                else f"read at epoch {self.read_at_epochs:.3g}")
        return BitsEstimate(
            self.absorbed_per_example, "recording", "absorbed under the planned recipe", self.below_resolution,
            f"full fine-tuning absorbs {self.absorbed_per_example:,.3g} bits per example (+-"
            f"{self.relative_error:.0%}) in {self.planned.epochs:.3g} epoch(s) ({read}): the prequential code length "
            f"{self.code_length_per_example:,.3g} bits per example (second half of the first epoch) minus the code "
            f"length under the trained model, on {self.token_basis}; plus {self.one_time_bits:,.0f} bits paid once "
            "(the first half-epoch's cost above that rate)", one_time_bits=self.one_time_bits,
            reference_examples=float(self.dataset_examples), relative_error=self.relative_error,
            ceiling_per_example=self.code_length_per_example)

    def to_dict(self) -> dict[str, Any]:
        return {"absorbed_per_example": self.absorbed_per_example, "one_time_bits": self.one_time_bits,
                "relative_error": self.relative_error,
                "absorbed_bits": self.absorbed_bits, "code_length_per_example": self.code_length_per_example,
                "end_loss_nats": self.end_loss_nats, "loss_tokens_per_example": self.loss_tokens_per_example,
                "dataset_examples": self.dataset_examples, "read_at_epochs": self.read_at_epochs,
                "extrapolated": self.extrapolated, "below_resolution": self.below_resolution,
                "per_epoch": [list(p) for p in self.per_epoch],
                "probe": self.probe.to_dict(), "planned": self.planned.to_dict(), "token_basis": self.token_basis,
                "estimate": self.estimate().to_dict(), "notes": list(self.notes)}


def information_for_recipe(steps: xr.Dataset, *, dataset_examples: int | None, planned: Recipe,
                           learning_rate: float | None = None, vocab_size: int | None = None) -> RecipeInformation:
    """The bits per example full fine-tuning absorbs under ``planned``, from a probe's per-step rows.

    Parameters
    ----------
    steps : xarray.Dataset
        A full fine-tuning probe's steps view (``loss``, ``batch_examples``, ``batch_tokens``,
        ``batch_loss_tokens``, ``examples_seen``).
    dataset_examples : int
        Examples in one epoch of the probe's data (its config's ``dataset.examples``).
    planned : Recipe
    learning_rate : float, optional
        The probe's learning rate, when its run records it (compared with the planned one).
    vocab_size : int, optional
        The output vocabulary: a step's loss counts at most a uniform code over it
        (:func:`~lorascope.analysis.information.step_arrays`).

    Raises
    ------
    InvalidOptionError
        No dataset size; no step with a finite loss, examples and tokens; a first epoch too short to read its
        second half (fewer than two steps there).

    Examples
    --------
    A probe of 4 epochs over 64 facts (one loss token each) that learns nothing it can carry to an unseen fact in
    its first epoch (5.5 bits each) and memorises them over the next three; planned: 2 epochs.

    >>> import numpy as np, xarray as xr
    >>> loss = np.repeat([5.5, 3.0, 1.0, 0.5], 8) * np.log(2)  # bits per token -> nats
    >>> steps = xr.Dataset({"loss": ("step", loss), "batch_examples": ("step", np.full(32, 8)),
    ...                     "batch_tokens": ("step", np.full(32, 8)), "batch_loss_tokens": ("step", np.full(32, 8)),
    ...                     "examples_seen": ("step", np.arange(1, 33) * 8)})
    >>> info = information_for_recipe(steps, dataset_examples=64, planned=Recipe(epochs=2))
    >>> info.code_length_per_example, info.absorbed_per_example, info.read_at_epochs
    (5.5, 2.5, 2.0)
    >>> [a for _, a in info.per_epoch]
    [0.0, 2.5, 4.5, 5.0]
    """
    if dataset_examples is None:
        raise InvalidOptionError("The bits under a planned recipe need the probe's dataset size (config "
                                 "dataset.examples): the HF and Lightning integrations write it; in a plain loop pass "
                                 "extra_config={'dataset': {'examples': N}} to lorascope.record.")
    check_positive("dataset_examples", dataset_examples, "information_for_recipe")
    arrays = step_arrays(steps, vocab_size)
    notes = list(arrays.notes)
    n = float(dataset_examples)
    code, per_token, one_time, code_error = _first_epoch(arrays, n)
    last_seen = float(arrays.seen[arrays.usable].max())
    probe_epochs = last_seen / n
    whole = [float(e) for e in range(1, int(math.floor(probe_epochs + 1e-9)) + 1)]
    per_epoch = tuple((e, _absorbed(code, _end_loss(arrays, e * n, n)[0], per_token)) for e in whole)
    if last_seen < n:
        notes.append(f"the probe saw {int(last_seen):,} of {dataset_examples:,} examples: its first epoch is "
                     "incomplete")
    if planned.epochs <= probe_epochs + 1e-9:
        end, end_error = _end_loss(arrays, planned.epochs * n, n)
        absorbed, read_at, extrapolated = _absorbed(code, end, per_token), planned.epochs, False
        if per_epoch and planned.epochs < per_epoch[-1][0]:
            notes.append(f"read at the planned epoch {planned.epochs:g} of the probe's {probe_epochs:.3g}: a plan of "
                         f"{per_epoch[-1][0]:g} epochs asks {per_epoch[-1][1]:,.3g} bits per example (give the planned "
                         "epochs: recommend(epochs=), --epochs)")
    else:
        end, end_error = _end_loss(arrays, last_seen, n)
        read_at, extrapolated = probe_epochs, True
        absorbed = extrapolate_epochs(per_epoch, _absorbed(code, end, per_token), probe_epochs, planned.epochs, code)
        notes.append(f"the probe ran {probe_epochs:.3g} epochs, the plan {planned.epochs:g}: its bits are "
                     f"extrapolated along its per-epoch curve ({_curve(per_epoch)}); a probe of "
                     f"{planned.epochs:g} epochs measures them")
    error_bits = math.hypot(code_error, end_error * per_token / math.log(2))
    resolution = max(error_bits, RESOLUTION * code)
    below = absorbed < resolution
    if below:  # what the probe cannot tell from zero: taken at its resolution, an upper bound
        notes.append(f"full fine-tuning absorbed {absorbed:,.3g} bits per example under the plan, below what the "
                     f"probe resolves ({resolution:,.3g}): taken at {resolution:,.3g}, an upper bound")
        absorbed = resolution
    error = error_bits / absorbed if absorbed > 0 else math.inf
    if extrapolated:
        error = math.hypot(error, EXTRAPOLATION_ERROR * math.log2(planned.epochs / probe_epochs))
    rates = steps["lr"].values.astype(np.float64) if "lr" in steps else np.full(arrays.seen.shape, np.nan)
    schedule = _schedule(rates)
    if learning_rate is None and schedule is not None:
        learning_rate = float(np.nanmax(rates))
    probe = ProbeRecipe(probe_epochs, learning_rate, float(np.median(arrays.examples[arrays.usable])), schedule)
    _compare_recipes(planned, probe, notes)
    if schedule == "decaying" and not extrapolated and planned.epochs < probe_epochs - 1e-9:
        _note_early_decay(rates, arrays.seen, planned.epochs * n, probe_epochs, planned.epochs, notes)
    return RecipeInformation(absorbed, one_time, error, code, end, per_token, int(dataset_examples), float(read_at),
                             extrapolated, below, per_epoch, probe, planned, arrays.token_basis, notes)


def information_as_run(steps: xr.Dataset, *, dataset_examples: int | None,
                       learning_rate: float | None = None, vocab_size: int | None = None) -> RecipeInformation:
    """:func:`information_for_recipe` with the probe's own recipe as the plan: what a recording absorbed, read at
    its own last epoch (``lorascope analyze``'s forecast)."""
    if dataset_examples is None:
        return information_for_recipe(steps, dataset_examples=None, planned=Recipe())  # refused with its reason
    arrays = step_arrays(steps)
    epochs = float(arrays.seen[arrays.usable].max()) / dataset_examples
    return information_for_recipe(steps, dataset_examples=dataset_examples, planned=Recipe(epochs=epochs),
                                  learning_rate=learning_rate, vocab_size=vocab_size)


def bits_for_plan(informations: Sequence[RecipeInformation]) -> BitsEstimate:
    """The bits estimate of a plan from one or more probes of the same data under it.

    One probe, or probes of one dataset size: linear growth, :math:`F + a N` from the largest probe. Probes of
    dataset sizes spanning at least :data:`MIN_SIZE_RATIO`: the exponent :math:`g` of :math:`B(N) \\propto N^g`
    is fitted in log-log space on each probe's :math:`F + a N` and anchored at the largest probe; its relative
    error then includes the fit's residual spread. Data that generalises grows with :math:`g < 1`; at a fixed
    number of epochs a larger dataset also gets more steps, so memorised data can grow with :math:`g > 1`, up
    to the ceiling of memorising every example (:attr:`BitsEstimate.ceiling_per_example`).

    Raises
    ------
    InvalidOptionError
        If ``informations`` is empty or holds no probe that absorbed anything.

    Examples
    --------
    >>> def probe(n, a):
    ...     return RecipeInformation(a, 0.0, 0.0, a, 0.0, 1.0, n, 2.0, False, False, (), ProbeRecipe(2.0, None, 8.0),
    ...                              Recipe(epochs=2), "loss tokens")
    >>> est = bits_for_plan([probe(100, 4.0), probe(400, 2.0)])  # 400 bits at 100 examples, 800 at 400
    >>> round(est.exponent, 3), est.reference_examples, round(est.bits(1600))
    (0.5, 400.0, 1600)
    """
    if not informations:
        raise InvalidOptionError("bits_for_plan needs at least one probe's information. Got none instead.")
    largest = max(informations, key=lambda i: i.dataset_examples)
    base = largest.estimate()
    if not base.bits_per_example > 0:
        raise InvalidOptionError(f"The largest probe ({largest.dataset_examples:,} examples) absorbed nothing under "
                                 f"the planned {largest.planned.epochs:g} epoch(s): its loss did not fall below the "
                                 "first epoch's (a learning rate that failed, or too few epochs).")
    points = sorted((float(i.dataset_examples), i.absorbed_bits) for i in informations if i.absorbed_bits > 0)
    sizes = [n for n, _ in points]
    if len(set(sizes)) < 2 or max(sizes) / min(sizes) < MIN_SIZE_RATIO:
        source = ("linear: one dataset size was probed; probes at 2-3 sizes at least "
                  f"{MIN_SIZE_RATIO:g}x apart measure the growth")
        return replace(base, growth_source=source)
    x, y = np.log(sizes), np.log([b for _, b in points])
    exponent, intercept = np.polyfit(x, y, 1)
    if not exponent > 0:
        return replace(base, growth_source=f"linear: the bits did not grow with the probes' dataset sizes (fitted "
                                           f"exponent {exponent:.2f})")
    spread = float(np.std(y - (exponent * x + intercept), ddof=2)) if len(points) > 2 else 0.0
    return replace(base, exponent=float(exponent), relative_error=math.hypot(base.relative_error, spread),
                   growth_source=f"fitted on {len(points)} probes of {sizes[0]:,.0f} to {sizes[-1]:,.0f} examples: "
                                 f"the bits grow as N^{exponent:.2f}")


def _first_epoch(arrays: Any, n: float) -> tuple[float, float, float, float]:
    """From the first epoch's steps with a usable loss (a run may diverge mid-epoch): the prequential code per
    additional example of its second half, the loss tokens per example there, the one-time cost its first half paid
    above that rate, and the code's standard error."""
    loss, examples, tokens = arrays.loss, arrays.examples, arrays.tokens
    first = np.flatnonzero(arrays.usable & (arrays.seen - examples < n))
    done = np.cumsum(examples[first]) - examples[first]
    half = float(examples[first].sum()) / 2
    late, early = first[done >= half], first[done < half]
    if late.size < MIN_LATE_STEPS:
        raise InvalidOptionError(f"The probe has {late.size} step(s) in the second half of its first epoch: the "
                                 f"bits per additional example need at least {MIN_LATE_STEPS} there (a smaller batch "
                                 "or a larger probe dataset).")
    late_examples = float(examples[late].sum())
    code = float(np.sum(loss[late] * tokens[late]) / math.log(2) / late_examples)
    one_time = float(np.sum(np.maximum(0.0, loss[early] * tokens[early] / math.log(2) - code * examples[early])))
    code_error = _mean_error(loss[late] * tokens[late] / examples[late] / math.log(2), examples[late])
    return code, float(tokens[late].sum()) / late_examples, one_time, code_error


def _note_early_decay(rates: np.ndarray, seen: np.ndarray, at: float, probe_epochs: float, planned: float,
                      notes: list[str]) -> None:
    """Name a decaying learning rate read well before its end: the probe had not annealed as a plan of that length
    would."""
    at_plan = rates[np.flatnonzero(seen <= at + 1e-9)[-1:]]
    share = float(at_plan[0] / np.nanmax(rates)) if at_plan.size and np.isfinite(at_plan[0]) else math.nan
    if share > 0.5:
        notes.append(f"the probe's learning rate decays over its own {probe_epochs:.3g} epochs and was still "
                     f"{share:.0%} of its peak at the planned epoch {planned:g}: for a plan that decays over its own "
                     "length these bits are likely an over-estimate (up to 1.5x on random facts, "
                     "docs/information.md); a probe of the planned length measures them")


def _absorbed(code: float, end_loss: float, per_token: float) -> float:
    return max(0.0, code - end_loss * per_token / math.log(2))


def _end_loss(arrays: Any, at: float, epoch: float) -> tuple[float, float]:
    """Token-weighted training loss of the steps ending within :data:`END_WINDOW` of an epoch before ``at`` (the
    last step ending at or before ``at`` when none does), and its standard error."""
    usable, seen = arrays.usable, arrays.seen
    window = usable & (seen <= at + 1e-9) & (seen > at - END_WINDOW * min(epoch, at))
    if not window.any():
        before = np.flatnonzero(usable & (seen <= at + 1e-9))
        window = np.zeros_like(usable)
        window[before[-1:] if before.size else np.flatnonzero(usable)[:1]] = True
    loss, tokens = arrays.loss[window], arrays.tokens[window]
    return float(np.sum(loss * tokens) / np.sum(tokens)), _mean_error(loss, tokens)


def _mean_error(values: np.ndarray, weights: np.ndarray) -> float:
    """Standard error of a weighted mean of per-step values (0 for a single step)."""
    if values.size < 2:
        return 0.0
    mean = np.average(values, weights=weights)
    spread = np.sqrt(np.average((values - mean) ** 2, weights=weights) * values.size / (values.size - 1))
    return float(spread / math.sqrt(values.size))


def extrapolate_epochs(per_epoch: Sequence[tuple[float, float]], last: float, probe_epochs: float, planned: float,
                       ceiling: float) -> float:
    """:math:`a(E)` at ``planned`` epochs from a probe of ``probe_epochs`` whose last reading is ``last``: along a
    power law fitted to the whole epochs from the second on with positive bits (the first epoch's reading measures
    only what one pass generalises, not what repetition memorises); proportional to the epochs
    (:data:`DEFAULT_EPOCH_EXPONENT`) when there are fewer than two such points. Never above ``ceiling``.

    Examples
    --------
    >>> extrapolate_epochs([(1, 0.0), (2, 10.0)], 10.0, 2.0, 8.0, ceiling=300.0)  # one point: proportional
    40.0
    >>> round(extrapolate_epochs([(1, 0.0), (2, 2.0), (4, 4.0)], 4.0, 4.0, 16.0, ceiling=300.0), 6)
    16.0
    """
    points = [(e, a) for e, a in per_epoch if e >= 2 and a > 0]
    slope = DEFAULT_EPOCH_EXPONENT
    if len(points) >= 2:
        slope = max(0.0, float(np.polyfit(np.log([e for e, _ in points]), np.log([a for _, a in points]), 1)[0]))
    return min(ceiling, last * (planned / probe_epochs) ** slope)


def _curve(per_epoch: tuple[tuple[float, float], ...]) -> str:
    return ", ".join(f"epoch {e:g}: {a:,.3g}" for e, a in per_epoch) or "no whole epoch"


def _schedule(rates: np.ndarray) -> str | None:
    """The probe's learning-rate schedule from its recorded per-step learning rates (None when not recorded)."""
    finite = rates[np.isfinite(rates) & (rates > 0)]
    if not finite.size:
        return None
    peak = float(finite.max())
    if finite.min() >= 0.9 * peak:
        return "constant"
    return "decaying" if finite[-1] < 0.5 * peak else "varying"


def _compare_recipes(planned: Recipe, probe: ProbeRecipe, notes: list[str]) -> None:
    """Say where the probe's learning rate or batch size differs from the plan, and which way that moves the bits."""
    if planned.learning_rate is not None:
        if probe.learning_rate is None:
            notes.append("the probe's run does not record its learning rate: it cannot be checked against the "
                         f"planned {planned.learning_rate:g}")
        else:
            ratio = probe.learning_rate / planned.learning_rate
            if not 1 / LR_TOLERANCE <= ratio <= LR_TOLERANCE:
                direction = "over" if ratio > 1 else "under"
                notes.append(f"the probe ran at learning rate {probe.learning_rate:g}, {ratio:.3g}x the planned "
                             f"{planned.learning_rate:g}: a higher learning rate absorbs more per epoch (on real text "
                             f"10x the learning rate gave 3.3x the bits at 2 epochs, issue 13), so these bits are "
                             f"likely an {direction}-estimate for the plan; record the probe at the planned learning "
                             "rate")
    if planned.batch_size is not None and probe.batch_size is not None:
        ratio = probe.batch_size / planned.batch_size
        if not 1 / LR_TOLERANCE <= ratio <= LR_TOLERANCE:
            notes.append(f"the probe's batch ({probe.batch_size:g} examples) differs from the planned "
                         f"{planned.batch_size:,}: fewer, larger steps absorb less per epoch; the bits are read as "
                         "measured")
