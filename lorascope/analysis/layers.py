"""Where the update lives: energy shares per kind, layer and expert, what LoRA target sets of rank r would
capture, and the modules that need the most rank. All functions take the metrics of one snapshot."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import xarray as xr

__all__ = ["TARGET_SETS", "energy_shares", "lora_capture", "rank_hungry_modules"]

TARGET_SETS: Mapping[str, tuple[str, ...]] = {
    "all-linear": ("attention", "mlp", "moe_expert", "other"),
    "mlp-only": ("mlp", "moe_expert"),
    "attention-only": ("attention",),
}
"""Kinds each LoRA target set adapts. ``all-linear`` follows PEFT's rule (every linear layer but the output head,
so a plain model's layers of kind ``other``, a ``Sequential`` of ``Linear``, count in it) plus fused MoE experts,
as :func:`lorascope.recommend` targets them; routers are left out (most are not ``nn.Linear`` in transformers 5,
and a router's adapter holds a few hundred parameters)."""


def _valid_energy(snapshot: xr.Dataset) -> xr.DataArray:
    return snapshot["energy"].where(snapshot["valid"], 0.0)


def lora_capture(snapshot: xr.Dataset, target_sets: Mapping[str, Sequence[str]] = TARGET_SETS) -> xr.DataArray:
    """Share of the whole update's energy that rank-r LoRA on each target set could capture at best.

    .. math:: \\mathrm{capture}(T, r) = \\frac{\\sum_{m \\in T} \\sum_{i \\le r} s_{m,i}^2}{\\sum_m E_m}

    (Eckart-Young per module: the best a rank-r adapter on module m can hold is its top-r energy.) The
    denominator runs over every valid recorded module, so a target set is charged for what it leaves out.
    Returns an array over (target, rank).
    """
    energy = _valid_energy(snapshot)
    captured = snapshot["captured_energy"].where(snapshot["valid"], 0.0)
    total = float(energy.sum())
    rows = []
    for kinds in target_sets.values():
        in_set = snapshot["kind"].isin(list(kinds))
        rows.append((captured.where(in_set, 0.0).sum("module") / total).values if total > 0
                    else np.full(snapshot.sizes["rank"], np.nan))
    return xr.DataArray(np.array(rows), dims=("target", "rank"),
                        coords={"target": list(target_sets), "rank": snapshot["rank"].values},
                        name="lora_capture")


def energy_shares(snapshot: xr.Dataset) -> dict[str, pd.Series | pd.DataFrame]:
    """Shares of the update's energy per kind, per layer, per (layer, kind) and per MoE expert."""
    energy = _valid_energy(snapshot)
    total = float(energy.sum())
    frame = pd.DataFrame({
        "kind": snapshot["kind"].values, "layer": snapshot["layer"].values, "expert": snapshot["expert"].values,
        "share": energy.values / total if total > 0 else np.full(energy.shape, np.nan),
    })
    experts = frame[frame["expert"] >= 0]
    return {
        "kind": frame.groupby("kind")["share"].sum().sort_values(ascending=False),
        "layer": frame.groupby("layer")["share"].sum().sort_index(),
        "layer_kind": frame.pivot_table(index="layer", columns="kind", values="share", aggfunc="sum", fill_value=0.0),
        "expert": experts.groupby(["layer", "expert"])["share"].sum() if len(experts) else pd.Series(dtype=float),
    }


def rank_hungry_modules(snapshot: xr.Dataset, *, p: float = 0.9, rank: int | None = None,
                        top: int = 10) -> pd.DataFrame:
    """The modules whose update needs the most rank: sorted by k_p relative to min(out, in), then by what a
    rank-``rank`` approximation misses (largest candidate rank by default)."""
    rank = int(snapshot["rank"].values.max()) if rank is None else rank
    valid = snapshot["valid"].values
    frame = pd.DataFrame({
        "module": snapshot["module"].values,
        "kind": snapshot["kind"].values,
        "layer": snapshot["layer"].values,
        "energy_rank": snapshot["energy_rank"].sel(p=p).values,
        "energy_rank_fraction": snapshot["energy_rank_fraction"].sel(p=p).values,
        "residual_at_rank": snapshot["rank_residual"].sel(rank=rank).values,
        "signal_rank": snapshot["signal_rank"].values,
    })[valid]
    frame = frame.sort_values(["energy_rank_fraction", "residual_at_rank"], ascending=False)
    return frame.head(top).reset_index(drop=True)
