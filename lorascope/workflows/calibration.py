"""What ``lorascope calibrate`` measured, and its JSON file: :class:`Calibration`, :class:`CalibrationPoint`,
:func:`load_calibration`.

A calibration holds one point per rank (an adapter offered random facts at one load, and the bits it held), the
bracket (the smallest rank's adapter at several loads) and, derived from them, the fit
:math:`\\log\\kappa = a + g\\log P` (:func:`~lorascope.analysis.capacity_fit.fit_kappa`) and the finding past
capacity (:func:`~lorascope.analysis.capacity_fit.bracket_capacity`). Derived values are written to the file for
readers and recomputed from the points when it is read.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lorascope._version import __version__
from lorascope.analysis.capacity_fit import CapacityBracket, KappaFit, bracket_capacity, fit_kappa, fit_saturating
from lorascope.errors import LorascopeError

__all__ = ["CALIBRATION_FORMAT", "CALIBRATION_VERSION", "LORA_PROBES", "Calibration", "CalibrationPoint",
           "load_calibration", "step_limited_note"]

CALIBRATION_FORMAT = "lorascope-calibration"
CALIBRATION_VERSION = 2
"""2: a bracket and kappa(P) fitted over the ranks. Version-1 files are still read, as a flat constant."""
MIN_UNCERTAINTY = 1.25
"""The smallest uncertainty factor a calibrated constant is given, even when its ranks agree exactly."""
LEARNED_FRACTION = 0.05
"""A rank whose adapter held less than this share of the bits offered did not learn: left out of the constant."""
STEP_LIMITED_SPAN, STEP_LIMITED_GAIN = 4.0, 1.1
"""Two full LoRA probes :data:`STEP_LIMITED_SPAN` or more apart in parameters whose larger absorbed under
:data:`STEP_LIMITED_GAIN` times the smaller's bits are held back by the step budget, not by their rank (SmolLM2 in
64 steps: ranks 16 and 64 within 2-6% of each other on both tasks; docs/realdata_smollm2.md)."""
SATURATED_SHARE = 0.9
"""An adapter holding this share of the most any rank holds at a step budget adds little by a larger rank."""
MIN_FIT_POINTS = 3
"""Learned ranks needed to fit kappa(P); with fewer the constant is flat (two adjacent ranks do not tell a trend
from noise: the default constant's rank-1/rank-2 pairs rose with P where ranks 1 to 32 fell, issue 13)."""
LORA_PROBES = "LoRA probes on the planned data"
"""The ``task["kind"]`` of a calibration read from recorded LoRA probes (:mod:`lorascope.workflows.lora_probes`)."""
MIN_FIT_SPAN = 4.0
"""The learned ranks must span at least this factor in parameter count for kappa(P) to be fitted."""


@dataclass(frozen=True)
class CalibrationPoint:
    """One adapter of a calibration run: what was offered, what it held."""

    rank: int
    lora_parameters: int
    facts: int
    bits_offered: float
    bits_stored: float
    final_loss_nats: float
    epochs: int
    steps: int | None = None
    """Adam steps trained, when the calibration ran at a step budget (``epochs`` then counts the passes begun)."""

    @property
    def bits_per_parameter(self) -> float:
        return self.bits_stored / self.lora_parameters

    @property
    def load(self) -> float:
        """Bits offered per LoRA parameter."""
        return self.bits_offered / self.lora_parameters

    @property
    def learned(self) -> bool:
        """False when the adapter held under :data:`LEARNED_FRACTION` of the bits offered: it did not learn the
        facts (too few epochs, a learning rate that failed, a collapse), so it says nothing about capacity."""
        return self.bits_stored >= LEARNED_FRACTION * self.bits_offered

    @property
    def saturated(self) -> bool:
        """True when the adapter held less than 80% of what was offered (so it was full, as intended)."""
        return self.bits_stored < 0.8 * self.bits_offered

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "bits_per_parameter": self.bits_per_parameter, "load": self.load,
                "saturated": self.saturated, "learned": self.learned}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CalibrationPoint:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k != "steps"}, steps=data.get("steps"))


@dataclass(frozen=True)
class Calibration:
    """Bits per LoRA parameter measured on one architecture.

    Attributes
    ----------
    model : dict
        :func:`~lorascope.workflows.calibrate.model_signature` of the calibrated model (``model_type``, ...).
    target : str
        The LoRA target set used.
    points : tuple of CalibrationPoint
        One per rank measured, each at the calibration's load.
    task, training : dict
        The facts task (values, key tokens, seed) and the training settings.
    base : str
        What the frozen base was (pretrained weights, or a config with synthetic pretraining).
    bracket_points : tuple of CalibrationPoint
        The smallest rank's adapter at each bracketing load (empty: not bracketed).
    load_points : tuple of CalibrationPoint
        At a step budget, every rank's adapter at every load tried (each rank's point is its best); else empty.
    fitted : bool
        Whether kappa(P) is fitted over the points (False for a version-1 file: flat, as it was read then).
    """

    model: dict[str, Any]
    target: str
    points: tuple[CalibrationPoint, ...]
    task: dict[str, Any]
    training: dict[str, Any]
    base: str = ""
    created: str = ""
    lorascope_version: str = __version__
    notes: tuple[str, ...] = field(default_factory=tuple)
    bracket_points: tuple[CalibrationPoint, ...] = ()
    fitted: bool = True
    load_points: tuple[CalibrationPoint, ...] = ()

    @property
    def from_lora_probes(self) -> bool:
        """Whether the points are LoRA probes on the user's data (:data:`LORA_PROBES`), not random facts."""
        return self.task.get("kind") == LORA_PROBES

    @property
    def steps(self) -> int | None:
        """The step budget each adapter trained for, or None (epochs to a plateau)."""
        steps = self.training.get("steps")
        return int(steps) if steps else None

    @property
    def counted(self) -> tuple[CalibrationPoint, ...]:
        """The points the constant is taken from: the ranks whose adapter learned (all, when none did)."""
        return tuple(p for p in self.points if p.learned) or self.points

    @property
    def bits_per_parameter(self) -> float:
        """One value for printing: the median over the ranks that learned of bits stored per LoRA parameter."""
        return float(statistics.median(p.bits_per_parameter for p in self.counted))

    @property
    def spread(self) -> float:
        """Largest over smallest per-rank constant among the ranks that learned (1 = they agree)."""
        values = [p.bits_per_parameter for p in self.counted]
        return max(values) / min(values) if min(values) > 0 else math.inf

    @property
    def fit(self) -> KappaFit | None:
        """kappa(P) over the ranks that learned, or None (flat) when fewer than :data:`MIN_FIT_POINTS` learned, they
        span less than :data:`MIN_FIT_SPAN` in parameters, or the file is version 1."""
        learned = [p for p in self.points if p.learned and p.bits_stored > 0]
        if not self.fitted or len(learned) < MIN_FIT_POINTS:
            return None
        sizes = [p.lora_parameters for p in learned]
        if max(sizes) < MIN_FIT_SPAN * min(sizes):
            return None
        return fit_kappa(sizes, [p.bits_per_parameter for p in learned])

    @property
    def uncertainty(self) -> float:
        """Multiplicative uncertainty: with a fit of three or more points, :math:`e^{2s}` (s the standard deviation
        of its log residuals, about a 95% band); flat, the spread over ranks; at least :data:`MIN_UNCERTAINTY`.
        LoRA probes: :data:`MIN_UNCERTAINTY` (each probed rank's kappa is measured, not fitted, and the spread over
        ranks is their trend, not noise; outside the probed ranks the range widens by how far that trend moves
        kappa there)."""
        if self.from_lora_probes:
            return MIN_UNCERTAINTY
        fit = self.fit
        if fit is not None and not math.isnan(fit.residual):
            return max(MIN_UNCERTAINTY, math.exp(2 * fit.residual))
        return max(MIN_UNCERTAINTY, self.spread)

    @property
    def bracket(self) -> CapacityBracket | None:
        """The smallest rank's held bits at its loads, or None when fewer than two loads were measured."""
        if len(self.bracket_points) < 2:
            return None
        first = self.bracket_points[0]
        return bracket_capacity([p.load for p in self.bracket_points], [p.bits_stored for p in self.bracket_points],
                                lora_parameters=first.lora_parameters, rank=first.rank)

    @property
    def collapse(self) -> float | None:
        """The load, as a multiple of capacity, at which the bracketed adapter collapsed; None if it did not."""
        bracket = self.bracket
        if bracket is None or bracket.collapse_load is None or bracket.held_max <= 0:
            return None
        return bracket.multiple(bracket.collapse_load)

    def to_dict(self) -> dict[str, Any]:
        fit, bracket = self.fit, self.bracket
        return {"format": CALIBRATION_FORMAT, "version": CALIBRATION_VERSION,
                "lorascope_version": self.lorascope_version, "created": self.created, "model": dict(self.model),
                "base": self.base, "target": self.target, "task": dict(self.task), "training": dict(self.training),
                "points": [p.to_dict() for p in self.points], "bits_per_parameter": self.bits_per_parameter,
                "spread": self.spread, "uncertainty": self.uncertainty,
                "fit": None if fit is None else fit.to_dict(),
                "bracket": None if bracket is None else {**bracket.to_dict(),
                                                         "points": [p.to_dict() for p in self.bracket_points]},
                "collapse": self.collapse, "notes": list(self.notes),
                **({"load_points": [p.to_dict() for p in self.load_points]} if self.load_points else {})}

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the calibration as JSON (what ``lorascope recommend --calibration`` reads)."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")
        return path


def step_limited_note(calibration: Calibration) -> str | None:
    """A note when LoRA probes of very different sizes absorbed about the same bits, both full
    (:data:`STEP_LIMITED_SPAN`, :data:`STEP_LIMITED_GAIN`): in that step budget a larger rank buys little runway.
    Otherwise, when the probes' capacity saturates (:func:`~lorascope.analysis.capacity_fit.fit_saturating`), the
    most any rank holds and the rank from which an adapter holds :data:`SATURATED_SHARE` of it, with a warning when
    no probe ran above that rank: the ceiling is then read past the probes, where it was early on SmolLM2 (the
    forecasts of ranks 16 to 64 from probes of ranks 1 to 4, docs/realdata_smollm2.md; probes on twice the slice did
    not move them). None for a calibration on random facts."""
    if not calibration.from_lora_probes:
        return None
    steps = f"in {calibration.steps:,} steps" if calibration.steps else "at this budget"
    full = sorted((p for p in calibration.points if p.learned and p.saturated), key=lambda p: p.lora_parameters)
    for small in full:
        for large in reversed(full):
            if (large.lora_parameters >= STEP_LIMITED_SPAN * small.lora_parameters
                    and large.bits_stored < STEP_LIMITED_GAIN * small.bits_stored):
                return (f"LoRA probes of ranks {small.rank} and {large.rank} absorbed about the same "
                        f"({small.bits_stored:,.0f} and {large.bits_stored:,.0f} bits, "
                        f"{small.bits_stored / small.bits_offered:.0%} and {large.bits_stored / large.bits_offered:.0%}"
                        f" of full fine-tuning's) for {large.lora_parameters / small.lora_parameters:.0f}x the "
                        f"parameters: {steps} the steps, not the rank, limit what an adapter holds, so ranks above "
                        f"{small.rank} buy little runway; more steps would (on SmolLM2 in 64 steps ranks 16 and 64 "
                        "held within 2-6% of each other on both tasks, and ranks 16 and 32 fell off 1.07-1.17x "
                        "apart; docs/realdata_smollm2.md)")
    learned = [p for p in calibration.points if p.learned and p.bits_stored > 0]
    law = fit_saturating([(p.lora_parameters, p.bits_per_parameter) for p in learned])
    if law is None:
        return None
    per_rank = learned[0].lora_parameters / learned[0].rank
    parameters = -math.log(1 - SATURATED_SHARE) * law.ceiling / law.kappa0  # where B(P) reaches that share
    rank = 2 ** max(0, math.ceil(math.log2(parameters / per_rank)))
    unwitnessed = ("; no probe ran above that rank, and on SmolLM2 such ceilings were early: from probes of ranks "
                   "1-4, ranks 16 to 64 fell off 1.2-2.1x later than forecast, whether the probes' slice held 128 "
                   "examples or 256 (docs/realdata_smollm2.md): probe the ranks you will choose between"
                   if max(p.rank for p in learned) <= rank else "")
    return (f"the LoRA probes' capacity saturates {steps}: no rank holds more than ~{law.ceiling:,.0f} bits, and "
            f"from rank {rank:,} on an adapter holds {SATURATED_SHARE:.0%} of that or more, so larger ranks add "
            "little runway (on SmolLM2 in 128 steps, post hoc: ranks 16 and 64 fell off at 148 and 182 examples; "
            f"docs/capacity.md, \"Capacity at a step budget\"){unwitnessed}")


def load_calibration(path: str | os.PathLike[str]) -> Calibration:
    """Read a calibration written by :meth:`Calibration.save` / ``lorascope calibrate`` (version 2, or version 1:
    a flat constant, no bracket).

    Raises
    ------
    LorascopeError
        If the file is missing, not JSON, or not a lorascope calibration.
    """
    path = Path(path)
    if not path.is_file():
        raise LorascopeError(f"No calibration file at {str(path)!r}; write one with `lorascope calibrate`.")
    try:
        data = json.loads(path.read_text())
        if data.get("format") != CALIBRATION_FORMAT:
            raise ValueError("not a lorascope calibration")
        version = data.get("version")
        if version not in (1, CALIBRATION_VERSION):
            raise ValueError(f"calibration format version {version!r}, this lorascope reads 1 and "
                             f"{CALIBRATION_VERSION}")
        points = tuple(CalibrationPoint.from_dict(p) for p in data["points"])
        bracket = data.get("bracket") if version == CALIBRATION_VERSION else None
        bracket_points = tuple(CalibrationPoint.from_dict(p) for p in bracket["points"]) if bracket else ()
        if not points or any(p.lora_parameters <= 0 for p in points + bracket_points):
            raise ValueError("no valid calibration points")
        calibration = Calibration(model=data["model"], target=data["target"], points=points, task=data["task"],
                                  training=data["training"], base=data.get("base", ""),
                                  created=data.get("created", ""), lorascope_version=data.get("lorascope_version", ""),
                                  notes=tuple(data.get("notes", ())), bracket_points=bracket_points,
                                  fitted=version == CALIBRATION_VERSION,
                                  load_points=tuple(CalibrationPoint.from_dict(p)
                                                    for p in data.get("load_points", ())))
        calibration.fit, calibration.bracket  # noqa: B018  (derived values are checked here, not at first use)
        return calibration
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        raise LorascopeError(f"{str(path)!r} is not a valid lorascope calibration file ({exc}).") from None
