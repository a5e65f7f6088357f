"""The subspace section of a report: when each kind's update subspace settles, and the intruder dimensions of the
fine-tuned weights. Sentences and table rows shared by the terminal and the HTML page (``summary["subspace"]``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lorascope.report.format import MISSING, X_UNITS, count, number

__all__ = ["intruder_facts", "intruder_header", "intruder_rows", "settle_facts", "settle_header", "settle_rows",
           "subspace_title"]


def subspace_title() -> str:
    return "Subspaces: when the update's directions settle, and intruder dimensions"


def _last(values: list[Any]) -> Any:
    finite = [v for v in values if v is not None]
    return finite[-1] if finite else None


def _at_fraction(values: list[Any], x: list[Any], fraction: float) -> Any:
    """The value at the first snapshot past ``fraction`` of the data axis (None when there is none)."""
    if not x or x[-1] is None:
        return None
    for v, at in zip(values, x):
        if at is not None and at >= fraction * x[-1]:
            return v
    return None


def settle_header(subspace: Mapping[str, Any]) -> list[str]:
    words = X_UNITS.get(subspace["x"], subspace["x"])
    return ["kind", "modules", "settled early", "settles at step", f"settles at ({words})", "phi to final at 1/4",
            "phi to final at 1/2", "gradient phi to final"]


def settle_facts(subspace: Mapping[str, Any]) -> list[str]:
    """The sentences above the settling table, or the one line naming what to record."""
    out = []
    dyn = subspace.get("dynamics")
    if dyn is not None:
        words = X_UNITS.get(subspace["x"], subspace["x"])
        overall = dyn["all"]
        out.append(f"Top-{dyn['rank']} left and right singular subspaces of each update against the final "
                   f"update's (phi = ||Qa^T Qb||_F^2 / r, 1 = the same subspace; at most as many directions as the "
                   f"update's numerical rank). A module settles at the first snapshot from which phi stays >= "
                   f"{number(dyn['threshold'], 2)} on both sides; per kind: the median over modules.")
        out.append(f"Over all {overall['modules']} module(s): settled at step {count(overall['settle_step'])} "
                   f"({count(overall['settle_x'])} {words}) of {count(dyn['step'][-1])}; "
                   f"{overall['settled_before_final']} settled before the final snapshot.")
    if subspace.get("missing"):
        out.append(f"Subspaces / intruders {subspace['missing']}")
    return out


def settle_rows(subspace: Mapping[str, Any]) -> list[list[str]]:
    dyn = subspace.get("dynamics")
    if dyn is None:
        return []
    rows = []
    for name, group in [*dyn["by_kind"].items(), ("all", dyn["all"])]:
        grad = group.get("grad_phi_to_final")
        rows.append([name, str(group["modules"]), str(group["settled_before_final"]), count(group["settle_step"]),
                     count(group["settle_x"]), number(_at_fraction(group["phi_to_final"], dyn["x"], 0.25), 2),
                     number(_at_fraction(group["phi_to_final"], dyn["x"], 0.5), 2),
                     MISSING if grad is None else number(_last(grad), 2)])
    return rows


def intruder_header(subspace: Mapping[str, Any]) -> list[str]:
    intr = subspace.get("intruders") or {}
    sweep = [f"eps={e:g}" for e in intr.get("sweep", ())[::2]]
    return ["kind", "modules", f"intruders (eps={intr.get('eps', 0.5):g})", "per module", *sweep, "near chance"]


def intruder_facts(subspace: Mapping[str, Any]) -> list[str]:
    intr = subspace.get("intruders")
    if intr is None:
        return []
    out = [f"Intruder dimensions (Shuttleworth et al. 2024): of the top {intr['k']} left singular vectors of each "
           f"fine-tuned weight, those whose largest |cos| with every singular vector of the starting weight is "
           f"below eps, at the final snapshot (step {count(intr['step'][-1])}); the columns sweep eps."]
    shapes = ", ".join(f"{b['rows']} rows against {b['basis']} vectors {number(b['random_max_cos'], 2)}"
                       for b in intr.get("baselines", []))
    if shapes:
        out.append(f"What a random direction scores (the median of its largest |cos| with W_0's left singular "
                   f"vectors), per matrix shape: {shapes}.")
    flagged = intr["near_chance_modules"]
    if flagged:
        shown = ", ".join(flagged[:3]) + (f" and {len(flagged) - 3} more" if len(flagged) > 3 else "")
        out.append(f"{len(flagged)} matrix(es) are near chance: eps is below {number(intr['near_chance_factor'], 1)}x "
                   f"what a random direction scores in their width ({shown}); their counts swing with eps.")
    return out


def intruder_rows(subspace: Mapping[str, Any]) -> list[list[str]]:
    intr = subspace.get("intruders")
    if intr is None:
        return []
    rows = []
    for name, group in [*intr["by_kind"].items(), ("all", intr["all"])]:
        final = group["counts"][-1]
        per = final / group["modules"] if group["modules"] else None
        rows.append([name, str(group["modules"]), count(final), number(per, 2),
                     *[count(group["final_sweep"][f"{e:g}"]) for e in intr["sweep"][::2]],
                     str(group["near_chance_modules"])])
    return rows
