"""analyze's and compare's subspace sections: read a run's singular vectors and intruder cosines, hand them to
:mod:`lorascope.analysis.subspace` and :mod:`lorascope.analysis.intruders`.

The singular vectors stay on disk in the run file (``Run.factors``); this module reopens the file (or uses the
open :class:`~lorascope.Run` it was given) and reads them once per module and snapshot.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr

from lorascope.analysis.information import recorded_dataset_examples
from lorascope.analysis.intruders import DEFAULT_EPS, IntruderComparison, IntruderSummary, RunIntruders, final_counts
from lorascope.analysis.subspace import (
    DEFAULT_SETTLE_PHI,
    Overlap,
    SubspaceDynamics,
    numerical_rank,
    orthonormal,
    overlap_of,
    principal_angles,
    subspace_dynamics,
)
from lorascope.model.peft import without_peft_prefix
from lorascope.store.reader import Run, open_run

__all__ = ["RECORD_FACTORS", "RECORD_INTRUDERS", "Subspace", "compare_subspaces", "missing_line", "read_subspace",
           "run_factors", "subspace_overlap"]

RunLike = str | os.PathLike[str] | Run

RECORD_FACTORS = "factors_k=8"  # the option to record with, as the report's one line names it
RECORD_INTRUDERS = "intruder_k=10"  # the paper's k


@dataclass
class Subspace:
    """analyze's subspace section of one run: its dynamics, its intruder counts, or why neither is there."""

    run: str
    x: str
    dynamics: SubspaceDynamics | None
    intruders: IntruderSummary | None
    missing: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"run": self.run, "x": self.x, "missing": self.missing,
                "dynamics": None if self.dynamics is None else self.dynamics.to_dict(),
                "intruders": None if self.intruders is None else self.intruders.to_dict()}


def missing_line(factors: bool, intruders: bool) -> str | None:
    """The one line saying which option records what is missing (None when both are there)."""
    need = ([f"{RECORD_FACTORS} for the update's subspaces"] if not factors else []) + (
        [f"{RECORD_INTRUDERS} for intruder dimensions"] if not intruders else [])
    if not need:
        return None
    return "not recorded: record with " + " and ".join(need) + " (options of lorascope.record)"


def _open(source: RunLike) -> Any:
    return nullcontext(source) if isinstance(source, Run) else open_run(source)


def run_factors(run: Run, snapshots: Sequence[int], grad: bool = False
                ) -> list[list[tuple[np.ndarray, np.ndarray] | None]]:
    """``out[m][i]``: module m's update factors (the gradient's with ``grad``) at snapshot ``snapshots[i]``."""
    read = run.grad_factors if grad else run.factors
    return [[read(m, s) for s in snapshots] for m in range(len(run.modules))]


def read_subspace(source: RunLike, path: str, ranks: Sequence[int], x: str, *,
                  threshold: float = DEFAULT_SETTLE_PHI, eps: float = DEFAULT_EPS) -> Subspace:
    """The subspace section of one run: dynamics at the candidate ranks no larger than its ``factors_k`` (and
    ``factors_k`` itself), intruder counts at ``eps``; ``missing`` names the option for what was not recorded."""
    with _open(source) as run:
        if not run.n_snapshots:
            return Subspace(path, x, None, None, "no snapshots: no subspaces or intruder dimensions")
        snapshots = _columns(run, x)
        k = _stored_k(run)
        modules = run.modules
        names, kinds = [str(n) for n in modules["name"]], [str(k) for k in modules["kind"]]
        dynamics = None
        n = int(snapshots.sizes["snapshot"])
        factors = run_factors(run, list(range(n))) if k > 0 else []
        if any(f is not None for row in factors for f in row):  # the group can be absent though factors_k says not
            grads = run_factors(run, list(range(n)), grad=True) if run.grad_sv else None
            if grads is not None and all(g is None for row in grads for g in row):
                grads = None
            sv = snapshots["sv"].transpose("module", "snapshot", ...).values
            nranks = np.array([[numerical_rank(sv[m, t]) for t in range(n)] for m in range(len(names))])
            use = sorted({r for r in ranks if r <= k} | {k})
            dynamics = subspace_dynamics(names, kinds, snapshots["step"].values, snapshots[x].values, factors,
                                         nranks, use, grad_factors=grads, threshold=threshold)
        intruders = _intruders(run, snapshots, x, eps)
    return Subspace(path, x, dynamics, intruders, missing_line(dynamics is not None, intruders is not None))


def _intruders(run: Run, snapshots: xr.Dataset, x: str, eps: float) -> IntruderSummary | None:
    """The run's intruder cosines as an :class:`IntruderSummary` (None when it recorded none)."""
    if run.intruder_k <= 0 or "intruder_cos" not in snapshots:
        return None
    modules = run.modules
    rows = modules["out_features"].to_numpy()
    basis = np.minimum(rows, modules["in_features"].to_numpy())  # the recorder keeps W_0's thin U
    cos = snapshots["intruder_cos"].transpose("snapshot", "module", "intruder").values.astype(np.float64)
    return IntruderSummary([str(n) for n in modules["name"]], [str(k) for k in modules["kind"]], rows, basis,
                           snapshots["step"].values, snapshots[x].values.astype(np.float64), cos, eps=eps)


def compare_subspaces(full: RunLike, loras: Sequence[tuple[RunLike, str, int | None]], dataset: int | None, *,
                      rank: int = 8, eps: float = DEFAULT_EPS) -> IntruderComparison:
    """compare's subspace section: each run's intruder dimensions at its final snapshot (full fine-tuning first),
    and each LoRA run's overlap with full fine-tuning's top-``rank`` update subspace, per kind.

    ``loras``: (source, label, rank) per LoRA run; ``dataset``: the full run's dataset size in examples.
    """
    runs, recorded = [], {"factors": False, "intruders": False}
    for source, label, lora_rank in [(full, "full fine-tuning", None), *loras]:
        with _open(source) as run:
            path = str(run.path)
            intr = _intruders(run, _columns(run, "step"), "step", eps) if run.n_snapshots else None
            examples = recorded_dataset_examples(run.config) or dataset
        overlap = None if source is full else subspace_overlap(full, source, rank)
        recorded["intruders"] |= intr is not None
        recorded["factors"] |= overlap is not None
        counts, modules, near = final_counts(intr) if intr is not None else (None, None, 0)
        runs.append(RunIntruders(label, path, lora_rank, examples, counts, modules, near, overlap))
    return IntruderComparison(eps=eps, rank=rank, runs=runs,
                              missing=missing_line(recorded["factors"], recorded["intruders"]))


def _columns(run: Run, x: str) -> xr.Dataset:
    """The snapshot columns the section reads, in memory."""
    table = run.snapshots
    return table[[c for c in ("sv", "intruder_cos") if c in table]].assign_coords(
        {"step": table["step"], x: table[x]}).load()


def _stored_k(run: Run) -> int:
    """Columns of the stored factors: the file's own factors_k (a hand-written file has no recorder options)."""
    pair = run.factors(0, -1) if len(run.modules) else None
    return 0 if pair is None else int(pair[0].shape[1])


def subspace_overlap(full: RunLike, lora: RunLike, rank: int
                     ) -> dict[str, Overlap] | None:
    """Per kind (and "all"), the overlap between a LoRA run's final top-``rank`` update subspaces and full
    fine-tuning's, over the modules both recorded (names matched without the PEFT prefix). ``rank`` is capped at
    each update's numerical rank: a rank-4 LoRA's 4 directions are compared with full fine-tuning's top ``rank``,
    and phi (divided by the smaller rank) is the share of the LoRA's subspace inside full fine-tuning's. None when
    either run stored no factors."""
    with _open(full) as f_run, _open(lora) as l_run:
        if not f_run.n_snapshots or not l_run.n_snapshots:
            return None
        full_names = {without_peft_prefix(str(n)): i for i, n in enumerate(f_run.modules["name"])}
        f_sv, l_sv = f_run.snapshots["sv"].isel(snapshot=-1).values, l_run.snapshots["sv"].isel(snapshot=-1).values
        per: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        for j, (name, kind) in enumerate(zip(l_run.modules["name"], l_run.modules["kind"])):
            i = full_names.get(without_peft_prefix(str(name)))
            if i is None:
                continue
            a, b = f_run.factors(i, -1), l_run.factors(j, -1)
            if a is None or b is None:
                return None
            r_full, r_lora = min(rank, numerical_rank(f_sv[i])), min(rank, numerical_rank(l_sv[j]))
            if min(r_full, r_lora) < 1:
                continue
            # min(r_full, r_lora) angles: how far the LoRA's directions lie from full fine-tuning's top r
            angles = [np.degrees(principal_angles(orthonormal(a[s], r_full), orthonormal(b[s], r_lora)))
                      for s in range(2)]
            if not all(t.size for t in angles):  # no finite vectors on a side (not stored, or damaged)
                continue
            for group in (str(kind), "all"):
                per.setdefault(group, []).append((angles[0], angles[1]))
    return {group: overlap_of(rank, rows) for group, rows in per.items()}
