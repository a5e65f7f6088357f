"""What the reproduction study measures, from the results of its runs (plain dicts, see ``repro_train.train_run``).

Pure functions: best learning rate per condition, the measured falloff of each rank in dataset size, the spectral
predictors, the learning-rate ratio, the batch-size and target-set comparisons, and the early learning curves.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

HELD_FRACTION = 0.9
"""A LoRA has fallen off once it holds less than this share of the bits full fine-tuning holds at the same N."""
RESIDUAL_LEVEL = 0.5
"""The rank-residual predictor: the falloff of rank r is where a best rank-r truncation of full fine-tuning's
update to the linear layers misses more than this share of its energy."""
LINEAR_KINDS = ("attention", "mlp")


def best_per_condition(results: Iterable[Mapping[str, Any]]) -> dict[tuple[str, int, int, int, int], dict]:
    """The run with the lowest final loss for each condition (target, rank, examples, batch size, epochs): the
    learning rate tuned per condition, as LoRA Without Regret does. Ties go to the smaller learning rate."""
    best: dict[tuple[str, int, int, int, int], dict] = {}
    for r in sorted(results, key=lambda r: r["lr"]):
        key = condition(r)
        if key not in best or _loss(r) < _loss(best[key]):
            best[key] = dict(r)
    return best


def _loss(result: Mapping[str, Any]) -> float:
    """The final loss, a diverged run's (NaN) counting as infinite."""
    loss = result["final_loss"]
    return loss if math.isfinite(loss) else math.inf


def condition(result: Mapping[str, Any]) -> tuple[str, int, int, int, int]:
    return (result["target"], result["rank"], result["examples"], result["batch_size"], result["epochs"])


def lr_grid_edge(result: Mapping[str, Any], grid: Sequence[float]) -> str | None:
    """"low" / "high" when the best learning rate is at an end of a grid of several, else None."""
    if len(grid) < 2:
        return None
    return "low" if result["lr"] == min(grid) else "high" if result["lr"] == max(grid) else None


def crossing(held: Mapping[int, float], level: float = HELD_FRACTION) -> dict[str, Any]:
    """First N where the held share drops below ``level``, log-interpolated between grid points.

    Returns ``{"status", "examples"}``: "measured"; "at_or_below" (already below at the smallest N: the falloff
    is at most there); "beyond" (never below: the falloff is past the largest N); "none" without points.

    >>> crossing({100: 1.0, 200: 0.95, 400: 0.85, 800: 0.5})["examples"]
    282.84...
    >>> crossing({100: 0.5})["status"], crossing({100: 1.0})["status"]
    ('at_or_below', 'beyond')
    """
    points = sorted(held.items())
    if not points:
        return {"status": "none", "examples": None}
    if points[0][1] < level:
        return {"status": "at_or_below", "examples": float(points[0][0])}
    for (n0, h0), (n1, h1) in zip(points, points[1:]):
        if h0 >= level > h1:
            t = (h0 - level) / (h0 - h1)
            return {"status": "measured", "examples": math.exp(math.log(n0) + t * math.log(n1 / n0))}
    return {"status": "beyond", "examples": float(points[-1][0])}


def verdict(predicted: float | None, measured: Mapping[str, Any], predicted_status: str | None = None
            ) -> dict[str, Any]:
    """Predicted against measured: the ratio predicted / measured when both are numbers, else whether the
    prediction is consistent with the bound the data give.

    ``predicted_status`` "at_or_below" marks a prediction that is only an upper bound (a spectral signal already
    past the rank at the smallest N); None predictions mean "never" (no falloff predicted).

    >>> verdict(300, {"status": "measured", "examples": 200})["ratio"]
    1.5
    >>> verdict(None, {"status": "beyond", "examples": 4096})["consistent"]
    True
    """
    status, examples = measured["status"], measured["examples"]
    if predicted is None or not math.isfinite(predicted):
        return {"ratio": None, "consistent": status == "beyond"}
    if predicted_status == "at_or_below":  # predicted: at most the smallest N
        return {"ratio": None, "consistent": status == "at_or_below"}
    if status == "measured":
        return {"ratio": predicted / examples, "consistent": None}
    if status == "beyond":
        return {"ratio": None, "consistent": predicted >= examples}
    if status == "at_or_below":
        return {"ratio": None, "consistent": predicted <= examples}
    return {"ratio": None, "consistent": None}


def linear_group(final: Mapping[str, Any], ranks: Sequence[int]) -> dict[str, Any]:
    """k_0.9, signal rank (energy-weighted over the attention and MLP matrices, as lorascope aggregates) and the
    rank residual e_r of the linear layers (those LoRA adapts), from an analysis' ``final`` section."""
    kinds = [final["by_kind"][k] for k in LINEAR_KINDS if k in final["by_kind"]]
    energy = sum(k["energy"] for k in kinds)

    def weighted(get: Any) -> float:
        return sum(k["energy"] * get(k) for k in kinds) / energy

    return {"energy": energy,
            "energy_rank_0.9": weighted(lambda k: k["energy_rank"]["0.9"]),
            "signal_rank": weighted(lambda k: k["signal_rank"]),
            "rank_residual": {r: weighted(lambda k, r=r: k["rank_residual"][str(r)]) for r in ranks},
            "energy_rank_0.9_by_kind": {name: final["by_kind"][name]["energy_rank"]["0.9"] for name in LINEAR_KINDS
                                        if name in final["by_kind"]},
            "energy_rank_fraction_0.9_by_kind": {name: final["by_kind"][name]["energy_rank_fraction"]["0.9"]
                                                 for name in LINEAR_KINDS if name in final["by_kind"]}}


def spectral_predictions(spectra: Mapping[int, Mapping[str, Any]], ranks: Sequence[int]) -> dict[str, dict]:
    """Falloff predictions from full fine-tuning's update spectra at each dataset size N.

    - ``energy_rank``: N where k_0.9 of the linear layers reaches r (a power law in N fitted by
      ``lorascope.analysis.curves.fit_power_law``; observed when the data already reach it);
    - ``signal_rank``: the same for the noise-aware signal rank;
    - ``rank_residual``: N where e_r, the share of the update's energy a best rank-r truncation misses, first
      exceeds :data:`RESIDUAL_LEVEL` (log-interpolated; at or below the smallest N if it already does there).

    Each value is ``{"examples": N or None, "status": ...}``.
    """
    from lorascope.analysis.curves import fit_power_law

    sizes = sorted(spectra)
    out: dict[str, dict] = {}
    for signal in ("energy_rank_0.9", "signal_rank"):
        fit = fit_power_law(sizes, [spectra[n][signal] for n in sizes])
        out[signal.removesuffix("_0.9")] = {}
        for r in ranks:
            c = fit.crossing(r)
            status = {"observed": "observed", "predicted": "extrapolated", "never": "never"}[c.status]
            if c.status == "observed" and c.x == sizes[0]:
                status = "at_or_below"
            out[signal.removesuffix("_0.9")][r] = {"examples": c.x if math.isfinite(c.x) else None,
                                                   "status": status, "fit": fit.status}
    out["rank_residual"] = {}
    for r in ranks:
        kept = {n: 1.0 - spectra[n]["rank_residual"][r] for n in sizes}  # the share a rank-r truncation keeps
        found = crossing(kept, 1.0 - RESIDUAL_LEVEL)
        out["rank_residual"][r] = {"examples": found["examples"] if found["status"] != "beyond" else None,
                                   "status": found["status"]}
    return out


def information_predictions(recommendation: Mapping[str, Any]) -> dict[int, dict]:
    """Runway per rank from a ``lorascope recommend`` JSON document."""
    return {p["rank"]: {"examples": p["runway_examples"], "range": p["runway_range"],
                        "capacity_bits": p["capacity_bits"], "lora_parameters": p["lora_parameters"]}
            for p in recommendation["predictions"]}


def geometric_mean(values: Iterable[float]) -> float | None:
    values = [v for v in values if v and v > 0]
    return math.exp(statistics.fmean(math.log(v) for v in values)) if values else None


def lr_ratios(full: Mapping[int, Mapping[str, Any]], lora: Mapping[tuple[int, int], Mapping[str, Any]],
              full_grid: Sequence[float], lora_grid: Sequence[float]) -> dict[str, Any]:
    """Best LoRA learning rate over best full fine-tuning learning rate, per rank and dataset size.

    ``full``: N -> best full fine-tuning run; ``lora``: (rank, N) -> best LoRA run of the same condition.
    """
    rows, edges = [], 0
    for (rank, n), best in sorted(lora.items()):
        if n not in full:
            continue
        edge = [lr_grid_edge(full[n], full_grid), lr_grid_edge(best, lora_grid)]
        edges += any(edge)
        rows.append({"examples": n, "rank": rank, "full_lr": full[n]["lr"], "lora_lr": best["lr"],
                     "ratio": best["lr"] / full[n]["lr"], "full_edge": edge[0], "lora_edge": edge[1]})
    ranks = sorted({row["rank"] for row in rows})
    return {"rows": rows, "ratio_geometric_mean": geometric_mean(row["ratio"] for row in rows),
            "ratio_by_rank": {r: geometric_mean(row["ratio"] for row in rows if row["rank"] == r) for r in ranks},
            "lora_lr_by_rank": {r: geometric_mean(row["lora_lr"] for row in rows if row["rank"] == r) for r in ranks},
            "full_lr_geometric_mean": geometric_mean(best["lr"] for best in full.values()),
            "rows_at_grid_edge": edges}


def early_losses(curves: Mapping[int, tuple[np.ndarray, np.ndarray]], at_examples: Sequence[float]
                 ) -> dict[int, list[float | None]]:
    """Training loss of each rank's run (same LR) at given examples seen: the mean of the steps within
    x / 1.12 .. x * 1.12 (``curves``: rank -> (examples_seen, loss))."""
    out: dict[int, list[float | None]] = {}
    for rank, (x, loss) in curves.items():
        row: list[float | None] = []
        for a in at_examples:
            inside = (x >= a / 1.12) & (x <= a * 1.12) & np.isfinite(loss)
            row.append(float(loss[inside].mean()) if inside.any() else None)
        out[rank] = row
    return out


def absorbed_bits_curve(x: np.ndarray, loss: np.ndarray, examples: int, values: int) -> np.ndarray:
    """Bits about the values a run holds along its training, from its moving-median training loss (nats per value
    token): :math:`I(x) = N \\max(0, \\ln V - \\ell(x)) / \\ln 2`, made non-decreasing. The loss is over the whole
    vocabulary, so this is a lower bound on what the model knows."""
    bits = examples * np.clip(math.log(values) - loss, 0.0, None) / math.log(2)
    return np.maximum.accumulate(bits)


def translate_to_examples_seen(capacity_bits: Mapping[int, float], x: np.ndarray, absorbed: np.ndarray
                               ) -> dict[int, float | None]:
    """The examples seen at which full fine-tuning has absorbed each rank's capacity: where the information view
    puts the LoRA's departure from full fine-tuning's per-step curve (None: never within the run)."""
    out: dict[int, float | None] = {}
    for rank, bits in capacity_bits.items():
        hit = np.flatnonzero(absorbed >= bits)
        out[rank] = float(x[hit[0]]) if hit.size else None
    return out
