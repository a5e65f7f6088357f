"""LoRA probes read across step budgets (examples/realdata/smollm2_budget_forecast.py): the growth factor's
interpolation, its argument checks, and the checked-in result recomputed from the JSONs it reads."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples" / "realdata"))
sys.path.insert(0, str(ROOT / "examples" / "reproduce"))

import smollm2_budget_forecast as budget_forecast  # noqa: E402

RESULT = ROOT / "docs" / "realdata" / "smollm2_budget_forecast.json"


def rows(*entries):
    return {"rows": [{"steps": s, "lora_parameters": p, "kappa": k} for s, p, k in entries]}


def test_the_growth_factor_is_log_log_between_ranks_and_held_outside():
    budget = rows((64, 100, 1.0), (128, 100, 1.5), (64, 1600, 0.1), (128, 1600, 0.2), (32, 100, 0.5))
    assert budget_forecast.growth_factor(budget, 100, 64, 128) == pytest.approx(1.5)
    assert budget_forecast.growth_factor(budget, 400, 64, 128) == pytest.approx(1.5 ** 0.5 * 2.0 ** 0.5)
    assert budget_forecast.growth_factor(budget, 10, 64, 128) == pytest.approx(1.5)  # held at the smallest rank
    assert budget_forecast.growth_factor(budget, 10 ** 6, 64, 128) == pytest.approx(2.0)
    assert budget_forecast.growth_factor(budget, 100, 128, 64) == pytest.approx(1 / 1.5)
    assert budget_forecast.growth_factor(budget, 100, 32, 64) == pytest.approx(2.0)  # one rank measured both
    with pytest.raises(SystemExit, match="cannot bridge 64 to 512"):
        budget_forecast.growth_factor(budget, 100, 64, 512)


@pytest.mark.parametrize("args", [[], ["docs/realdata/smollm2_steps.json"], ["--probes", "nowhere.json", "x.json"]])
def test_missing_inputs_are_one_line_errors(args, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_:
        budget_forecast.main(args)
    assert exit_.value.code == 2
    assert "error:" in capsys.readouterr().err.strip().splitlines()[-1]


def test_a_probe_set_of_the_studies_own_budget_is_not_a_reading(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_:
        budget_forecast.main(["--probes", "docs/realdata/smollm2_lora_probes.json",
                              "docs/realdata/smollm2_steps128.json"])
    assert exit_.value.code == 2 and "another budget" in capsys.readouterr().err


@pytest.mark.skipif(not RESULT.is_file(), reason="the measurement is not checked in")
def test_the_checked_in_result_recomputes_from_its_inputs(tmp_path, monkeypatch):
    """Every reading of the JSON comes back from the study and probe JSONs its command names (no runs)."""
    result = json.loads(RESULT.read_text())
    args = shlex.split(result["command"])[2:]
    out = args.index("--out")
    args[out + 1] = str(tmp_path / "again.json")
    monkeypatch.chdir(ROOT)
    assert budget_forecast.main(args) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert _close(again["readings"], result["readings"])


def _close(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return a == pytest.approx(b, rel=1e-9)
    return a == b
