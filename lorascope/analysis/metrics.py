"""Spectral metrics of every recorded update, per module and snapshot, and their aggregates per kind and layer.

Input is a run's ``snapshots`` view (:attr:`lorascope.Run.snapshots`); output is an ``xarray.Dataset`` with
the same ``snapshot`` and ``module`` dims plus ``p`` (energy shares) and ``rank`` (candidate LoRA ranks).
Modules whose update holds NaN/Inf, or whose energy is not finite, are flagged (``valid`` False) and excluded
from every aggregate and fit; they are never silently averaged in.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xarray as xr

from lorascope._checks import check_ranks
from lorascope.analysis import spectra
from lorascope.errors import InvalidOptionError

DEFAULT_P = (0.5, 0.9, 0.99)
DEFAULT_RANKS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

__all__ = ["DEFAULT_P", "DEFAULT_RANKS", "aggregate", "update_metrics"]


def _check_p(p: Sequence[float]) -> tuple[float, ...]:
    values = tuple(float(x) for x in p)
    if not values or any(not (0.0 < x <= 1.0) for x in values):
        raise InvalidOptionError(f"The 'p' parameter of update_metrics must be a non-empty list of floats in (0, 1]. "
                                 f"Got {list(p)!r} instead.")
    return values


def update_metrics(snapshots: xr.Dataset, *, p: Sequence[float] = DEFAULT_P,
                   ranks: Sequence[int] = DEFAULT_RANKS) -> xr.Dataset:
    """Rank measures of each module's update at each snapshot.

    Parameters
    ----------
    snapshots
        A run's snapshots view: ``sv`` (snapshot, module, sv_index), ``sv_count``, ``energy``, ``delta_nonfinite``,
        coordinates ``out_features`` / ``in_features`` / ``kind`` / ``layer`` on ``module``.
    p
        Energy shares for the energy ranks :math:`k_p`.
    ranks
        Candidate LoRA ranks for the residuals :math:`e_r`.

    Returns
    -------
    xarray.Dataset
        ``energy``, ``valid``, ``complete`` (full spectrum stored), ``energy_rank`` (+ ``energy_rank_lower_bound``
        and ``energy_rank_fraction`` = k_p / min(out, in)) over ``p``, ``rank_residual`` and ``captured_energy``
        over ``rank``, ``effective_rank``, ``stable_rank``, ``signal_rank`` (Gavish-Donoho threshold).
    """
    p_values, rank_values = _check_p(p), check_ranks(ranks)
    sv = snapshots["sv"].values.astype(np.float64)
    energy = snapshots["energy"].values.astype(np.float64)
    count = snapshots["sv_count"].values
    out_f = snapshots["out_features"].values
    in_f = snapshots["in_features"].values
    full_rank = np.minimum(out_f, in_f)[None, :]
    valid = np.isfinite(energy) & (count > 0) & (snapshots["delta_nonfinite"].values == 0)
    energy = np.where(valid, energy, np.nan)
    complete = valid & (count >= full_rank)

    k_p, bound = [], []
    for share in p_values:
        k, b = spectra.energy_rank(sv, share, total_energy=energy, return_bound=True)
        k_p.append(k)
        bound.append(b)
    residual = np.stack([spectra.rank_residual(sv, r, total_energy=energy) for r in rank_values], axis=-1)
    signal = np.full(energy.shape, np.nan)
    for j in range(energy.shape[1] if energy.ndim == 2 else 0):
        signal[:, j] = spectra.signal_rank(sv[:, j], (int(out_f[j]), int(in_f[j])), complete=complete[:, j])

    dims = ("snapshot", "module")
    k_arr = np.stack(k_p, axis=-1) if k_p else np.zeros(energy.shape + (0,))
    metrics = xr.Dataset(
        {
            "energy": (dims, energy, {"description": "||Delta||_F^2; NaN where the update is not finite"}),
            "valid": (dims, valid, {"description": "finite update with a stored spectrum"}),
            "complete": (dims, complete, {"description": "the whole spectrum is stored (not top-k)"}),
            "energy_rank": (dims + ("p",), k_arr, {"description": "k_p: directions holding a share p of energy"}),
            "energy_rank_lower_bound": (dims + ("p",), np.stack(bound, axis=-1),
                                        {"description": "k_p exceeds the stored top-k: a lower bound"}),
            "energy_rank_fraction": (dims + ("p",), k_arr / full_rank[..., None],
                                     {"description": "k_p / min(out, in)"}),
            "rank_residual": (dims + ("rank",), np.where(valid[..., None], residual, np.nan),
                              {"description": "e_r: share of the update a best rank-r matrix misses"}),
            "captured_energy": (dims + ("rank",), energy[..., None] * (1.0 - residual),
                                {"description": "energy of the best rank-r approximation"}),
            "effective_rank": (dims, spectra.effective_rank(sv, complete=complete),
                               {"description": "entropy effective rank (needs the whole spectrum)"}),
            "stable_rank": (dims, np.where(valid, spectra.stable_rank(sv, total_energy=energy), np.nan),
                            {"description": "||Delta||_F^2 / s_1^2"}),
            "signal_rank": (dims, signal, {"description": "singular values above the Gavish-Donoho threshold"}),
        },
        coords={"p": list(p_values), "rank": list(rank_values)},
    )
    return metrics.assign_coords({name: snapshots.coords[name] for name in snapshots.coords if name != "sv_index"})


def aggregate(metrics: xr.Dataset, by: str = "kind") -> xr.Dataset:
    """Aggregate per-module metrics over groups of modules (``by`` = "kind", "layer" or "expert").

    Sums where sums are meaningful, energy weights where an average is needed (documented per variable):

    - ``energy``: sum over the group; ``energy_share``: the group's share of all valid modules' energy;
    - ``rank_residual``: :math:`1 - \\sum_m C_{m,r} / \\sum_m E_m`, what a rank-r LoRA on every module of the
      group misses of the group's update (``C`` = captured energy); exact, not an average of ratios;
    - ``energy_rank`` (k_p), ``energy_rank_fraction``, ``effective_rank``, ``signal_rank``: energy-weighted means
      over the group's
      valid modules (a module's weight is its share of the group's energy), so that tiny updates do not
      dominate. ``by="all"`` aggregates every module into one group.
    """
    if by == "all":
        metrics = metrics.assign_coords(all=("module", np.full(metrics.sizes["module"], "all")))
    if by not in metrics.coords:
        raise InvalidOptionError(f"The 'by' parameter of aggregate must be a module coordinate such as kind, layer "
                                 f"or expert. Got {by!r} instead.")
    valid = metrics["valid"]
    energy = metrics["energy"].where(valid, 0.0)
    captured = metrics["captured_energy"].where(valid, 0.0)
    weighted = {name: (metrics[name].where(valid) * energy).fillna(0.0)
                for name in ("energy_rank", "energy_rank_fraction", "effective_rank", "signal_rank")}
    group = metrics[by]
    total = energy.sum("module")
    g_energy = energy.groupby(group).sum()
    out = xr.Dataset({
        "energy": g_energy,
        "energy_share": g_energy / total.where(total > 0),
        "rank_residual": 1.0 - captured.groupby(group).sum() / g_energy.where(g_energy > 0),
        "modules": valid.groupby(group).sum(),
    })
    for name, values in weighted.items():
        has_value = (metrics[name].where(valid).notnull() * energy).groupby(group).sum()
        out[name] = values.groupby(group).sum() / has_value.where(has_value > 0)
    for coord in ("step", "examples_seen", "tokens_seen"):
        if coord in metrics.coords:
            out = out.assign_coords({coord: metrics.coords[coord]})
    return out
