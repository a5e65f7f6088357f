"""The check of LoRA-probe readings that take the slice's offer into account (docs/capacity.md, "Capacity at a step
budget"): recomputed from the checked-in probe sets, and the finding it supports, that none beats today's reading."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "realdata"
sys.path.insert(0, str(ROOT / "examples" / "realdata"))

import smollm2_slice_offer as slice_offer  # noqa: E402


@pytest.fixture(scope="module")
def rerun(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("slice") / "slice_offer.json"
    assert slice_offer.main(["--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_the_checked_in_json_is_what_the_script_computes(rerun):
    saved = json.loads((DOCS / "smollm2_slice_offer.json").read_text())
    for reading, ranges in saved["ranges"].items():
        assert rerun["ranges"][reading] == pytest.approx(ranges, rel=1e-9)
    for name, rows in saved["sets"].items():
        for reading, ranks in rows["readings"].items():
            assert {r: v["runway"] for r, v in rerun["sets"][name]["readings"][reading].items()} == pytest.approx(
                {r: v["runway"] for r, v in ranks.items()}, rel=1e-9)


def test_todays_reading_is_the_forecast_the_probe_results_keep(rerun):
    for name, rows in rerun["sets"].items():
        kept = json.loads((DOCS / name).read_text())["forecast_now"]
        for rank, row in rows["readings"]["today"].items():
            assert row["runway"] == pytest.approx(kept[rank]["examples"], rel=1e-9), (name, rank)


def test_no_reading_of_the_slice_offer_forecasts_better_than_today(rerun):
    ranges = {reading: (round(r["low"], 2), round(r["high"], 2), r["within_2x"], r["wrong_side"])
              for reading, r in rerun["ranges"].items()}
    assert ranges == {"today": (0.50, 1.23, 22, 2), "capacity": (0.77, 6.24, 18, 2),
                      "consistent": (0.21, 2.18, 14, 0), "harmonic": (1.05, 97.19, 11, 3)}
    # the offer helps where the probes held little of their slice in 64 steps and hurts where they held most in 128
    capacity = rerun["sets"]["smollm2_lora_probes_steps_seed2_r32.json"]["readings"]["capacity"]
    assert all(0.95 < capacity[r]["ratio"] < 1.15 for r in ("4", "16", "32"))
    sft128 = rerun["sets"]["smollm2_lora_probes_sft128_seed3.json"]
    assert round(sft128["shares"]["4"], 2) == 0.76 and sft128["readings"]["capacity"]["16"]["ratio"] > 2


def test_a_probe_that_held_all_its_slice_offer_has_a_finite_capacity():
    assert slice_offer._from_offer(100.0, 100.0) == pytest.approx(100.0 * 4.60517, rel=1e-5)
    assert slice_offer._harmonic(50.0, 100.0) == pytest.approx(100.0)
