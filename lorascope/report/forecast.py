"""The forecast section of a report: the bits the data asked for and, per LoRA target set and rank, where that
LoRA runs out. Sentences and table rows shared by the terminal and the HTML page (``summary["forecast"]``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lorascope.report.format import approx_count, count, number, significant

__all__ = ["forecast_facts", "forecast_header", "forecast_rows"]


def forecast_header(forecast: Mapping[str, Any]) -> list[str]:
    """The table's column names; the verdict is for the recorded dataset size."""
    return ["target", "rank", "LoRA parameters", "capacity (bits)", "runs out at ~ (examples)", "range",
            f"at {count(forecast.get('dataset_examples'))} examples"]


def forecast_facts(forecast: Mapping[str, Any]) -> list[str]:
    """The sentences above the table: the bits asked (with the truth when the task's is known), how they grow,
    and the bits per LoRA parameter used; or why there is no forecast."""
    if forecast.get("missing"):
        return [f"No forecast: {forecast['missing']}"]
    bits, constant = forecast["bits"], forecast["constant"]
    asked = (f"The data asked {number(bits['bits_per_example'], 2)} bits per example ({bits['basis']}, "
             f"{count(forecast['dataset_examples'])} examples: {count(forecast['bits_to_learn'])} bits to learn).")
    truth = forecast.get("truth_bits_per_example")
    if truth:
        asked += (f" Truth, known for this task: {number(truth, 2)} bits per example (the estimate is "
                  f"{number(bits['bits_per_example'] / truth, 2)}x it).")
    growth = forecast["growth"]
    explanation = bits["explanation"]
    return [asked, explanation[:1].upper() + explanation[1:] + ".",
            f"Growth with data: bits ~ N^{number(growth['exponent'], 2)} ({growth['source']}).",
            f"LoRA capacity: {significant(constant['bits_per_parameter'], 3)} bits per LoRA parameter, known to a "
            f"factor {significant(constant['uncertainty'], 3)} ({constant['source']})."]


def forecast_rows(forecast: Mapping[str, Any]) -> list[list[str]]:
    """One table row per target set and rank."""
    rows = []
    for row in forecast.get("rows", []):
        low, high = row["runway_range"]
        rows.append([row["target"], str(row["rank"]), count(row["lora_parameters"]), count(row["capacity_bits"]),
                     approx_count(row["runway_examples"]), f"{approx_count(low)}..{approx_count(high)}",
                     row["verdict"]])
    return rows
