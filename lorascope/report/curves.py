"""The rank curves in words: one sentence per group (a kind, or "all") for every candidate rank, shared by the
terminal and the HTML page. Rank curves describe the update; they are evidence, not the capacity forecast."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lorascope.report.format import approx_count, bound, count, number

__all__ = ["CURVES_CAVEAT", "crossings_sentence"]

CURVES_CAVEAT = ("a description of the update, not a capacity forecast: the reproduction study found that where "
                 "k_0.9 crosses a rank does not locate where that LoRA falls off (docs/reproduction.md)")


def _ranks(crossings: list[Mapping[str, Any]]) -> str:
    return ", ".join(str(int(c["level"])) for c in crossings)


def crossings_sentence(group: str, curve: Mapping[str, Any], unit: str = "examples", p: float = 0.9) -> str:
    """Where k_p of one group reaches each candidate rank, in one sentence.

    Ranks already reached at the first point are named once; a rank reached later is given with the data size
    where it was observed; a predicted crossing with its interval; ranks not reached with the reason.

    Examples
    --------
    >>> fit = {"status": "ok", "reason": "5 points", "exponent": 0.5}
    >>> curve = {"fit": fit, "points": [[32.0, 9.0], [64.0, 12.0]], "crossings": [
    ...     {"level": 4, "status": "observed", "x": 32.0, "x_low": 32.0, "x_high": 32.0},
    ...     {"level": 8, "status": "observed", "x": 32.0, "x_low": 32.0, "x_high": 32.0},
    ...     {"level": 16, "status": "predicted", "x": 12345.0, "x_low": 8000.0, "x_high": None}]}
    >>> print(crossings_sentence("mlp", curve).replace("; ", ";\\n"))
    k_0.9 of mlp: already above rank 4, 8 at the first snapshot (32 examples);
    crosses rank 16 at ~12,300 examples (8,000..unbounded).
    """
    fit, crossings = curve["fit"], list(curve["crossings"])
    first_x = curve["points"][0][0] if curve.get("points") else None
    parts = []
    at_start = [c for c in crossings if c["status"] == "observed" and c["x"] == first_x]
    if at_start:
        parts.append(f"already above rank {_ranks(at_start)} at the first snapshot ({count(first_x)} {unit})")
    for c in crossings:
        if c["status"] == "observed" and c not in at_start:
            parts.append(f"reaches rank {int(c['level'])} at {count(c['x'])} {unit} (observed)")
        elif c["status"] == "predicted":
            parts.append(f"crosses rank {int(c['level'])} at ~{approx_count(c['x'])} {unit} "
                         f"({bound(c['x_low'])}..{bound(c['x_high'])})")
    never = [c for c in crossings if c["status"] == "never"]
    if never:
        why = next((c.get("reason") for c in never if c.get("reason")), None)
        if why is None:
            why = (fit["reason"] if fit["status"] != "ok" else
                   f"no growth with data (exponent {number(fit['exponent'], 3)})")
        parts.append(f"not predicted to reach rank {_ranks(never)}: {why}")
    return f"k_{p:g} of {group}: " + "; ".join(parts) + "."
