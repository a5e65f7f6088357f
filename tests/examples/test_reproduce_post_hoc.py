"""The reproduction's post-hoc studies against their checked-in JSON: the learning-rate grid extended until every
optimum is interior (examples/reproduce/lr_bracket.py) and kappa(r) re-measured with every rate at every load
(examples/reproduce/kappa_rates.py). No training: each JSON is recomputed from the runs and calibrations it names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("peft")

import lorascope  # noqa: E402

DOCS = Path(__file__).resolve().parents[2] / "docs" / "reproduction"


@pytest.fixture(scope="module")
def modules(reproduce_scripts):
    return reproduce_scripts("lr_bracket"), reproduce_scripts("kappa_rates")


def test_the_ladder_steps_half_decades_and_the_study_alone_recomputes_its_own_tables(modules):
    lr_bracket, _ = modules
    assert [lr_bracket.ladder_step(v, up=True) for v in (1e-3, 3e-3, 1e-2, 3e-2)] == [3e-3, 1e-2, 3e-2, 1e-1]
    assert [lr_bracket.ladder_step(v, up=False) for v in (1e-2, 3e-3, 1e-3, 3e-4)] == [3e-3, 1e-3, 3e-4, 1e-4]
    results = json.loads((DOCS / "results.json").read_text())
    study = lr_bracket.summarize(lr_bracket.conditions(results["runs"]), results["tier"], results)
    assert study["falloff"] == results["falloff"]
    assert study["lr_ratio_geometric_mean"] == pytest.approx(results["lr"]["ratio_geometric_mean"], rel=1e-12)
    assert study["at_an_end"] == 26  # every full fine-tuning optimum and 20 of 36 LoRA ones


def test_the_extended_grid_json_is_its_runs_summarized(modules):
    lr_bracket, _ = modules
    results = json.loads((DOCS / "results.json").read_text())
    saved = json.loads((DOCS / "lr_bracket.json").read_text())
    runs = results["runs"] + [{**run, "experiment": "sweep"} for run in saved["added_runs"]]
    again = lr_bracket.summarize(lr_bracket.conditions(runs), results["tier"], results)
    for key in ("falloff", "at_an_end", "full_best_lr", "held", "conditions"):
        assert again[key] == saved[key], key
    assert again["lr_ratio_geometric_mean"] == pytest.approx(saved["lr_ratio_geometric_mean"], rel=1e-12)


def test_the_true_bits_rows_are_the_calibrations_capacity_over_8_bits(modules):
    _, kappa_rates = modules
    results = json.loads((DOCS / "results.json").read_text())
    study = kappa_rates.true_bits(lorascope.load_calibration(DOCS / "calibration_kappa.json"), results)
    # docs/reproduction.md: "the task's true 8 bits per fact with calibrated kappa(r)": 0.69, 0.78, 0.89, 1.00, 1.15
    assert [round(study[str(r)]["ratio"], 2) for r in (1, 2, 4, 8, 16)] == [0.69, 0.78, 0.89, 1.00, 1.15]
    saved = json.loads((DOCS / "kappa_rates.json").read_text())
    rates = kappa_rates.true_bits(lorascope.load_calibration(DOCS / "calibration_kappa_rates.json"), results)
    assert rates == saved["ratios"]["true 8 bits per fact, kappa(r) with every rate at every load"]
    assert study == saved["ratios"]["true 8 bits per fact, the study's kappa(r)"]
    for seed in (102, 103):
        saved = json.loads((DOCS / f"kappa_rates_seed{seed}.json").read_text())
        again = kappa_rates.true_bits(lorascope.load_calibration(DOCS / f"calibration_kappa_rates_seed{seed}.json"),
                                      results)
        assert again == saved["ratios"]["true 8 bits per fact, kappa(r) with every rate at every load"]


def test_kappa_with_every_rate_at_every_load_puts_every_rank_within_1_5x_on_three_seeds():
    """Issue 13's facts target, post hoc: the capped probe with kappa(r) from today's calibrate within 1.5x of the
    measured falloff at ranks 1-16 on three calibration seeds, in the right order; rank 32 (never measured to fall
    off) predicted past 4,096. The study's own kappa(r) missed rank 1 (0.61x)."""
    for name in ("kappa_rates.json", "kappa_rates_seed102.json", "kappa_rates_seed103.json"):
        saved = json.loads((DOCS / name).read_text())
        rows = saved["ratios"]["probe, kappa(r) with every rate at every load"]
        assert all(1 / 1.5 <= rows[str(r)]["ratio"] <= 1.5 for r in (1, 2, 4, 8, 16)), (name, rows)
        predicted = [rows[str(r)]["predicted"] for r in (1, 2, 4, 8, 16, 32)]
        assert predicted == sorted(predicted) and rows["32"]["measured_status"] == "beyond" and predicted[-1] > 4096
        assert saved["ratios"]["probe, the study's kappa(r)"]["1"]["ratio"] < 1 / 1.5
        assert saved["training"]["lr_tried"][:2] == [1e-3, 3e-3] and len(saved["training"]["lr_tried"]) >= 3


@pytest.mark.parametrize(("seed", "loads", "kept"), [(102, {"8": 1.0, "16": 1.0}, {"8": False, "16": False}),
                                                     (103, {"8": 2.0, "16": 1.0}, {"8": True, "16": False})])
def test_a_rank_not_full_at_its_load_was_offered_the_next_one(seed, loads, kept):
    """docs/reproduction.md: seed 102's ranks 8 and 16 held 87-90% of load 1 and collapsed at load 2, so load 1
    stands; seed 103's rank 8 held more at load 2 (kept), its rank 16 nothing."""
    calibration = json.loads((DOCS / f"calibration_kappa_rates_seed{seed}.json").read_text())
    assert {r: calibration["training"]["load_by_rank"][r] for r in loads} == loads
    for rank, was_kept in kept.items():
        note = next(n for n in calibration["notes"] if n.startswith(f"rank {rank}: held "))
        assert note.endswith("kept" if was_kept else "not more"), note
