"""Rank-vs-data fits: a planted power law is recovered within its interval; meaningless fits are refused;
metrics and aggregates over a run's snapshots agree with direct computations; analyze() on real files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

import lorascope
from lorascope.analysis.curves import fit_power_law
from lorascope.analysis.layers import lora_capture
from lorascope.analysis.metrics import aggregate, update_metrics
from lorascope.errors import LorascopeError
from lorascope.store.payloads import Snapshot
from lorascope.store.writer import RunWriter
from lorascope.workflows.analyze import analyze


@pytest.mark.parametrize("exponent", [0.3, 0.7])
def test_planted_power_law_is_recovered_within_its_interval(seed, exponent):
    rng = np.random.default_rng(seed)
    x = np.geomspace(1e2, 1e5, 12)
    y = 2.5 * x**exponent * np.exp(rng.normal(scale=0.05, size=x.size))
    fit = fit_power_law(x, y, seed=seed)
    assert fit.ok
    low, high = fit.exponent_interval
    assert low <= exponent <= high
    assert high - low < 0.1
    # The crossing of a level above the data is extrapolated, and consistent with the planted law.
    level = 2.5 * 1e6**exponent
    crossing = fit.crossing(level)
    assert crossing.status == "predicted"
    assert crossing.x_low <= 1e6 <= crossing.x_high
    assert crossing.x == pytest.approx(1e6, rel=0.5)


def test_fit_is_refused_with_too_few_points_or_a_flat_curve(seed):
    assert fit_power_law([10, 100], [1, 2]).status == "too_few_points"
    assert fit_power_law([10, 10, 10, 10], [1, 2, 3, 4]).status == "too_few_points"
    assert fit_power_law([-1, 0, 5, 6], [1, 2, 3, 4]).status == "too_few_points"  # unknown x dropped
    rng = np.random.default_rng(seed)
    x = np.geomspace(10, 1e4, 10)
    flat = fit_power_law(x, 20 + rng.normal(scale=1.0, size=x.size), seed=seed)
    assert flat.status == "flat" and "holds 0" in flat.reason
    assert flat.crossing(1000).status == "never"
    assert flat.crossing(5).status == "observed"


def _synthetic_snapshots(spectra_per_snapshot, energies, kinds, shapes, examples):
    n_snap, n_mod, cap = spectra_per_snapshot.shape
    return xr.Dataset(
        {
            "sv": (("snapshot", "module", "sv"), spectra_per_snapshot),
            "sv_count": (("snapshot", "module"), np.sum(np.isfinite(spectra_per_snapshot), axis=-1)),
            "energy": (("snapshot", "module"), energies),
            "delta_nonfinite": (("snapshot", "module"), np.zeros((n_snap, n_mod), dtype=np.int64)),
        },
        coords={
            "module": [f"m{i}" for i in range(n_mod)],
            "kind": ("module", kinds),
            "layer": ("module", np.arange(n_mod) // 2),
            "expert": ("module", -np.ones(n_mod, dtype=int)),
            "out_features": ("module", [s[0] for s in shapes]),
            "in_features": ("module", [s[1] for s in shapes]),
            "step": ("snapshot", np.arange(1, n_snap + 1)),
            "examples_seen": ("snapshot", examples),
            "tokens_seen": ("snapshot", examples * 10),
        },
    )


def test_aggregates_are_exact_sums_and_energy_weighted_means(rng):
    shapes = [(20, 10), (30, 10), (10, 10), (40, 10)]
    sv = np.stack([np.sort(rng.uniform(0.1, s, size=10))[::-1] for s in (1.0, 2.0, 0.5, 3.0)])[None]
    energy = np.sum(sv**2, axis=-1)
    snaps = _synthetic_snapshots(sv, energy, ["mlp", "mlp", "attention", "attention"], shapes, np.array([100]))
    metrics = update_metrics(snaps, ranks=(2, 4))
    agg = aggregate(metrics, "kind").isel(snapshot=0)
    mlp = [0, 1]
    e = energy[0, mlp]
    captured = np.array([np.sum(sv[0, i, :4] ** 2) for i in mlp])
    assert float(agg["rank_residual"].sel(kind="mlp", rank=4)) == pytest.approx(1 - captured.sum() / e.sum())
    k = metrics["energy_rank"].sel(p=0.9).values[0, mlp]
    assert float(agg["energy_rank"].sel(kind="mlp", p=0.9)) == pytest.approx(np.sum(k * e) / e.sum())
    assert float(agg["energy_share"].sum()) == pytest.approx(1.0)
    capture = lora_capture(metrics.isel(snapshot=0))
    all_captured = sum(np.sum(sv[0, i, :4] ** 2) for i in range(4)) / energy.sum()
    assert float(capture.sel(target="all-linear", rank=4)) == pytest.approx(all_captured)


def test_nonfinite_updates_are_flagged_and_excluded(rng):
    sv = rng.uniform(0.1, 1.0, size=(1, 2, 5))
    sv = -np.sort(-sv, axis=-1)
    energy = np.sum(sv**2, axis=-1)
    snaps = _synthetic_snapshots(sv, energy, ["mlp", "mlp"], [(5, 5), (5, 5)], np.array([10]))
    snaps["delta_nonfinite"][0, 1] = 3
    snaps["energy"][0, 1] = np.nan
    metrics = update_metrics(snaps)
    assert not bool(metrics["valid"][0, 1])
    agg = aggregate(metrics, "kind").isel(snapshot=0)
    assert float(agg["energy"].sel(kind="mlp")) == pytest.approx(float(energy[0, 0]))
    assert np.isfinite(float(agg["energy_rank"].sel(kind="mlp", p=0.9)))


def _write_run(path, energy_rank_growth: bool = True, n_snap: int = 6, shapes=((24, 16), (16, 24))):
    """A run file whose k_0.9 follows a planted power law in examples seen."""
    mods = [dict(name=f"layers.0.mlp.m{i}", module=f"layers.0.mlp.m{i}", parameter="weight", kind="mlp",
                 role="", layer=0, expert=-1, out_features=s[0], in_features=s[1], transposed=False, part="",
                 lora=False) for i, s in enumerate(shapes)]
    writer = RunWriter(path, mods).open()
    examples = np.geomspace(100, 100_000, n_snap).astype(int)
    for j, ex in enumerate(examples):
        writer.append_steps({"step": [j + 1], "examples_seen": [ex], "loss": [1.0 / (j + 1)]})
        k = max(1, int(round(0.5 * ex**0.3))) if energy_rank_growth else 4
        spectra = []
        for s in shapes:
            full = min(s)
            values = np.where(np.arange(full) < min(k, full), 1.0, 1e-4)
            spectra.append(values)
        writer.append_snapshot(Snapshot(step=j + 1, examples_seen=int(ex),
                                        energy=[float(np.sum(v**2)) for v in spectra], sv=spectra))
    writer.close()


def test_analyze_recovers_a_planted_rank_curve_and_its_crossing(tmp_path):
    path = tmp_path / "run.h5"
    _write_run(path)
    analysis = analyze(path, ranks=(4, 8, 64))
    curve = analysis.curves["mlp"]
    assert curve.fit.ok
    low, high = curve.fit.exponent_interval
    assert low - 0.05 <= 0.3 <= high + 0.05
    by_rank = {int(c.level): c for c in curve.crossings}
    assert by_rank[4].status == "observed"
    assert by_rank[64].status == "never" or by_rank[64].x > 100_000
    summary = analysis.to_dict()
    assert summary["curves"]["mlp"]["fit"]["status"] == "ok"
    assert summary["final"]["by_kind"]["mlp"]["modules"] == 2


def test_analyze_refuses_runs_of_different_models(tmp_path):
    _write_run(tmp_path / "a.h5")
    _write_run(tmp_path / "b.h5", shapes=((24, 16), (16, 32)))
    with pytest.raises(LorascopeError, match="different models"):
        analyze([tmp_path / "a.h5", tmp_path / "b.h5"])


def test_analyze_across_runs_uses_one_point_per_run(tmp_path):
    paths = []
    for i, n in enumerate((3, 4, 5, 6)):
        path = tmp_path / f"run{i}.h5"
        _write_run(path, n_snap=n)
        paths.append(path)
    analysis = analyze(paths, ranks=(8,))
    assert len(analysis.curves["mlp"].x) == 4


def test_analyze_without_snapshots_or_with_one(tmp_path):
    mods = [dict(name="m", module="m", parameter="weight", kind="mlp", role="", layer=0, expert=-1,
                 out_features=4, in_features=4, transposed=False, part="", lora=False)]
    path = tmp_path / "none.h5"
    with RunWriter(path, mods) as writer:
        writer.append_steps({"step": [1, 2], "loss": [2.0, 1.0], "examples_seen": [4, 8]})
    analysis = analyze(path)
    assert analysis.curves == {} and analysis.to_dict()["final"] is None
    assert any("no snapshots" in note for note in analysis.notes)

    path = tmp_path / "one.h5"
    with RunWriter(path, mods) as writer:
        writer.append_steps({"step": [1], "examples_seen": [4]})
        writer.append_snapshot(Snapshot(step=1, examples_seen=4, energy=[1.0], sv=[np.array([1.0, 0.0, 0.0, 0.0])]))
    analysis = analyze(path)
    assert analysis.curves["all"].fit.status == "too_few_points"
    assert any("single snapshot" in note for note in analysis.notes)


def test_analyze_marks_incomplete_runs(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = lorascope.record(model, tmp_path / "live.h5", optimizer=opt, snapshots=1)
    for _ in range(5):
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
        opt.zero_grad()
    try:
        # The writer thread may still be draining; the analysis must work on whatever is committed.
        analysis = analyze(tmp_path / "live.h5")
        assert analysis.incomplete and analysis.to_dict()["incomplete"]
    finally:
        rec.close()


def test_invalid_ranks_and_axis(tmp_path):
    _write_run(tmp_path / "a.h5")
    with pytest.raises(LorascopeError, match="ranks"):
        analyze(tmp_path / "a.h5", ranks=[0])
    with pytest.raises(LorascopeError, match="'x' parameter"):
        analyze(tmp_path / "a.h5", x="steps")


@pytest.fixture
def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_a_rank_above_the_matrices_dimension_is_never_crossed():
    x = np.array([10.0, 20.0, 40.0, 80.0, 160.0])
    fit = fit_power_law(x, 2.0 * x**0.5)
    assert fit.crossing(64.0).status == "predicted"  # the fit alone extrapolates to any rank
    capped = fit.crossing(64.0, ceiling=32.0)
    assert capped.status == "never" and "above the matrices' dimension (32)" in capped.reason
    assert capped.to_dict()["reason"] == capped.reason and fit.crossing(16.0).to_dict()["reason"] is None
