"""The reproduction study (examples/reproduce/run.py) end to end, at its smallest tier (``--smoke``, in-process).

The numbers of the smoke tier mean nothing; the test checks that every phase runs and writes what it promises:
the predictions before any LoRA run, run files lorascope can read, compare's output, the result tables and plots.
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")

import lorascope  # noqa: E402

PREDICTORS = {
    "information (size, default constant)", "information (size, calibrated)", "information (probe, default constant)",
    "information (probe, calibrated)", "spectral (energy rank)", "spectral (signal rank)", "spectral (rank residual)",
}


@pytest.fixture(scope="module")
def study_modules(reproduce_scripts):
    return reproduce_scripts("run"), reproduce_scripts("repro_measure")


@pytest.fixture(scope="module")
def smoke(study_modules, tmp_path_factory):
    run, _ = study_modules
    out = tmp_path_factory.mktemp("reproduce") / "out"
    assert run.main(["--smoke", "-o", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text()), run.TIERS["smoke"]


def test_results_json_has_every_finding(smoke):
    out, results, tier = smoke
    ranks = [str(r) for r in tier.ranks]
    assert results["tier"]["name"] == "smoke"
    assert sorted(results["falloff"]) == sorted(ranks)
    for f in (*results["falloff"].values(), *results["falloff_loss"].values()):
        assert f["status"] in ("measured", "at_or_below", "beyond")
        assert f["examples"] >= min(tier.sizes)
    assert set(results["predictors"]) == PREDICTORS
    for cells in results["predictors"].values():
        assert sorted(cells) == sorted(ranks)
        for cell in cells.values():
            assert cell["ratio"] is None or cell["ratio"] > 0
    for r in ranks:
        assert all(0 <= share <= 1.5 for share in results["held"][r].values())
    assert results["lr"]["rows"] and all(row["ratio"] > 0 for row in results["lr"]["rows"])
    assert {row["batch_size"] for row in results["batch"]["rows"]} == set(tier.batch_sizes)
    targets = {row["target"]: row for row in results["targets"]["rows"]}
    assert set(targets) == {"full", "attention-only", "mlp-only", "all-linear"}
    per_rank = results["model"]["lora_parameters_per_rank"]
    for target in ("attention-only", "mlp-only", "all-linear"):
        assert targets[target]["lora_parameters"] == per_rank[target] * targets[target]["rank"]  # PEFT == lorascope
    assert len(results["compare"]["comparison"]["loras"]) == len(tier.ranks)
    assert results["runtime_seconds"] > 0 and math.isfinite(results["run_seconds"]["per_example_ms"])


def test_predictions_precede_the_lora_runs(smoke):
    out, results, _ = smoke
    predictions = json.loads((out / "predictions.json").read_text())
    assert predictions["lora_runs_before"] == 0
    written = (out / "predictions.json").stat().st_mtime
    lora_files = [r for r in results["runs"] if r["target"] != "full"]
    assert lora_files
    for r in lora_files:
        assert (out / "runs" / r["experiment"] / f"{r['name']}.h5").stat().st_mtime >= written
    for name in ("size_default_constant", "size_calibrated", "probe_default_constant", "probe_calibrated"):
        document = json.loads((out / "recommend" / f"{name}.json").read_text())
        assert document["format"] == "lorascope-recommend"
    assert json.loads((out / "calibration.json").read_text())["format"] == "lorascope-calibration"


def test_every_run_file_is_readable(smoke):
    out, results, _ = smoke
    for r in results["runs"]:
        with lorascope.open_run(out / "runs" / r["experiment"] / f"{r['name']}.h5") as run:
            assert run.complete
            assert run.config["dataset"]["examples"] == r["examples"]
            steps = run.steps
            assert int(steps["step"].values[-1]) == r["steps"]
            assert int(steps["batch_loss_tokens"].values[0]) == min(r["batch_size"], r["examples"])  # the value only
            if r["target"] != "full":
                lora = run.config["lora"]["default"]
                assert (lora["r"], lora["lora_alpha"], lora["scaling_rule"]) == (r["rank"], 32, "alpha/r")


def test_compare_report_tables_and_plots(smoke):
    out, _, _ = smoke
    compared = json.loads((out / "compare" / "compare.json").read_text())
    assert compared["format"] == "lorascope-compare"
    assert (out / "compare" / "compare.png").stat().st_size > 0
    text = (out / "results.md").read_text()
    for heading in ("## Findings", "## Predicted vs measured falloff", "## lorascope compare", "## Batch size",
                    "## Target sets at matched parameter count"):
        assert heading in text
    for plot in ("falloff", "predicted_vs_measured", "lr", "batch", "targets"):
        assert (out / "plots" / f"{plot}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_refuses_a_non_empty_folder(study_modules, smoke, capsys):
    run, _ = study_modules
    out, _, _ = smoke
    assert run.main(["--smoke", "-o", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_crossing_and_verdict(study_modules):
    _, measure = study_modules
    found = measure.crossing({100: 1.0, 200: 0.95, 400: 0.85, 800: 0.5})
    assert found["status"] == "measured"
    assert found["examples"] == pytest.approx(100 * 2 ** 1.5)  # halfway from 200 to 400 on a log axis
    assert measure.crossing({100: 0.5, 200: 0.4}) == {"status": "at_or_below", "examples": 100.0}
    assert measure.crossing({100: 1.0, 200: 0.95}) == {"status": "beyond", "examples": 200.0}
    assert measure.verdict(300.0, found)["ratio"] == pytest.approx(300 / found["examples"])
    assert measure.verdict(5000.0, {"status": "beyond", "examples": 4096.0})["consistent"] is True
    assert measure.verdict(1000.0, {"status": "beyond", "examples": 4096.0})["consistent"] is False
    assert measure.verdict(None, {"status": "beyond", "examples": 4096.0})["consistent"] is True
    assert measure.verdict(128.0, {"status": "at_or_below", "examples": 128.0}, "at_or_below")["consistent"] is True


def test_matched_ranks_balance_parameter_counts(study_modules, smoke):
    run, _ = study_modules
    out, results, _ = smoke
    matched = run.matched_ranks(run.train.load_base(out / "base.pt"), 8)
    per_rank = results["model"]["lora_parameters_per_rank"]
    budget = per_rank["mlp-only"] * 8
    for target in ("attention-only", "all-linear"):
        assert abs(per_rank[target] * matched[target] - budget) <= per_rank[target] / 2  # the nearest rank


@pytest.mark.slow
def test_quick_mode(study_modules, tmp_path):
    """``run.py --quick`` itself, the issue's CI smoke test of the study: every phase, at the sizes
    docs/reproduction.md quotes. Outside the default tier (10-11 minutes on one of its two workers, most of the
    suite's time): .ci/run runs it in a step of its own, on both cores (``--jobs 2``)."""
    run, _ = study_modules
    assert run.main(["--quick", "--jobs", "2", "-o", str(tmp_path / "out")]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["tier"]["name"] == "quick"
    # the quick and full tiers also calibrate kappa(r) and predict with it
    assert set(results["predictors"]) == PREDICTORS | {"information (size, calibrated kappa(r))",
                                                      "information (probe, calibrated kappa(r))"}
    assert json.loads((tmp_path / "out" / "calibration_kappa.json").read_text())["training"]["budget"] == 1_500_000
    assert (tmp_path / "out" / "compare" / "compare.json").is_file()


def test_the_kappa_calibration_offers_its_bracket_and_each_rank(smoke, study_modules, tmp_path):
    """The full tier's second calibration (kappa(r), issue 13): calibrate's bracket at the smallest rank, then
    each rank, within the budget, saved where the study reads it."""
    out, _, _ = smoke
    train = importlib.import_module("repro_train")
    path = tmp_path / "calibration_kappa.json"
    result = train.calibrate_job({"kind": "calibrate", "base": str(out / "base.pt"), "path": str(path), "epochs": 4,
                                  "seed": 1, "recipe": "kappa", "ranks": [1, 2], "budget": 200_000})
    document = json.loads(path.read_text())
    assert result["kind"] == "calibrate" and result["path"] == str(path)
    assert document["training"]["budget"] == 200_000 and document["training"]["examples_trained"] <= 200_000
    assert document["training"]["bracket_loads"] == [0.5, 1.0, 2.0, 4.0, 8.0]
    assert document["bracket"]["rank"] == 1 and len(document["bracket"]["held_bits"]) == 5
    assert [p["rank"] for p in document["points"]] == [1, 2]


def test_the_report_prints_kappa_at_each_rank(study_modules):
    report = importlib.import_module("repro_report")
    results = {"predictions": {"information": {"size, calibrated kappa(r)": {
        "1": {"capacity_bits": 100.0, "lora_parameters": 200}, "4": {"capacity_bits": 300.0, "lora_parameters": 800}}}}}
    assert report._kappa_r(results) == "; kappa(r) calibrated at each rank: r1: 0.500, r4: 0.375"
    assert report._kappa_r({"predictions": {"information": {}}}) == ""


def test_repredict_adds_the_probe_read_at_the_plans_epochs_post_hoc(smoke, study_modules, tmp_path, capsys):
    """``--repredict`` on a finished study: the probe predictors at the plan's epochs, marked post hoc, beside
    the predictions written before the LoRA runs (which stay as they were)."""
    import shutil

    run, _ = study_modules
    out, results, tier = smoke
    for name in ("results.json", "calibration.json", "base.pt", "predictions.json"):
        shutil.copy(out / name, tmp_path / name)
    assert run.main(["--repredict", str(tmp_path)]) == 0
    plan = run.epochs(tier, max(tier.sizes))
    planned = json.loads((tmp_path / "predictions_planned.json").read_text())
    assert planned["plan_epochs"] == plan and planned["lora_runs_before"] > 0
    names = {f"information (probe, {k}, {plan} epochs, post hoc)" for k in ("default constant", "calibrated")}
    updated = json.loads((tmp_path / "results.json").read_text())
    assert set(updated["predictors"]) == PREDICTORS | names
    assert (tmp_path / "predictions.json").read_text() == (out / "predictions.json").read_text()
    for name in names:
        for r, cell in updated["predictors"][name].items():
            assert cell["predicted"] == planned["information"][name[len("information ("):-1]][r]["examples"]
    assert "post hoc" in (tmp_path / "results.md").read_text()
    assert run.main(["--report", str(tmp_path / "results.json")]) == 0
    assert capsys.readouterr().out.rstrip("\n").endswith((tmp_path / "results.md").read_text().rstrip("\n")[-200:])
    assert run.main(["--report", str(tmp_path / "missing.json")]) == 2


def test_the_docs_full_mode_tables_are_the_checked_in_results_unedited(study_modules):
    """docs/reproduction.md's full-mode tables are `run.py --report docs/reproduction/results.json --level 3`."""
    report = importlib.import_module("repro_report")
    docs = Path(__file__).resolve().parents[2] / "docs"
    results = json.loads((docs / "reproduction" / "results.json").read_text())
    assert results["tier"]["name"] == "full"
    assert report.markdown(results, level=3) in (docs / "reproduction.md").read_text()


def test_probe_steps_reads_every_probe_capped_at_a_uniform_guess(study_modules, tmp_path):
    """examples/reproduce/probe_steps.py at 2 epochs on a barely pretrained base: every probe row and the study's
    predictions are written; the capped reading never exceeds log2 of the 512-token vocabulary, the uncapped one
    never reads less."""
    probe_steps = importlib.import_module("probe_steps")
    out = tmp_path / "probe_steps.json"
    assert probe_steps.main(["--epochs", "2", "--pretrain-steps", "20", "-o", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [(r["facts"], r["batch_size"], r["lr"]) for r in result["rows"]] == list(probe_steps.PROBES)
    for row in result["rows"]:
        assert row["code_length_per_example"] <= math.log2(512) + 1e-9
        assert row["uncapped"]["code_length_per_example"] >= row["code_length_per_example"] - 1e-9
        assert row["first_epoch_steps"] == -(-row["facts"] // row["batch_size"])
    ranks = json.loads((probe_steps.DOCS / "results.json").read_text())["tier"]["ranks"]
    assert sorted(result["study_predictions"]["ranks"], key=int) == [str(r) for r in ranks]
