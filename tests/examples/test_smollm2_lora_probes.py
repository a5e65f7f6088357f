"""The checked-in results of kappa at the step budget on SmolLM2 (docs/realdata_smollm2.md, "kappa at the step
budget"), recomputed from their own inputs with today's lorascope: the LoRA-probe forecasts from the probes' points and
the study's growth law, the rank-64 falloff from its held shares, and the random-facts forecast table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "realdata"
sys.path.insert(0, str(ROOT / "examples" / "realdata"))
sys.path.insert(0, str(ROOT / "examples" / "reproduce"))

import repro_measure as measure  # noqa: E402
import smollm2_lora_probes as probes_script  # noqa: E402
import smollm2_step_forecast as step_forecast  # noqa: E402

from lorascope.analysis.capacity import CapacityConstant  # noqa: E402
from lorascope.workflows.calibration import load_calibration  # noqa: E402


def _constant(calibration: dict, tmp_path: Path) -> CapacityConstant:
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(calibration))
    return CapacityConstant.from_calibration(load_calibration(path))


@pytest.mark.parametrize(("name", "study", "probed", "now"), [
    # today's lorascope reads probes as a capacity saturating with P (docs/capacity.md, "Capacity at a step budget");
    # continuing the probes' trend, as these forecasts were first read, gave 1.24 / 0.96 / 1.46 / 4.13 here, 4.07 /
    # 1.31 / 0.85 / 0.89 on the r32 probes, 1.25 / 1.60 and 1.29 / 0.86 / 0.75 on SFT, 1.10 / 1.11 and 1.41 / 0.77
    # / 0.74 on the 64-step CPT seed
    ("smollm2_lora_probes.json", "smollm2_steps128.json", [1, 2, 4], {"1": 1.23, "4": 0.96, "16": 0.73, "64": 0.61}),
    ("smollm2_lora_probes_r32.json", "smollm2_steps128.json", [16, 64],
     {"1": 0.60, "4": 0.65, "16": 0.85, "32": 0.98}),
    ("smollm2_lora_probes_sft_seed1.json", "smollm2_sft_steps_seed1.json", [1, 2, 4],
     {"1": 0.15, "4": 0.31, "16": 0.22}),
    ("smollm2_lora_probes_sft_seed2.json", "smollm2_sft_steps_seed2.json", [1, 2, 4], {"4": 1.21, "16": 0.86}),
    ("smollm2_lora_probes_sft_seed2_r32.json", "smollm2_sft_steps_seed2.json", [16, 64],
     {"4": 0.82, "16": 0.86, "32": 0.77}),
    ("smollm2_lora_probes_steps_seed2.json", "smollm2_steps_seed2.json", [1, 2, 4], {"4": 1.11, "16": 0.70}),
    ("smollm2_lora_probes_steps_seed2_r32.json", "smollm2_steps_seed2.json", [16, 64],
     {"4": 0.87, "16": 0.77, "32": 0.75}),
    # SFT in 128 steps, seed 3, written before any LoRA run with the saturating capacity (the trend: 1.12 / 1.36)
    ("smollm2_lora_probes_sft128_seed3.json", "smollm2_sft_steps128_seed3.json", [1, 2, 4],
     {"1": 1.20, "4": 0.98, "16": 0.61, "32": 0.50}),
    # the same ranks probed on twice the slice, after the fact
    ("smollm2_lora_probes_sft128_seed3_n256.json", "smollm2_sft_steps128_seed3.json", [1, 2, 4],
     {"1": 1.79, "4": 1.04, "16": 0.57, "32": 0.47}),
    # ranks 8 and 64, written before their runs from probes of the ranks around them on that slice
    ("smollm2_lora_probes_sft128_seed3_r8.json", "smollm2_sft_steps128_seed3.json", [4, 16],
     {"1": 0.96, "4": 1.09, "8": 1.02, "16": 1.0}),
    ("smollm2_lora_probes_sft128_seed3_r64.json", "smollm2_sft_steps128_seed3.json", [16, 32],
     {"1": 0.66, "4": 0.85, "16": 1.0, "64": 0.89}),
    ("smollm2_lora_probes_cpt128_r8.json", "smollm2_steps128.json", [4, 16],
     {"1": 1.03, "4": 0.90, "8": 0.96, "16": 0.85}),
])
def test_the_lora_probe_forecast_is_what_todays_lorascope_reads_from_the_probes(name, study, probed, now, tmp_path):
    result = json.loads((DOCS / name).read_text())
    bits = step_forecast.bits_estimate(json.loads((DOCS / study).read_text()))
    constant = _constant(result["predictions"]["calibration"], tmp_path)
    assert [p["rank"] for p in result["predictions"]["calibration"]["points"]] == probed
    for rank, row in result["forecast_now"].items():
        parameters = result["predictions"]["forecast"][rank]["lora_parameters"]
        assert row["examples"] == pytest.approx(bits.examples_for(constant.capacity_bits(parameters)), rel=1e-9)
    assert {r: round(result["forecast_now"][r]["ratio"], 2) for r in now} == now


def test_rank_64_was_predicted_before_its_runs_and_fell_off_far_earlier():
    result = json.loads((DOCS / "smollm2_lora_probes.json").read_text())
    assert result["predictions"]["rank_64_runs_before"] == 0
    share = {int(n): v for n, v in result["held_share"]["64"].items()}
    falloff = measure.crossing(share)
    assert falloff == result["falloff"]["64"] and round(falloff["examples"]) == 182
    assert {r: round(v["ratio"], 2) for r, v in result["verdicts"].items() if v["ratio"]} == {
        "1": 1.26, "4": 0.97, "16": 1.59, "64": 4.86}  # as written, with the power law of that moment
    own = result["own_rank"]
    assert [round(own[r]["ratio"], 2) for r in ("1", "4", "16", "64")] == [1.24, 0.96, 0.78, 0.65]
    assert [own[r]["full"] for r in ("1", "4", "16", "64")] == [True, True, False, False]


def test_rank_32_between_two_probed_ranks_was_predicted_before_its_runs_within_1_2x():
    result = json.loads((DOCS / "smollm2_lora_probes_r32.json").read_text())
    assert result["predictions"]["new_rank"] == 32 and result["predictions"]["new_rank_runs_before"] == 0
    falloff = measure.crossing({int(n): v for n, v in result["held_share"]["32"].items()})
    assert falloff == result["falloff"]["32"] and round(falloff["examples"]) == 167
    assert round(result["verdicts"]["32"]["ratio"], 2) == 0.89
    assert round(result["own_rank"]["32"]["ratio"], 2) == 0.97 and result["own_rank"]["32"]["full"]


def test_the_spiking_sft_probe_carries_its_note():
    result = json.loads((DOCS / "smollm2_lora_probes_sft_seed1.json").read_text())
    notes = result["probe_slice"]["full_notes"]
    assert any(n.startswith("the loss rose from 3.19 to 10.8 nats in the first epoch") for n in notes), notes
    full, lora = result["probe_slice"]["full_code_length_bits"], [v["code_length_bits"] for v in
                                                                  result["own_rank"].values()]
    assert round(full) == 42613 and 1.85 < full / max(lora) and full / min(lora) < 1.92


def test_random_facts_at_the_step_budget_put_every_measured_falloff_over_10x_early(tmp_path):
    calibration = load_calibration(DOCS / "smollm2_calibration_steps64.json")
    assert calibration.steps == 64 and calibration.training["batch_size"] == 600
    assert [round(p.bits_per_parameter, 3) for p in calibration.points] == [0.112, 0.048, 0.014]
    assert all(1100 < p.bits_stored < 2300 for p in calibration.points)  # a rank-independent capacity in bits
    held = {(p.rank, p.facts): p.bits_stored for p in calibration.load_points}
    assert held[1, 318] > 1000 and held[1, 636] < 150  # past one batch of facts, almost nothing
    saved = json.loads((DOCS / "smollm2_step_forecast.json").read_text())
    studies = [DOCS / Path(s["study"]).name for s in saved["studies"]]
    out = tmp_path / "again.json"
    assert step_forecast.main([*map(str, studies), "--calibration",
                               "64=docs/realdata/smollm2_calibration_steps64.json", "--out", str(out)]) == 0
    again = json.loads(out.read_text())
    for before, now in zip(saved["studies"], again["studies"]):
        for key in ("plateau_kappa", "step_kappa"):
            for rank, row in before[key]["ranks"].items():
                assert now[key]["ranks"][rank]["runway"] == pytest.approx(row["runway"], rel=1e-9)
        ratios = [v["ratio"] for v in now["step_kappa"]["verdicts"].values() if v["ratio"] is not None]
        assert ratios and max(ratios) < 0.1


@pytest.mark.parametrize("name", ["smollm2_lora_probes.json", "smollm2_lora_probes_r32.json",
                                  "smollm2_lora_probes_sft_seed1.json", "smollm2_lora_probes_sft_seed2.json",
                                  "smollm2_lora_probes_sft_seed2_r32.json"])
def test_remeasure_of_a_checked_in_probe_result_changes_nothing(name, tmp_path, monkeypatch):
    """`--remeasure` reads the falloffs again from the study's JSON and the result's own held shares: the checked-in
    files are its output."""
    copy = tmp_path / name
    copy.write_text((DOCS / name).read_text())
    monkeypatch.chdir(DOCS.parents[1])  # the result names its study by a path from the repository root
    probes_script.remeasure(copy)
    assert json.loads(copy.read_text()) == json.loads((DOCS / name).read_text())


def test_sft_third_seed_lora_probe_forecasts_written_before_any_lora_run_land_within_2x():
    """SFT, seed 2, full fine-tuning at a stable 3e-3: both LoRA-probe forecasts were written after the study's full
    fine-tuning runs and before any of its LoRA runs (``--stop-before-lora``, ``--predict-only``), and land within
    2x at ranks 4, 16 and 32 where kappa from random facts at a plateau, written first too, was 2.0x and 5.1x late.
    Rank 1's N = 16 run diverged (its loss ended above the base's): the study leaves that cell out, so rank 1's
    falloff is read at N = 32 (at or below it), and every forecast of it (38-74) is on the wrong side."""
    study = json.loads((DOCS / "smollm2_sft_steps_seed2.json").read_text())
    assert study["predictions"]["lora_runs_before"] == 0 and study["complete"]
    falloff = study["measured"]["falloff"]["train"]
    assert falloff["1"] == {"status": "at_or_below", "examples": 32.0}
    assert [round(falloff[r]["examples"]) for r in ("4", "16")] == [60, 94]
    losses = study["measured"]["losses"]["train"]["16"]
    assert losses["r1"] > losses["base"] > losses["r4"]  # the diverged run
    assert study["measured"]["diverged"]["train"] == {"1": [16], "4": [], "16": []}
    facts = study["measured"]["predictors"]["forecast: all sizes (growth law), measured kappa(P)"]["train"]
    assert [round(facts[r]["ratio"], 1) for r in ("4", "16")] == [2.0, 5.1]
    probes = json.loads((DOCS / "smollm2_lora_probes_sft_seed2.json").read_text())
    between = json.loads((DOCS / "smollm2_lora_probes_sft_seed2_r32.json").read_text())
    for result in (probes, between):
        assert result["predictions"]["study_lora_runs_before"] == 0
        assert result["falloff"]["16"] == falloff["16"] and result["falloff"]["1"] == falloff["1"]
    assert between["predictions"]["new_rank_runs_before"] == 0
    measured_32 = measure.crossing({int(n): v for n, v in between["held_share"]["32"].items()})
    assert measured_32 == between["falloff"]["32"] and round(measured_32["examples"]) == 110
    written = {**{r: v for r, v in probes["verdicts"].items() if r in ("4", "16")}, "32": between["verdicts"]["32"]}
    assert {r: round(v["ratio"], 2) for r, v in written.items()} == {"4": 1.25, "16": 1.60, "32": 0.75}
    assert all(0.5 <= v["ratio"] <= 2.0 for v in written.values())
    assert probes["verdicts"]["1"] == {"ratio": None, "consistent": False}
    from lorascope.analysis.capacity import REAL_TEXT_FINDING

    assert "1.25x / 1.60x at ranks 4 / 16 (kappa from facts 2.0x / 5.1x)" in REAL_TEXT_FINDING
    assert "put rank 32 at 0.75x" in REAL_TEXT_FINDING


def test_predicted_first_on_continued_pretraining_every_measured_rank_from_4_to_32_is_within_2x():
    """Continued pretraining, 64 steps, seed 2 (docs/realdata_smollm2.md, "Predicted first on continued pretraining"):
    both LoRA-probe forecasts were written (and committed) before any LoRA run of the study; ranks 4 and 16 at 1.10x
    and 1.11x from probes of ranks 1-4, ranks 4, 16 and 32 at 1.41x, 0.77x and 0.74x from probes of 16 and 64, where
    kappa from random facts at a plateau, written first too, was 1.84x and 4.28x late."""
    study = json.loads((DOCS / "smollm2_steps_seed2.json").read_text())
    assert study["predictions"]["lora_runs_before"] == 0 and study["complete"]
    falloff = study["measured"]["falloff"]["train"]
    assert falloff["1"] == {"status": "at_or_below", "examples": 16.0}
    assert [round(falloff[r]["examples"]) for r in ("4", "16")] == [40, 74]
    facts = study["measured"]["predictors"]["forecast: all sizes (growth law), measured kappa(P)"]["train"]
    assert [round(facts[r]["ratio"], 2) for r in ("4", "16")] == [1.84, 4.28]
    low = json.loads((DOCS / "smollm2_lora_probes_steps_seed2.json").read_text())
    high = json.loads((DOCS / "smollm2_lora_probes_steps_seed2_r32.json").read_text())
    for result in (low, high):
        assert result["predictions"]["study_lora_runs_before"] == 0
        assert result["falloff"]["4"] == falloff["4"] and result["falloff"]["16"] == falloff["16"]
    assert high["predictions"]["new_rank_runs_before"] == 0 and round(high["falloff"]["32"]["examples"]) == 79
    assert {r: round(low["verdicts"][r]["ratio"], 2) for r in ("4", "16")} == {"4": 1.10, "16": 1.11}
    assert {r: round(high["verdicts"][r]["ratio"], 2) for r in ("4", "16", "32")} == {"4": 1.41, "16": 0.77,
                                                                                       "32": 0.74}
    assert low["verdicts"]["1"]["consistent"] is False and high["verdicts"]["1"]["consistent"] is False
    from lorascope.analysis.capacity import REAL_TEXT_FINDING

    assert "1.10x / 1.11x at ranks 4 / 16 (facts 1.84x / 4.28x)" in REAL_TEXT_FINDING


def test_sft_at_128_steps_was_predicted_before_any_lora_run():
    """docs/realdata_smollm2.md, "Predicted first on SFT in 128 steps": the forecast file was written (and committed)
    before the study's first LoRA run and before rank 32's; its forecasts are what the result JSON compares."""
    predictions = json.loads((DOCS / "smollm2_lora_probes_sft128_seed3_predictions.json").read_text())
    result = json.loads((DOCS / "smollm2_lora_probes_sft128_seed3.json").read_text())
    assert predictions["study_lora_runs_before"] == 0 and predictions["new_rank_runs_before"] == 0
    assert result["predictions"] == predictions
    assert {r: round(v["examples"]) for r, v in predictions["forecast"].items()} == {
        "1": 39, "2": 66, "4": 93, "16": 108, "32": 108}
    assert {r: round(v["examples"]) for r, v in result["falloff"].items()} == {"1": 33, "4": 95, "16": 178, "32": 215}


def test_probes_on_twice_the_slice_leave_the_large_ranks_early():
    """docs/realdata_smollm2.md, "Predicted first on SFT in 128 steps" (post hoc): probes of ranks 1, 2 and 4 on 256
    examples, where rank 4 absorbed under half of full fine-tuning's bits (76% on 128), still put ranks 16 and 32
    about half as far as they fell off: the slice did not set the early ceiling. Each rank's own probe on that
    slice placed it within 0.91-1.09x."""
    small = json.loads((DOCS / "smollm2_lora_probes_sft128_seed3.json").read_text())
    large = json.loads((DOCS / "smollm2_lora_probes_sft128_seed3_n256.json").read_text())
    assert small["probe_slice"]["examples"] == 128 and large["probe_slice"]["examples"] == 256
    points = {p["rank"]: p for p in large["predictions"]["calibration"]["points"]}
    assert 0.45 < points[4]["bits_stored"] / points[4]["bits_offered"] < 0.5
    assert large["falloff"] == small["falloff"]  # the same study, the same measured falloffs
    for rank in ("16", "32"):
        assert large["verdicts"][rank]["ratio"] < 0.6 and small["verdicts"][rank]["ratio"] < 0.65
    assert {r: round(large["own_rank"][r]["ratio"], 2) for r in ("4", "16", "32")} == {
        "4": 1.09, "16": 1.0, "32": 0.91}


@pytest.mark.parametrize(("name", "rank", "forecast", "falloff", "shares"), [
    ("smollm2_lora_probes_sft128_seed3_r8", "8", 151, 147, [1.0, 0.96, 0.69]),
    ("smollm2_lora_probes_sft128_seed3_r64", "64", 198, 223, [1.0, 0.99, 0.88, 0.69]),
    ("smollm2_lora_probes_cpt128_r8", "8", 98, 102, [0.99, 0.85, 0.46]),  # continued pretraining, 128 steps
])
def test_ranks_between_and_past_the_probes_were_predicted_before_their_runs(name, rank, forecast, falloff, shares):
    """docs/realdata_smollm2.md, "Predicted first: the ranks around the choice": on SFT in 128 steps, probes of
    ranks 4 and 16 put rank 8 at 1.02x, probes of 16 and 32 put rank 64 at 0.89x; on continued pretraining probes
    of ranks 4 and 16 put rank 8 at 0.96x; each written before its runs."""
    predictions = json.loads((DOCS / f"{name}_predictions.json").read_text())
    result = json.loads((DOCS / f"{name}.json").read_text())
    assert predictions["new_rank"] == int(rank) and predictions["new_rank_runs_before"] == 0
    assert result["predictions"] == predictions
    assert result["probe_slice"]["examples"] == 256
    assert round(predictions["forecast"][rank]["examples"]) == forecast
    held = {int(n): v for n, v in result["held_share"][rank].items()}
    assert [round(held[n], 2) for n in sorted(held)] == shares
    assert measure.crossing(held) == result["falloff"][rank] and round(result["falloff"][rank]["examples"]) == falloff
    assert 0.85 < forecast / falloff < 1.05
    from lorascope.analysis.capacity import REAL_TEXT_FINDING  # said wherever a forecast is shown

    assert f"put rank {rank} at {result['verdicts'][rank]['ratio']:.2f}x" in REAL_TEXT_FINDING
