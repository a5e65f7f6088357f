"""Per-kind (and per-layer) contributions: what each part of a full fine-tuning update is worth, and which part's
LoRA runs out first.

The recorder (``contributions=True``, lorascope/record/contributions.py) measures on a held batch the loss now
:math:`L`, with every recorded matrix at its start value :math:`L_0`, and with the matrices of one part
:math:`k` (a kind, or a transformer layer) reverted :math:`L_{-k}`. The share of the loss reduction part
:math:`k` accounts for is

.. math:: c_k = \\frac{L_{-k} - L}{L_0 - L}

and the interaction :math:`1 - \\sum_k c_k` (over kinds) is what no single part accounts for alone: 0 when the
parts' effects add up, positive when they overlap or need each other. It is reported, never spread over the
parts. A share is undefined (NaN) when the update did not lower the held loss (:math:`L_0 - L \\le 0`) or a
loss is not finite.

Bits. Part :math:`k` is attributed :math:`\\max(c_k, 0)\\,B` of the :math:`B` bits the forecast says the data
asks (:mod:`lorascope.analysis.forecast`). Its LoRA of rank :math:`r` holds :math:`\\kappa P_k(r)` bits
(:math:`P_k(r)` its LoRA parameters, :math:`\\kappa` bits per parameter); its runway is
:math:`\\kappa P_k(r) / (c_k B)` (above 1: it holds its share), the rank it needs is the smallest :math:`r` whose
capacity holds its bits, and the part that runs out first at rank :math:`r` is the one with the smallest runway.
These per-kind ranks are a measured basis for a PEFT ``rank_pattern``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lorascope.analysis.capacity import smallest_rank_holding
from lorascope.analysis.forecast import Forecast, Matrix, lora_parameters_of
from lorascope.analysis.layers import TARGET_SETS
from lorascope.errors import InvalidOptionError

__all__ = ["Contributions", "PartContribution", "PartRank", "contributions", "loss_shares"]

STRONG_INTERACTION = 0.25
"""Above this |interaction| a note says the attributed bits do not add up to the bits to learn."""


def loss_shares(loss: float, loss_start: float, loss_without: Sequence[float]) -> tuple[np.ndarray, float]:
    """The share of the loss reduction each part accounts for, and the interaction.

    .. math:: c_k = \\frac{L_{-k} - L}{L_0 - L}, \\qquad \\mathrm{interaction} = 1 - \\sum_k c_k

    NaN shares (and interaction) when :math:`L_0 - L \\le 0` or a loss is not finite.

    Examples
    --------
    >>> shares, interaction = loss_shares(1.0, 3.0, [1.5, 2.2])
    >>> [round(float(c), 3) for c in shares], round(interaction, 3)
    ([0.25, 0.6], 0.15)
    """
    without = np.asarray(loss_without, dtype=float)
    reduction = loss_start - loss
    if not (math.isfinite(loss) and math.isfinite(loss_start)) or not reduction > 0:
        return np.full(without.shape, np.nan), float("nan")
    shares = (without - loss) / reduction
    interaction = 1.0 - float(np.sum(shares)) if np.isfinite(shares).all() else float("nan")
    return shares, interaction


@dataclass(frozen=True)
class PartRank:
    """One part's LoRA at one rank: its parameters, capacity, and whether it holds the part's bits."""

    rank: int
    lora_parameters: int
    capacity_bits: float
    runway: float | None  # capacity / attributed bits; None without bits or with none attributed
    runway_examples: float | None  # dataset size at which the part's bits reach its capacity

    @property
    def holds(self) -> bool | None:
        return None if self.runway is None else bool(self.runway >= 1.0)

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "lora_parameters": self.lora_parameters, "capacity_bits": _num(self.capacity_bits),
                "runway": _num(self.runway), "holds": self.holds, "runway_examples": _num(self.runway_examples)}


@dataclass(frozen=True)
class PartContribution:
    """What one part (a kind, or a transformer layer) of the update contributes."""

    group: str  # "kind" or "layer"
    name: str
    loss_without: float
    share: float  # NaN when undefined
    bits: float | None
    ranks: list[PartRank]
    rank_needed: int | None  # 0: it lowers no loss, needs no adapter; None: unknown, or no rank holds its bits

    def to_dict(self) -> dict[str, Any]:
        return {"group": self.group, "name": self.name, "loss_without": _num(self.loss_without),
                "share": _num(self.share), "bits": _num(self.bits), "rank_needed": self.rank_needed,
                "ranks": [r.to_dict() for r in self.ranks]}


@dataclass(frozen=True)
class Contributions:
    """Per-kind and per-layer contributions at one snapshot, with the part that runs out first per rank."""

    step: int
    loss: float
    loss_start: float
    interaction: float
    kinds: list[PartContribution]
    layers: list[PartContribution]
    bits_to_learn: float | None
    first_to_run_out: dict[int, str | None]
    notes: list[str] = field(default_factory=list)

    @property
    def reduction(self) -> float:
        return self.loss_start - self.loss

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "loss": _num(self.loss), "loss_start": _num(self.loss_start),
                "reduction": _num(self.reduction), "interaction": _num(self.interaction),
                "bits_to_learn": _num(self.bits_to_learn), "kinds": [k.to_dict() for k in self.kinds],
                "layers": [x.to_dict() for x in self.layers],
                "first_to_run_out": {str(r): k for r, k in self.first_to_run_out.items()},
                "notes": list(self.notes)}


def contributions(loss: float, loss_start: float, loss_without_kind: Sequence[float], matrices: Sequence[Matrix],
                  ranks: Sequence[int], *, layers: Sequence[int] | None = None,
                  loss_without_layer: Sequence[float] | None = None, forecast: Forecast | None = None,
                  active_experts: int | None = None, step: int = -1) -> Contributions:
    """Per kind (and layer): the share of the loss reduction, the bits attributed and the LoRA that holds them.

    Parameters
    ----------
    loss, loss_start : float
        The held batch's loss :math:`L` now and :math:`L_0` with every recorded matrix at W_0.
    loss_without_kind : sequence of float
        Per recorded matrix, the loss with its kind reverted (every matrix of a kind carries the same value).
    matrices : sequence of Matrix
        The recorded matrices, in the same order (their kind, shape and adapter).
    ranks : sequence of int
        Candidate LoRA ranks.
    layers, loss_without_layer : sequence, optional
        Per matrix its transformer layer (-1 outside the blocks) and the loss with its layer reverted.
    forecast : Forecast, optional
        The recording's forecast: its bits to learn :math:`B`, growth law and bits per LoRA parameter. Without
        it the shares are given, not the bits.
    active_experts : int, optional
        Experts routed per token (MoE expert adapters get rank / active).
    step : int
        The snapshot's optimizer step, carried into the result.

    Examples
    --------
    >>> m = [Matrix("attention", 8, 8, "q"), Matrix("mlp", 16, 8, "up")]
    >>> c = contributions(1.0, 2.0, [1.1, 1.8], m, [2])
    >>> [(k.name, round(k.share, 2)) for k in c.kinds], round(c.interaction, 2)
    ([('attention', 0.1), ('mlp', 0.8)], 0.1)
    """
    kinds = [m.kind for m in matrices]
    without = np.asarray(loss_without_kind, dtype=float)
    if without.shape != (len(kinds),):
        raise InvalidOptionError(f"The 'loss_without_kind' parameter of contributions must have one value per "
                                 f"matrix ({len(kinds)}). Got shape {without.shape} instead.")
    notes: list[str] = []
    names = list(dict.fromkeys(kinds))
    per_kind = [float(without[kinds.index(k)]) for k in names]
    shares, interaction = loss_shares(loss, loss_start, per_kind)
    if np.isnan(shares).all() and names:
        notes.append(f"the update did not lower the held batch's loss (L_0 - L = {loss_start - loss:.3g}), or a "
                     "loss is not finite: no shares")
    if math.isfinite(interaction) and abs(interaction) > STRONG_INTERACTION:
        notes.append(f"the kinds interact strongly (interaction {interaction:.0%}: reverting one kind alone gives back "
                     f"{1 - interaction:.0%} of the loss reduction in all), so the bits attributed to the kinds "
                     f"{'cover only part of' if interaction > 0 else 'exceed'} the bits to learn and their runways "
                     f"are {'optimistic' if interaction > 0 else 'pessimistic'}")
    bits_to_learn = None
    if forecast is not None:
        bits_to_learn = float(forecast.bits.bits(forecast.dataset_examples))
    else:
        notes.append("no forecast: shares without bits or ranks")
    part_of = _PartBuilder(matrices, ranks, forecast, bits_to_learn, active_experts)
    kind_parts = [part_of("kind", k, (k,), [i for i, x in enumerate(kinds) if x == k], per_kind[j], shares[j])
                  for j, k in enumerate(names)]
    layer_parts: list[PartContribution] = []
    if layers is not None and loss_without_layer is not None:
        layer_of = np.asarray(layers)
        by_layer = np.asarray(loss_without_layer, dtype=float)
        numbers = sorted({int(x) for x in layer_of if x >= 0})
        values = [float(by_layer[np.flatnonzero(layer_of == n)[0]]) for n in numbers]
        if values and np.isfinite(values).any():
            layer_shares, _ = loss_shares(loss, loss_start, values)
            adaptable = TARGET_SETS["all-linear"]
            layer_parts = [part_of("layer", str(n), adaptable, list(np.flatnonzero(layer_of == n)), v, s)
                           for n, v, s in zip(numbers, values, layer_shares)]
    adapted = [part for part in kind_parts if part.name in TARGET_SETS["all-linear"]]
    outside = [part for part in kind_parts if part.name not in TARGET_SETS["all-linear"] and part.share >= 0.005]
    if outside:
        notes.append(", ".join(f"{part.name} ({part.share:.0%})" for part in outside) + " of the reduction is in "
                     "parts an all-linear LoRA does not adapt: no rank holds it (PEFT's modules_to_save trains such a "
                     "part fully); the part that runs out first is chosen among the adapted kinds")
    first = {int(r): _first_out(adapted, int(r)) for r in ranks} if bits_to_learn is not None else {}
    return Contributions(step, float(loss), float(loss_start), interaction, kind_parts, layer_parts, bits_to_learn,
                         first, notes)


class _PartBuilder:
    """Builds one :class:`PartContribution`: its bits and, per rank, its LoRA's capacity and runway."""

    def __init__(self, matrices: Sequence[Matrix], ranks: Sequence[int], forecast: Forecast | None,
                 bits_to_learn: float | None, active_experts: int | None) -> None:
        self.matrices, self.ranks, self.forecast = list(matrices), [int(r) for r in ranks], forecast
        self.bits_to_learn, self.active = bits_to_learn, active_experts

    def __call__(self, group: str, name: str, kinds: Sequence[str], indices: Sequence[int], loss_without: float,
                 share: float) -> PartContribution:
        mats = [self.matrices[i] for i in indices]
        share = float(share)
        bits = None
        if self.bits_to_learn is not None and math.isfinite(share):
            bits = max(share, 0.0) * self.bits_to_learn
        # kappa(P) at the part's own LoRA parameter count, as recommend's per-kind ranks take it
        capacity_of = self.forecast.constant.capacity_bits if self.forecast is not None else None
        rows = []
        for r in self.ranks:
            count, _ = lora_parameters_of(mats, kinds, r, self.active)
            capacity = float(capacity_of(count)) if capacity_of is not None else float("nan")
            runway = capacity / bits if bits and count else None
            examples = None
            if runway is not None and self.forecast is not None:
                examples = float(self.forecast.bits.examples_for(capacity / share))
            rows.append(PartRank(r, int(count), capacity, runway, examples))
        return PartContribution(group, name, float(loss_without), float(share), bits, rows,
                                self._rank_needed(mats, kinds, bits, capacity_of))

    def _rank_needed(self, mats: list[Matrix], kinds: Sequence[str], bits: float | None,
                     capacity_of: Callable[[float], float] | None) -> int | None:
        """The smallest rank whose capacity holds ``bits``, up to the widest matrix's min(out, in)."""
        if bits is None or capacity_of is None:
            return None
        high = max((min(m.out_features, m.in_features) for m in mats if m.kind in kinds), default=0)
        return smallest_rank_holding(
            bits, lambda r: capacity_of(lora_parameters_of(mats, kinds, r, self.active)[0]), high)


def _first_out(parts: list[PartContribution], rank: int) -> str | None:
    """The part with the smallest runway at ``rank`` (None when no part has one)."""
    runways = [(row.runway, part.name) for part in parts for row in part.ranks
               if row.rank == rank and row.runway is not None]
    return min(runways)[1] if runways else None


def _num(value: float | None) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None
