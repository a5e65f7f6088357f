"""The capacity forecast of a full fine-tuning recording: the bits its data asked for, how they grow with the
dataset size, and per candidate rank and LoRA target set the dataset size at which that LoRA runs out.

Every full fine-tuning recording is a probe: the bits per example come from the same estimator
``lorascope recommend --probe`` uses (:meth:`~lorascope.analysis.information.RecordedInformation.estimate`), and
the runway from the same capacity rule (:func:`~lorascope.analysis.capacity.predict_ranks`). What this module
adds is the LoRA parameter count read off the recorded matrices (no model needed) and, from several
recordings of the same model on growing datasets, the growth law of the absorbed bits.

Growth. With one recording the bits grow linearly with the data (each additional example asks ``b`` bits). With
recordings at several dataset sizes :math:`N_i` absorbing :math:`B_i` bits, a power law
:math:`B(N) = B_{\\mathrm{ref}} (N / N_{\\mathrm{ref}})^g` is fitted in log-log space and anchored at the
largest recording (:math:`B_{\\mathrm{ref}} = b N_{\\mathrm{ref}}`); a LoRA holding :math:`C = \\kappa P(r)` bits then
runs out at

.. math:: N^*(r) = N_{\\mathrm{ref}} \\, (C / B_{\\mathrm{ref}})^{1/g}

which is :math:`C / b` for :math:`g = 1`. Random facts grow linearly; real text, which generalises, grows
sub-linearly, so the linear rule forecasts too early a falloff on it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lorascope.analysis.capacity import REAL_TEXT_FINDING, CapacityConstant, RankPrediction, judge
from lorascope.analysis.information import BitsEstimate, RecordedInformation
from lorascope.analysis.layers import TARGET_SETS
from lorascope.errors import InvalidOptionError

__all__ = ["Forecast", "GrowthLaw", "Matrix", "TargetForecast", "bits_growth", "forecast",
           "lora_parameters_of"]



@dataclass(frozen=True)
class Matrix:
    """A recorded matrix as a LoRA would adapt it: its kind, (out, in) shape, and the adapter it belongs to
    (the halves of a fused gate/up tensor share one adapter)."""

    kind: str
    out_features: int
    in_features: int
    adapter: str
    expert: int = -1


def lora_parameters_of(matrices: Sequence[Matrix], kinds: Sequence[str], rank: int,
                       active_experts: int | None = None) -> tuple[int, dict[str, int]]:
    """LoRA parameters of rank ``rank`` on the matrices of the given kinds, and the rank used per kind.

    An adapter of rank :math:`r` on an (out, in) matrix has :math:`r(\\mathrm{out} + \\mathrm{in})` parameters;
    the halves of a fused tensor form one adapter (their rows add up); MoE experts get rank
    :math:`\\max(1, r / \\mathrm{active})` each, as :func:`lorascope.recommend` allocates them.

    Examples
    --------
    >>> m = [Matrix("attention", 8, 8, "q"), Matrix("mlp", 16, 8, "up"), Matrix("head", 50, 8, "lm_head")]
    >>> lora_parameters_of(m, ("attention", "mlp"), rank=2)
    (80, {'attention': 2, 'mlp': 2})
    """
    adapters: dict[str, list[Any]] = {}
    for m in matrices:
        if m.kind in kinds:
            entry = adapters.setdefault(m.adapter, [m.kind, 0, m.in_features, m.expert])
            entry[1] += m.out_features
    total, by_kind = 0, {}
    for kind, out, inp, expert in adapters.values():
        r = max(1, rank // active_experts) if kind == "moe_expert" and expert >= 0 and active_experts else rank
        r = min(r, out, inp)  # PEFT allows a larger rank, but it adds nothing past the matrix's size
        total += r * (out + inp)
        by_kind[kind] = max(by_kind.get(kind, 0), r)
    return total, by_kind


@dataclass(frozen=True)
class GrowthLaw:
    """How the absorbed bits grow with the dataset size: :math:`B(N) = B_{\\mathrm{ref}} (N/N_{\\mathrm{ref}})^g`."""

    exponent: float
    reference_examples: float
    reference_bits: float
    points: tuple[tuple[float, float], ...]
    source: str

    def bits(self, examples: float) -> float:
        return self.reference_bits * (examples / self.reference_examples) ** self.exponent

    def examples_for(self, bits: float) -> float:
        """The dataset size whose data asks ``bits`` bits."""
        return self.reference_examples * (bits / self.reference_bits) ** (1.0 / self.exponent)

    def to_dict(self) -> dict[str, Any]:
        return {"exponent": self.exponent, "reference_examples": self.reference_examples,
                "reference_bits": self.reference_bits, "points": [list(p) for p in self.points],
                "source": self.source}


def bits_growth(informations: Sequence[RecordedInformation], bits: BitsEstimate) -> GrowthLaw:
    """The growth law of the bits with the dataset size, anchored at the largest recording.

    Linear (exponent 1) from one dataset size; fitted in log-log space (least squares on the absorbed bits of
    each recording, description length where a recording did not repeat its data) from two or more.
    """
    largest = max(informations, key=lambda i: i.epoch_examples)
    reference = float(largest.epoch_examples)
    anchor = bits.bits_per_example * reference
    points = sorted({(float(i.epoch_examples), _total_bits(i)) for i in informations})
    usable = [(n, b) for n, b in points if n > 0 and b > 0 and math.isfinite(b)]
    if len({n for n, _ in usable}) < 2:
        return GrowthLaw(1.0, reference, anchor, tuple(points),
                         "assumed linear from one dataset size; record the same model on 2+ sizes to measure it")
    x, y = np.log([n for n, _ in usable]), np.log([b for _, b in usable])
    exponent = float(np.polyfit(x, y, 1)[0])
    if not exponent > 0:
        return GrowthLaw(1.0, reference, anchor, tuple(points),
                         f"linear: the bits did not grow with the data across the recordings (fitted exponent "
                         f"{exponent:.2f})")
    return GrowthLaw(exponent, reference, anchor, tuple(points),
                     f"fitted on {len(usable)} dataset sizes ({usable[0][0]:,.0f} to {usable[-1][0]:,.0f} examples)")


def _total_bits(information: RecordedInformation) -> float:
    if information.absorbed_bits is not None and information.epochs > 1.0:
        return float(information.absorbed_bits)
    return float(information.description_length_bits)


@dataclass(frozen=True)
class TargetForecast:
    """One LoRA target set at one rank: its capacity and where it runs out."""

    target: str
    prediction: RankPrediction

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, **self.prediction.to_dict()}


@dataclass(frozen=True)
class Forecast:
    """The forecast of a recording (or of several on growing datasets)."""

    bits: BitsEstimate
    growth: GrowthLaw
    dataset_examples: float
    constant: CapacityConstant
    rows: list[TargetForecast]
    truth_bits_per_example: float | None = None
    notes: list[str] = field(default_factory=list)

    def row(self, target: str, rank: int) -> TargetForecast | None:
        return next((r for r in self.rows if r.target == target and r.prediction.rank == rank), None)

    def to_dict(self) -> dict[str, Any]:
        return {"bits": self.bits.to_dict(), "bits_to_learn": self.growth.bits(self.dataset_examples),
                "growth": self.growth.to_dict(), "dataset_examples": self.dataset_examples,
                "constant": self.constant.to_dict(), "rows": [r.to_dict() for r in self.rows],
                "truth_bits_per_example": self.truth_bits_per_example, "notes": list(self.notes)}


def forecast(informations: Sequence[RecordedInformation], matrices: Sequence[Matrix], ranks: Sequence[int], *,
             constant: CapacityConstant | None = None, targets: Mapping[str, Sequence[str]] = TARGET_SETS,
             active_experts: int | None = None, truth_bits_per_example: float | None = None) -> Forecast:
    """Per target set and rank, the dataset size at which a LoRA runs out, from the recordings' information.

    Parameters
    ----------
    informations : sequence of RecordedInformation
        One per full fine-tuning recording of the same model and data (:func:`information_from_steps`).
    matrices : sequence of Matrix
        The recorded matrices (one recording's; they are the same model).
    ranks : sequence of int
    constant : CapacityConstant, optional
        Bits per LoRA parameter (default: lorascope's measured default).
    targets : mapping
        Target set name -> kinds it adapts; a set with no recorded matrix is left out.
    active_experts : int, optional
        Experts routed per token (MoE expert adapters get rank / active).
    truth_bits_per_example : float, optional
        The known information of a synthetic task, shown beside the estimate.

    Examples
    --------
    >>> info = RecordedInformation(800.0, 780.0, 100, 10, 4.0, 0.01, "loss tokens", 8.0, 7.8)
    >>> f = forecast([info], [Matrix("mlp", 16, 8, "up")], [1, 4])
    >>> [(r.target, r.prediction.rank, round(r.prediction.runway_examples)) for r in f.rows]
    [('all-linear', 1, 2), ('all-linear', 4, 8), ('mlp-only', 1, 2), ('mlp-only', 4, 8)]
    """
    if not informations:
        raise InvalidOptionError("The 'informations' parameter of forecast must hold at least one recording's "
                                 "information. Got none instead.")
    constant = constant or CapacityConstant.default()
    largest = max(informations, key=lambda i: i.epoch_examples)
    bits = largest.estimate()
    growth = bits_growth(informations, bits)
    dataset = float(largest.epoch_examples)
    rows = []
    for target, kinds in targets.items():
        if not any(m.kind in kinds for m in matrices):
            continue
        for rank in ranks:
            count, by_kind = lora_parameters_of(matrices, kinds, rank, active_experts)
            rows.append(TargetForecast(target, _prediction(rank, count, by_kind, growth, bits, dataset, constant)))
    notes = []
    if bits.upper_bound:
        notes.append("the bits are an upper bound (the recording saw its data once): the falloff may come later")
    if truth_bits_per_example is None:  # data of unknown information: what the real-text study found applies
        notes.append(f"the forecast is {REAL_TEXT_FINDING}")
    return Forecast(bits, growth, dataset, constant, rows, truth_bits_per_example, notes)


def _prediction(rank: int, count: int, by_kind: dict[str, int], growth: GrowthLaw, bits: BitsEstimate,
                dataset: float, constant: CapacityConstant) -> RankPrediction:
    capacity = constant.bits_per_parameter * count
    runway = growth.examples_for(capacity)
    low = growth.examples_for(capacity / constant.uncertainty)
    high = growth.examples_for(capacity * constant.uncertainty)
    verdict = judge(dataset, runway, runway / low if low > 0 else constant.uncertainty)
    if verdict == "fits":
        reason = f"fits at {dataset:,.0f} examples, runs out at ~{runway:,.0f} ({low:,.0f} to {high:,.0f})"
    elif verdict == "exceeded":
        reason = f"would have fallen off at ~{runway:,.0f} examples ({low:,.0f} to {high:,.0f}), before {dataset:,.0f}"
    else:
        reason = f"at risk: runs out at ~{runway:,.0f} examples ({low:,.0f} to {high:,.0f}), near {dataset:,.0f}"
    return RankPrediction(int(rank), dict(by_kind), int(count), capacity, runway, low, high, None, verdict,
                          f"{count:,} parameters x {constant.bits_per_parameter:.3g} bits = {capacity:,.0f} bits; "
                          f"the data asks {bits.bits_per_example:,.3g} bits per example; {reason}")
