"""The contributions section of a report: per kind (and layer) the share of the held batch's loss reduction, the
bits attributed to it, and where its LoRA runs out. Sentences and table rows shared by the terminal and the HTML
page (``summary["contributions"]``); nothing is computed here."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lorascope.report.format import count, number, percent

__all__ = ["contributions_facts", "contributions_header", "contributions_rows"]


def contributions_facts(contributions: Mapping[str, Any]) -> list[str]:
    """The sentences above the table: the loss reduction, the interaction and, per rank, the kind that runs out
    first; or why there are no contributions."""
    if contributions.get("missing"):
        return [f"No contributions: {contributions['missing']}"]
    facts = [f"On the held batch at step {count(contributions['step'])} the update lowers the loss from "
             f"{number(contributions['loss_start'], 4)} to {number(contributions['loss'], 4)}; reverting one kind "
             f"of matrices to its start value gives back its share of that reduction. Interaction (what no single "
             f"kind accounts for alone): {percent(contributions['interaction'])}."]
    first = contributions.get("first_to_run_out") or {}
    named = [f"rank {r}: {kind}" for r, kind in first.items() if kind]
    if named:
        facts.append(f"Runs out first (the smallest capacity against its share of the "
                     f"{count(contributions['bits_to_learn'])} bits to learn): {'; '.join(named)}.")
    return facts


def contributions_header(contributions: Mapping[str, Any]) -> list[str]:
    """The table's columns: the part, its share and bits, the rank it needs, and its runway at each rank."""
    ranks = [row["rank"] for row in (contributions.get("kinds") or [{}])[0].get("ranks", [])]
    return ["part", "share of loss reduction", "bits", "rank needed", *[f"runway at r={r}" for r in ranks]]


def contributions_rows(contributions: Mapping[str, Any]) -> list[list[str]]:
    """One row per kind, then one per layer; a runway above 1x means that LoRA holds the part's bits."""
    rows = []
    for group, label in (("kinds", "{}"), ("layers", "layer {}")):
        for part in contributions.get(group) or []:
            rows.append([label.format(part["name"]), percent(part["share"]), count(part["bits"]),
                         _rank_needed(part["rank_needed"], part["bits"]), *[_runway(r) for r in part["ranks"]]])
    return rows


def _rank_needed(rank: Any, bits: Any) -> str:
    if rank is None:
        return "n/a" if bits is None else "none holds it"
    return "no adapter" if rank == 0 else str(rank)


def _runway(row: Mapping[str, Any]) -> str:
    runway: Sequence[Any] | Any = row.get("runway")
    return "n/a" if runway is None else f"{number(runway, 2)}x"
