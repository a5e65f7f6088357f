"""The capacity forecast of a full fine-tuning recording: the bits its data asked for, how they grow with the
dataset size, and per candidate rank and LoRA target set the dataset size at which that LoRA runs out.

Every full fine-tuning recording is a probe of its own recipe: the bits per example come from the estimator
``lorascope recommend --probe`` uses (:func:`~lorascope.analysis.recipe.information_for_recipe`, the recording
read at its own last epoch), the growth with the dataset size from probes of several sizes
(:func:`~lorascope.analysis.recipe.bits_for_plan`), and the runway from the same capacity rule
(:func:`~lorascope.analysis.capacity.runway_range`). What this module adds is the LoRA parameter count read off
the recorded matrices (no model needed).

Growth. With one recording the bits grow linearly with the data beyond a one-time cost. With recordings at several
dataset sizes :math:`N_i` absorbing :math:`B_i` bits, a power law :math:`B(N) = B_{\\mathrm{ref}}
(N / N_{\\mathrm{ref}})^g` is fitted in log-log space and anchored at the largest recording; a LoRA holding
:math:`C = \\kappa P(r)` bits then runs out at

.. math:: N^*(r) = N_{\\mathrm{ref}} \\, (C / B_{\\mathrm{ref}})^{1/g}

Random facts at a fixed step budget grow linearly; real text, which generalises, grows sub-linearly, so the
linear rule forecasts too early a falloff on it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lorascope.analysis.capacity import REAL_TEXT_FINDING, CapacityConstant, RankPrediction, judge, runway_range
from lorascope.analysis.information import BitsEstimate
from lorascope.analysis.layers import TARGET_SETS
from lorascope.analysis.recipe import RecipeInformation, bits_for_plan
from lorascope.errors import InvalidOptionError

__all__ = ["ACTIVE_EXPERT_KEYS", "Forecast", "Matrix", "TargetForecast", "active_experts", "forecast",
           "lora_parameters_of", "matrices_of"]

ACTIVE_EXPERT_KEYS = ("num_experts_per_tok", "num_experts_per_token", "experts_per_token", "moe_topk", "top_k")


def active_experts(config: Mapping[str, Any] | None) -> int | None:
    """Experts routed per token, from a model config (a dict; a multimodal config's ``text_config`` first).

    >>> active_experts({"text_config": {"num_experts_per_tok": 2}}), active_experts({"hidden_size": 8})
    (2, None)
    """
    if not config:
        return None
    for section in (config.get("text_config") or {}, config):
        for key in ACTIVE_EXPERT_KEYS:
            value = section.get(key)
            if isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) > 0:
                return int(value)
    return None

@dataclass(frozen=True)
class Matrix:
    """A recorded matrix as a LoRA would adapt it: its kind, (out, in) shape, and the adapter it belongs to
    (the halves of a fused gate/up tensor share one adapter)."""

    kind: str
    out_features: int
    in_features: int
    adapter: str
    expert: int = -1


def matrices_of(modules: Mapping[str, Sequence[Any]]) -> list[Matrix]:
    """The recorded matrices as a LoRA would adapt them, from a run's modules table (a DataFrame, or any mapping
    of its columns ``kind``, ``out_features``, ``in_features``, ``module``, ``parameter``, ``expert``); the gate
    and up halves of a fused tensor share an adapter (one per expert).

    >>> matrices_of({"kind": ["mlp"], "out_features": [16], "in_features": [8], "module": ["up"],
    ...              "parameter": ["weight"], "expert": [-1]})
    [Matrix(kind='mlp', out_features=16, in_features=8, adapter='up.weight[-1]', expert=-1)]
    """
    return [Matrix(str(kind), int(out), int(inp), f"{module}.{parameter}[{expert}]", int(expert))
            for kind, out, inp, module, parameter, expert in zip(
                modules["kind"], modules["out_features"], modules["in_features"], modules["module"],
                modules["parameter"], modules["expert"])]


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
    total, by_kind = 0, dict[str, int]()
    for kind, out, inp, expert in adapters.values():
        r = max(1, rank // active_experts) if kind == "moe_expert" and expert >= 0 and active_experts else rank
        r = min(r, out, inp)  # PEFT allows a larger rank, but it adds nothing past the matrix's size
        total += r * (out + inp)
        by_kind[kind] = max(by_kind.get(kind, 0), r)
    return total, by_kind


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
    informations: tuple[RecipeInformation, ...]
    dataset_examples: float
    constant: CapacityConstant
    rows: list[TargetForecast]
    truth_bits_per_example: float | None = None
    notes: list[str] = field(default_factory=list)

    def row(self, target: str, rank: int) -> TargetForecast | None:
        return next((r for r in self.rows if r.target == target and r.prediction.rank == rank), None)

    def to_dict(self) -> dict[str, Any]:
        reference = self.bits.reference_examples or self.dataset_examples
        growth = {"exponent": self.bits.exponent, "reference_examples": reference,
                  "reference_bits": self.bits.bits(reference),
                  "points": [[float(i.dataset_examples), i.absorbed_bits] for i in self.informations],
                  "source": self.bits.growth_source}
        return {"bits": self.bits.to_dict(), "bits_to_learn": self.bits.bits(self.dataset_examples),
                "growth": growth, "dataset_examples": self.dataset_examples,
                "recordings": [i.to_dict() for i in self.informations],
                "constant": self.constant.to_dict(), "rows": [r.to_dict() for r in self.rows],
                "truth_bits_per_example": self.truth_bits_per_example, "notes": list(self.notes)}


def forecast(informations: Sequence[RecipeInformation], matrices: Sequence[Matrix], ranks: Sequence[int], *,
             constant: CapacityConstant | None = None, targets: Mapping[str, Sequence[str]] = TARGET_SETS,
             active_experts: int | None = None, truth_bits_per_example: float | None = None) -> Forecast:
    """Per target set and rank, the dataset size at which a LoRA runs out, from the recordings' information.

    Parameters
    ----------
    informations : sequence of RecipeInformation
        One per full fine-tuning recording of the same model and data, each read at its own recipe
        (:func:`~lorascope.analysis.recipe.information_as_run`).
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
    >>> from lorascope.analysis.recipe import ProbeRecipe, Recipe
    >>> info = RecipeInformation(7.8, 0.0, 0.0, 8.0, 0.01, 1.0, 100, 4.0, False, False, (), ProbeRecipe(4.0, None, 10),
    ...                          Recipe(epochs=4), "loss tokens")
    >>> f = forecast([info], [Matrix("mlp", 16, 8, "up")], [1, 4])
    >>> [(r.target, r.prediction.rank, round(r.prediction.runway_examples)) for r in f.rows]
    [('all-linear', 1, 2), ('all-linear', 4, 8), ('mlp-only', 1, 2), ('mlp-only', 4, 8)]
    """
    if not informations:
        raise InvalidOptionError("The 'informations' parameter of forecast must hold at least one recording's "
                                 "information. Got none instead.")
    constant = constant or CapacityConstant.default()
    bits = bits_for_plan(informations)
    dataset = float(max(i.dataset_examples for i in informations))
    rows = []
    for target, kinds in targets.items():
        if not any(m.kind in kinds for m in matrices):
            continue
        for rank in ranks:
            count, by_kind = lora_parameters_of(matrices, kinds, rank, active_experts)
            rows.append(TargetForecast(target, _prediction(rank, count, by_kind, bits, dataset, constant)))
    notes = []
    if bits.upper_bound:
        notes.append("the recording absorbed less than it resolves: the bits are that resolution, an upper bound, so "
                     "the falloff may come later")
    if truth_bits_per_example is None:  # data of unknown information: what the real-text study found applies
        notes.append(f"the forecast is {REAL_TEXT_FINDING}")
    return Forecast(bits, tuple(informations), dataset, constant, rows, truth_bits_per_example, notes)


def _prediction(rank: int, count: int, by_kind: dict[str, int], bits: BitsEstimate, dataset: float,
                constant: CapacityConstant) -> RankPrediction:
    capacity = constant.capacity_bits(count)
    runway, low, high = runway_range(capacity, bits, constant.uncertainty_at(count))
    verdict = judge(dataset, runway, runway / low if low > 0 else math.inf)
    if verdict == "fits":
        reason = f"fits at {dataset:,.0f} examples, runs out at ~{runway:,.0f} ({low:,.0f} to {high:,.0f})"
    elif verdict == "exceeded":
        reason = (f"would have fallen off at ~{runway:,.0f} examples ({low:,.0f} to {high:,.0f}), before "
                  f"{dataset:,.0f}; past it: {constant.past_capacity()}")
    else:
        reason = f"at risk: runs out at ~{runway:,.0f} examples ({low:,.0f} to {high:,.0f}), near {dataset:,.0f}"
    return RankPrediction(int(rank), dict(by_kind), int(count), capacity, runway, low, high, None, verdict,
                          f"{count:,} parameters x {constant.bits_per_parameter_at(count):.3g} bits = "
                          f"{capacity:,.0f} bits; "
                          f"the data asks {bits.bits_per_example:,.3g} bits per example; {reason}")
