"""LoRA capacity in bits, the dataset size at which a rank runs out, and a verdict per rank.

The information view (Schulman et al., "LoRA Without Regret", 2025; Allen-Zhu & Li, 2025): a LoRA of rank r
holds about :math:`\\kappa P(r)` bits, with :math:`P(r)` its parameter count and :math:`\\kappa` bits per LoRA
parameter; data asking :math:`b` bits per example fills it at

.. math:: N^*(r) = \\kappa P(r) / b

examples (the *runway*). Past it the loss curves of LoRA and full fine-tuning part; whether the adapter then holds
on to what it learned (a plateau) or loses it (a collapse) is measured by ``lorascope calibrate``'s bracket, not
assumed. :math:`\\kappa` is known only to a factor :math:`u` (:class:`CapacityConstant`), so the runway is a
range :math:`[N^*/u, N^* u]` and a dataset of N examples gets the verdict

- ``fits`` when :math:`N \\le N^*/u`,
- ``exceeded`` when :math:`N > N^* u`,
- ``at risk`` in between.

A calibrated constant may vary with the adapter's size, :math:`\\kappa(P)`
(:class:`~lorascope.analysis.capacity_fit.KappaFit`): the capacity of a rank is then
:meth:`CapacityConstant.capacity_bits` :math:`= \\kappa(P) P`, and outside the measured range its uncertainty
widens (:meth:`CapacityConstant.uncertainty_at`). An ``exceeded`` verdict also says what was measured past
capacity (:meth:`CapacityConstant.past_capacity`): a collapse, a plateau, or that it was not measured.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lorascope.analysis.capacity_fit import (
    CapacityBracket,
    KappaFit,
    SaturatingCapacity,
    fit_saturating,
    interpolate_kappa,
    probes_extrapolation,
)
from lorascope.analysis.information import BitsEstimate
from lorascope.errors import InvalidOptionError

__all__ = [
    "DEFAULT_BITS_PER_PARAMETER",
    "DEFAULT_UNCERTAINTY",
    "PAST_CAPACITY_FINDING",
    "REAL_TEXT_FINDING",
    "CapacityConstant",
    "RankPrediction",
    "judge",
    "predict_ranks",
    "rank_needed",
    "runway_range",
    "smallest_rank_holding",
]

DEFAULT_BITS_PER_PARAMETER = 0.69
"""Bits stored per LoRA parameter when no calibration is given: the median measured by
``python examples/capacity/default_constant.py`` (docs/capacity.md has the table)."""
DEFAULT_UNCERTAINTY = 2.0
"""The default constant is only known to a factor of 2 on an architecture it was not measured on."""
VERDICTS = ("fits", "at risk", "exceeded")
REAL_TEXT_FINDING = (
    "measured so far on memorised facts (runways within 1.5x) and on SmolLM2-135M memorising real text in a fixed 64 "
    "or 128 steps (docs/realdata_smollm2.md). With kappa from random facts at a plateau: within 2x at rank 1 on both "
    "tasks, 0.9-2.4x at rank 4, 5.2-5.6x late at rank 16 in 64 steps and at 128 steps 0.81x / 0.95x / 2.4x at ranks "
    "1 / 4 / 16 (a short run fills less of a large adapter). With kappa from LoRA probes of ranks 1, 2 and 4 on a "
    "slice of the data at the run's 128 steps: 1.24x / 0.96x / 1.46x at ranks 1 / 4 / 16 and 4.1x late at rank 64 "
    "(predicted before its runs: past the probed ranks capacity grew more slowly than their trend; read as a "
    "capacity saturating with the adapter's size, as lorascope now reads probes, every falloff of these studies "
    "came within 0.60-1.23x, post hoc, and 0.50-1.20x written first on SFT in 128 steps, early at ranks 16 and 32, "
    "where probes of ranks 4 and 16 then put rank 8 at 1.02x (on continued pretraining in 128 steps they put rank 8 "
    "at 0.96x) and probes of ranks 16 and 32 put rank 64 at 0.89x, all written first), while rank 32, between "
    "probes of ranks 16 and 64, came within 0.89x (predicted first too); on SFT in 64 steps, every forecast "
    "written before any LoRA run, probes of ranks 1, 2 and 4 gave 1.25x / 1.60x at ranks 4 / 16 (kappa from facts "
    "2.0x / 5.1x) and probes of ranks 16 and 64 put rank 32 at 0.75x; on continued pretraining in 64 steps, also "
    "written first, 1.10x / 1.11x at ranks 4 / 16 (facts 1.84x / 4.28x) and 0.74x at rank 32; so probe the ranks "
    "you will choose between, at the planned step budget (probes of half or twice it put falloffs 0.3-2.1x off); "
    "full probes run above their stable learning rate (a first-epoch loss spike, noted) put the forecast at "
    "0.13x-0.57x on SFT. With a short recipe on real text (4 epochs) both of lorascope's "
    "real-data studies (docs/realdata.md, docs/realdata_smollm2.md) had LoRA hold a share of full fine-tuning's gain "
    "set by its rank, below 90% already at 64 examples, rather than keep up until a runway; read a runway as "
    "optimistic, the more so at high rank and few steps, and a verdict as a rough guide")
"""What this project measured against the forecast on real text, said wherever a forecast is shown."""
PAST_CAPACITY_FINDING = (
    "not measured on this base (lorascope calibrate brackets it); on random facts this project saw a LoRA hold almost "
    "nothing at ~2x its capacity at a fixed step budget (issue 13), and, trained 300 epochs, a plateau to ~5x its "
    "capacity then almost nothing by ~8x (docs/capacity.md)")
"""What is expected past a rank's runway when no calibration measured it."""


@dataclass(frozen=True)
class CapacityConstant:
    """Bits per LoRA parameter :math:`\\kappa`, its multiplicative uncertainty :math:`u \\ge 1`, and its source.

    Attributes
    ----------
    bits_per_parameter : float
        One value of :math:`\\kappa` for printing and JSON: the constant itself when ``fit`` is None, else the
        calibration's median over the ranks it measured.
    uncertainty : float
        :math:`u` inside the measured range (:meth:`uncertainty_at` widens it outside).
    source : str
    fit : KappaFit, optional
        :math:`\\kappa(P)` fitted by ``lorascope calibrate`` over several ranks; None: flat.
    bracket : CapacityBracket, optional
        What one calibrated adapter held below and above its capacity; None: not measured.
    measured : tuple of (P, kappa)
        LoRA probes' own values, read at their step budget: what an adapter holds is then the saturating capacity
        fitted through them (:attr:`saturating`), or, where kappa does not fall with P, log-log lines between the
        probes with the end segments continued (:func:`interpolate_kappa`). Empty: the fit, held at its ends outside
        the measured range.
    """

    bits_per_parameter: float
    uncertainty: float
    source: str
    fit: KappaFit | None = None
    bracket: CapacityBracket | None = None
    measured: tuple[tuple[float, float], ...] = ()

    def __post_init__(self) -> None:
        if not self.bits_per_parameter > 0 or not math.isfinite(self.bits_per_parameter):
            raise InvalidOptionError(f"bits per LoRA parameter must be a positive number. Got "
                                     f"{self.bits_per_parameter!r} instead.")
        if not self.uncertainty >= 1 or not math.isfinite(self.uncertainty):
            raise InvalidOptionError(f"the uncertainty factor must be a number >= 1. Got {self.uncertainty!r} instead.")

    @classmethod
    def default(cls) -> CapacityConstant:
        return cls(DEFAULT_BITS_PER_PARAMETER, DEFAULT_UNCERTAINTY,
                   "lorascope's default, measured on small Markov-pretrained Llama models (docs/capacity.md)")

    @classmethod
    def from_calibration(cls, calibration: Any) -> CapacityConstant:
        """From a :class:`~lorascope.workflows.calibrate.Calibration` of this architecture: its median, its
        uncertainty, its fit :math:`\\kappa(P)` (when it has one) and its capacity bracket.

        Raises
        ------
        InvalidOptionError
            No rank of the calibration learned the facts.
        """
        if not any(p.learned for p in calibration.points):
            raise InvalidOptionError(
                "The calibration has no rank whose adapter learned the facts (each held under 5% of the bits offered), "
                "so it measures no capacity; rerun lorascope calibrate with more --epochs or another --lr.")
        ranks = ", ".join(str(p.rank) for p in calibration.points)
        fit = calibration.fit
        probes = bool(getattr(calibration, "from_lora_probes", False))
        measured = tuple(sorted((float(p.lora_parameters), p.bits_per_parameter) for p in calibration.points
                                if p.learned and p.bits_stored > 0)) if probes else ()
        saturating = fit_saturating(measured) if measured else None
        if saturating is not None:
            law = ("; kappa(P) = " + ", ".join(f"{k:.3g} at {p:,.0f}" for p, k in measured) + " LoRA parameters; "
                   f"capacity saturating through them, {saturating.kappa0:.3g} bits per parameter for a small "
                   f"adapter and at most {saturating.ceiling:,.0f} bits at any rank in these steps")
        elif measured:
            law = "; kappa(P) = " + ", ".join(f"{k:.3g} at {p:,.0f}" for p, k in measured) + (
                " LoRA parameters, log-log between the probes, their trend continued outside")
        elif fit is not None:
            law = (f"; kappa(P) = {fit.at(fit.parameters_low):.3g} at {fit.parameters_low:,.0f} to "
                   f"{fit.at(fit.parameters_high):.3g} at {fit.parameters_high:,.0f} LoRA parameters "
                   f"(P^{fit.exponent:+.2f}), held at the nearest end outside")
        else:
            law = ""
        steps = getattr(calibration, "steps", None)
        budget = f" at a budget of {steps:,} steps" if steps else ""
        how = "measured by LoRA probes on this data" if probes else "calibrated on this architecture"
        return cls(calibration.bits_per_parameter, calibration.uncertainty,
                   f"{how} at rank(s) {ranks}{budget} ({calibration.created or 'undated'}){law}",
                   fit=fit, bracket=calibration.bracket, measured=measured)

    @property
    def collapse(self) -> float | None:
        """The load, as a multiple of the adapter's capacity, at which ``calibrate`` measured it to collapse (hold
        under half of its most); None when no collapse was measured (a plateau, or no bracket)."""
        if self.bracket is None or self.bracket.finding != "collapse":
            return None
        return self.bracket.multiple(self.bracket.examined_load)

    def bits_per_parameter_at(self, parameters: float) -> float:
        """:math:`\\kappa(P)`: from the ``measured`` probes when there are any (:attr:`saturating`, else through
        them), else the fit at ``parameters`` (held at the nearest measured end outside the measured range), or the
        flat constant.

        >>> CapacityConstant(0.69, 2.0, "flat").bits_per_parameter_at(1e6)
        0.69
        """
        if self.saturating is not None:
            return self.saturating.bits(parameters) / float(parameters)
        if self.measured:
            return interpolate_kappa(self.measured, parameters)
        return self.bits_per_parameter if self.fit is None else self.fit.at(parameters)

    @functools.cached_property
    def saturating(self) -> SaturatingCapacity | None:
        """The saturating capacity through the ``measured`` probes (:func:`fit_saturating`), None without probes or
        when their kappa does not fall with P. Beyond the probes it forecast SmolLM2's falloffs within 0.60-1.23x
        where continuing the probes' trend gave up to 4.1x (post hoc), and 0.50-1.20x written first on a new study
        (docs/capacity.md, "Capacity at a step budget")."""
        return fit_saturating(self.measured) if self.measured else None

    def capacity_bits(self, parameters: float) -> float:
        """Bits an adapter of ``parameters`` LoRA parameters holds: :math:`\\kappa(P)\\,P`.

        >>> CapacityConstant(0.5, 2.0, "flat").capacity_bits(1000)
        500.0
        """
        return self.bits_per_parameter_at(parameters) * float(parameters)

    def uncertainty_at(self, parameters: float) -> float:
        """:math:`u(P)`: the uncertainty, widened outside the measured range by the factor the fitted power law
        would move :math:`\\kappa` there (:meth:`KappaFit.extrapolation`), so that the range covers both the held
        value and the trend continuing; through ``measured`` probes, by the factor their end segment moves it."""
        if self.measured:
            return self.uncertainty * probes_extrapolation(self.measured, parameters)
        return self.uncertainty if self.fit is None else self.uncertainty * self.fit.extrapolation(parameters)

    def past_capacity(self) -> str:
        """What is expected past a rank's runway: the calibration's bracket, or that it was not measured."""
        b = self.bracket
        if b is None or b.finding in ("not learned", "growing"):
            why = "" if b is None else (f" (calibrate's bracket did not reach capacity: rank {b.rank}'s held bits "
                                        f"{'were zero' if b.finding == 'not learned' else 'still grew'} up to "
                                        f"{b.loads[-1]:g} bits offered per parameter)")
            return f"past capacity: {PAST_CAPACITY_FINDING}{why}"
        where = (f"at ~{b.multiple(b.examined_load):.2g}x its capacity the rank-{b.rank} adapter held "
                 f"{b.examined_share:.0%} of what it held at capacity, measured by calibrate")
        return f"collapse: {where}" if b.finding == "collapse" else f"a plateau: {where}"

    def to_dict(self) -> dict[str, Any]:
        return {"bits_per_parameter": self.bits_per_parameter, "uncertainty": self.uncertainty,
                "source": self.source, "fit": None if self.fit is None else self.fit.to_dict(),
                "measured": [list(point) for point in self.measured],
                "collapse": self.collapse, "bracket": None if self.bracket is None else self.bracket.to_dict(),
                "past_capacity": self.past_capacity()}


@dataclass(frozen=True)
class RankPrediction:
    """The capacity of one candidate rank against the dataset."""

    rank: int
    ranks_by_kind: dict[str, int]
    lora_parameters: int
    capacity_bits: float
    runway_examples: float
    runway_low: float
    runway_high: float
    tinker_runway_examples: float | None
    verdict: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "ranks_by_kind": dict(self.ranks_by_kind), "lora_parameters": self.lora_parameters,
                "capacity_bits": self.capacity_bits, "runway_examples": self.runway_examples,
                "runway_range": [self.runway_low, self.runway_high],
                "tinker_runway_examples": self.tinker_runway_examples, "verdict": self.verdict,
                "reason": self.reason}


def judge(examples: float, runway: float, uncertainty: float) -> str:
    """The verdict for ``examples`` against a runway known to a factor ``uncertainty``.

    Examples
    --------
    >>> judge(1000, 4000, 2.0), judge(3000, 4000, 2.0), judge(9000, 4000, 2.0)
    ('fits', 'at risk', 'exceeded')
    """
    if examples <= runway / uncertainty:
        return "fits"
    if examples > runway * uncertainty:
        return "exceeded"
    return "at risk"


def predict_ranks(ranks: Sequence[int], parameters: Callable[[int], tuple[int, dict[str, int]]], *, examples: float,
                  bits: BitsEstimate, constant: CapacityConstant, trained_tokens_per_example: float | None = None,
                  holding: Callable[[int], int] | None = None) -> list[RankPrediction]:
    """A :class:`RankPrediction` per candidate rank.

    Parameters
    ----------
    ranks : sequence of int
    parameters : callable
        ``rank -> (LoRA parameters, ranks by kind)`` for the chosen target set.
    examples : float
        The dataset size the verdict is for.
    bits : BitsEstimate
        Bits per example of this data.
    constant : CapacityConstant
    trained_tokens_per_example : float, optional
        For the Tinker rule of thumb (LoRA parameters >= trained tokens): its runway
        :math:`P(r) / T` is shown beside the information runway.
    holding : callable, optional
        ``rank -> LoRA parameters that can hold bits`` when fewer than all: past a matrix's min(in, out) a rank
        adds parameters but nothing a full update lacks. Default: all of them.

    Examples
    --------
    >>> from lorascope.analysis.information import information_from_size
    >>> bits = information_from_size(examples=5000, tokens_per_example=10)
    >>> [p.verdict for p in predict_ranks([1, 64, 256], lambda r: (1000 * r, {"mlp": r}), examples=5000, bits=bits,
    ...                                   constant=CapacityConstant(1.0, 2.0, "test"))]
    ['exceeded', 'at risk', 'fits']
    """
    out = []
    for rank in ranks:
        count, by_kind = parameters(rank)
        held = holding(rank) if holding is not None else count
        capacity = constant.capacity_bits(held)
        runway, low, high = runway_range(capacity, bits, constant.uncertainty_at(held))
        verdict = judge(examples, runway, runway / low if low > 0 else math.inf)
        tinker = count / trained_tokens_per_example if trained_tokens_per_example else None
        past = f" ({count - held:,} more past the matrices' size hold nothing)" if held < count else ""
        reason = (f"{held:,} parameters{past} x {constant.bits_per_parameter_at(held):.3g} bits = "
                  f"{capacity:,.0f} bits; "
                  f"the data asks {bits.bits_per_example:,.3g} bits per example, so rank {rank} holds "
                  f"~{runway:,.0f} examples ({low:,.0f} to {high:,.0f}) against {examples:,.0f}")
        fit = constant.fit
        if constant.measured and not constant.measured[0][0] <= held <= constant.measured[-1][0]:
            how = "the probes' saturating capacity" if constant.saturating is not None else "the probes' trend"
            reason += (f" (outside the probed {constant.measured[0][0]:,.0f} to {constant.measured[-1][0]:,.0f} LoRA "
                       f"parameters: kappa extrapolated by {how}, the range widened by the factor the probes' end "
                       f"trend moves it, x{probes_extrapolation(constant.measured, held):.2g})")
        elif fit is not None and not constant.measured and not fit.parameters_low <= held <= fit.parameters_high:
            reason += (f" (outside the calibrated {fit.parameters_low:,.0f} to {fit.parameters_high:,.0f} LoRA "
                       f"parameters: kappa held at the nearest end, the range widened x{fit.extrapolation(held):.2g})")
        if verdict == "exceeded":
            reason += f"; past the runway (~{examples / runway:.2g}x): {constant.past_capacity()}"
        out.append(RankPrediction(int(rank), dict(by_kind), int(count), capacity, runway, low, high, tinker,
                                  verdict, reason))
    return out


def runway_range(capacity: float, bits: BitsEstimate, uncertainty: float) -> tuple[float, float, float]:
    """The dataset size whose bits fill ``capacity``, and its range: the capacity known to a factor
    ``uncertainty`` and the bits to one standard error (:attr:`BitsEstimate.relative_error`), through the bits'
    growth law (:meth:`BitsEstimate.examples_for`).

    Examples
    --------
    >>> from lorascope.analysis.information import BitsEstimate
    >>> runway_range(1000.0, BitsEstimate(2.0, "test", "test", False, "", one_time_bits=200.0), 2.0)
    (400.0, 150.0, 900.0)
    """
    factor = uncertainty * (1.0 + bits.relative_error)
    return bits.examples_for(capacity), bits.examples_for(capacity / factor), bits.examples_for(capacity * factor)


def rank_needed(examples: float, bits: BitsEstimate, constant: CapacityConstant,
                parameters: Callable[[int], tuple[int, dict[str, int]]], *, max_rank: int = 65536,
                holding: Callable[[int], int] | None = None) -> int | None:
    """The smallest power-of-two rank whose whole runway range covers ``examples`` (verdict ``fits``), or None
    when even ``max_rank`` does not (``holding`` as in :func:`predict_ranks`).

    Examples
    --------
    >>> from lorascope.analysis.information import information_from_size
    >>> bits = information_from_size(examples=5000, tokens_per_example=10)
    >>> rank_needed(5000, bits, CapacityConstant(1.0, 2.0, "test"), lambda r: (1000 * r, {}))
    128
    """
    rank = 1
    while rank <= max_rank:
        count = holding(rank) if holding is not None else parameters(rank)[0]
        runway, low, _ = runway_range(constant.capacity_bits(count), bits, constant.uncertainty_at(count))
        if judge(examples, runway, runway / low if low > 0 else math.inf) == "fits":
            return rank
        rank *= 2
    return None


def smallest_rank_holding(bits: float, capacity_at: Callable[[int], float], max_rank: int) -> int | None:
    """The smallest rank r in [1, ``max_rank``] with ``capacity_at(r) >= bits`` (binary search: capacity grows with
    r); 0 when there are no bits to hold, None when even ``max_rank`` does not hold them.

    Examples
    --------
    >>> smallest_rank_holding(1000.0, lambda r: 0.5 * 300 * r, 64), smallest_rank_holding(1e9, lambda r: r, 64)
    (7, None)
    """
    if bits <= 0:
        return 0
    if max_rank < 1 or capacity_at(max_rank) < bits:
        return None
    low, high = 1, max_rank
    while low < high:
        mid = (low + high) // 2
        if capacity_at(mid) >= bits:
            high = mid
        else:
            low = mid + 1
    return low
