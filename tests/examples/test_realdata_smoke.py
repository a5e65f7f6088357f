"""The real-data study (examples/realdata/run.py) end to end at its smoke tier (in-process, seconds).

The smoke tier's numbers mean nothing; the test checks that every phase wrote its files, that predictions.json was
written before the first LoRA run, and that the result tables hold every rank, criterion and predictor.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")
pytest.importorskip("sklearn")

STUDY = Path(__file__).resolve().parents[2] / "examples" / "realdata"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    # Its own module name: examples/reproduce/run.py is a module "run" too (tests/examples/test_reproduce_quick.py)
    spec = importlib.util.spec_from_file_location("realdata_run", STUDY / "run.py")
    run = importlib.util.module_from_spec(spec)
    sys.modules["realdata_run"] = run
    try:
        spec.loader.exec_module(run)
        out = tmp_path_factory.mktemp("realdata") / "out"
        assert run.main(["--smoke", "-o", str(out)]) == 0
        yield run, out, json.loads((out / "results.json").read_text())
    finally:
        sys.modules.pop("realdata_run", None)


def test_every_phase_wrote_its_files(smoke):
    run, out, results = smoke
    for name in run.OUTPUTS:
        assert (out / name).exists(), name
    tier = run.TIERS["smoke"]
    names = {r["name"] for r in results["runs"]}
    assert len(names) == (len(tier.full_lrs) + len(tier.ranks) * len(tier.lora_lrs)) * len(tier.sizes) * len(
        tier.seeds)
    for name in names:
        assert (out / "runs" / f"{name}.h5").stat().st_size > 0
    corpus = json.loads((out / "corpus.json").read_text())
    assert corpus["a"]["bytes"] > 100_000 and corpus["b"]["training_pool_sequences"] >= max(tier.sizes)
    assert "# Real-data study" in (out / "results.md").read_text()


def test_predictions_precede_the_lora_runs(smoke):
    _, out, results = smoke
    predictions = json.loads((out / "predictions.json").read_text())
    assert predictions["lora_runs_before"] == 0
    written = (out / "predictions.json").stat().st_mtime
    lora = [r for r in results["runs"] if r["target"] != "full"]
    full = [r for r in results["runs"] if r["target"] == "full"]
    assert lora and full
    for r in lora:
        assert (out / "runs" / f"{r['name']}.h5").stat().st_mtime >= written
    for r in full:
        assert (out / "runs" / f"{r['name']}.h5").stat().st_mtime <= written


def test_predictions_refused_once_a_lora_run_exists(smoke):
    run, out, _ = smoke
    with pytest.raises(RuntimeError, match="predictions must come first"):
        run.predict(run.TIERS["smoke"], out, None, {}, print)


def test_results_hold_every_rank_criterion_and_predictor(smoke):
    run, _, results = smoke
    tier = run.TIERS["smoke"]
    ranks = sorted(str(r) for r in tier.ranks)
    for criterion in ("train", "held"):
        assert sorted(results["falloff"][criterion]) == ranks
        for f in results["falloff"][criterion].values():
            assert f["status"] in ("measured", "at_or_below", "beyond")
    assert {"forecast: all sizes (growth law)", "forecast: size only (1 bit per token)"} <= set(results["predictors"])
    assert {f"forecast: N={n} (linear)" for n in tier.sizes} <= set(results["predictors"])
    for cells in results["predictors"].values():
        for criterion in ("train", "held"):
            assert sorted(cells[criterion]) == ranks
            for cell in cells[criterion].values():
                assert cell["ratio"] is None or cell["ratio"] > 0
    assert sorted(results["bits_per_example"]) == sorted(str(n) for n in tier.sizes)
    assert results["growth"]["exponent"] > 0
    assert results["lr_cells"] == len(results["learning_rates"]) > 0


def test_remeasure_and_report_reproduce_the_results(smoke, tmp_path, capsys):
    import shutil

    run, out, results = smoke
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("runs", "base.pt"))
    assert run.main(["--remeasure", str(copy)]) == 0
    assert json.loads((copy / "results.json").read_text()) == results
    assert run.main(["--report", str(copy / "results.json")]) == 0
    assert capsys.readouterr().out == (out / "results.md").read_text()


def test_docs_tables_are_the_checked_in_json(smoke, capsys):
    """docs/realdata.md's tables are `run.py --report docs/realdata/results.json`, unedited."""
    run, _, _ = smoke
    docs = STUDY.parents[1] / "docs"
    assert run.main(["--report", str(docs / "realdata" / "results.json")]) == 0
    doc = (docs / "realdata.md").read_text()
    for line in capsys.readouterr().out.splitlines()[1:]:
        assert ("#" + line if line.startswith("## ") else line) in doc, line


def test_repredict_reads_the_studys_probes_again_and_measures_against_its_lora_runs(smoke, tmp_path):
    import subprocess

    _, out, results = smoke
    target = tmp_path / "repredicted.json"
    done = subprocess.run([sys.executable, str(STUDY / "repredict.py"), str(out), "--out", str(target)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    repredicted = json.loads(target.read_text())
    assert repredicted["predictors_before"] == results["predictors"]
    after = repredicted["predictors_after"]["forecast: all sizes (growth law)"]
    assert set(after) == {"train", "held"} and all(len(cells) == len(results["lora_parameters"])
                                                   for cells in after.values())
    assert all(r["read_at_epochs"] > 1 for r in repredicted["forecast_all_sizes"]["recordings"])


def test_the_batch_size_experiment_brackets_each_optimum_at_the_same_epochs(smoke, tmp_path, capsys):
    """examples/realdata/batch_size.py at the smoke tier on the smoke study's base: every batch size trains the
    same epochs, each best learning rate is interior to its grid or flagged, and --tables prints the JSON."""
    import shutil

    run, out, _ = smoke
    saved = sys.modules.get("run")
    sys.modules["run"] = run  # batch_size.py imports the study as "run"
    try:
        spec = importlib.util.spec_from_file_location("realdata_batch_size", STUDY / "batch_size.py")
        batch = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(batch)
    finally:
        if saved is None:
            sys.modules.pop("run", None)
        else:
            sys.modules["run"] = saved
    shutil.copy(out / "base.pt", tmp_path / "base.pt")
    assert batch.main(["--smoke", "-o", str(tmp_path), "--examples", "32", "--batches", "4,16", "--ranks", "1"]) == 0
    document = json.loads((tmp_path / "batch_size.json").read_text())
    assert [(row["batch_size"], row["rank"], row["steps"]) for row in document["rows"]] == [(4, 1, 16), (16, 1, 4)]
    for row in document["rows"]:
        for loss in ("train", "held"):
            cell = row[loss]
            for target, name in (("full", "full"), ("all-linear", "lora")):
                runs = [r for r in document["runs"] if r["batch_size"] == row["batch_size"] and r["target"] == target]
                best = min(runs, key=lambda r: r[f"{loss}_loss"])
                assert cell[f"{name}_loss"] == best[f"{loss}_loss"] and cell[f"{name}_lr"] == best["lr"]
                lrs = sorted(r["lr"] for r in runs)
                assert len(lrs) >= 2 and (cell[f"{name}_edge"] is not None or lrs[0] < best["lr"] < lrs[-1])
            assert cell["lr_ratio"] == pytest.approx(cell["lora_lr"] / cell["full_lr"])
    capsys.readouterr()
    assert batch.main(["--tables", str(tmp_path / "batch_size.json")]) == 0
    assert "| 16 | 4 | 1 |" in capsys.readouterr().out
    assert batch.main(["--tables", str(tmp_path / "missing.json")]) == 2


def _smollm2_calibrate():
    spec = importlib.util.spec_from_file_location("smollm2_calibrate", STUDY / "smollm2_calibrate.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(STUDY))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(STUDY))
    return module


def test_the_smollm2_calibration_tables_are_the_checked_in_json():
    """docs/capacity.md's SmolLM2 tables are `smollm2_calibrate.py --table` of the JSON in docs/realdata/."""
    module = _smollm2_calibrate()
    docs = STUDY.parents[1] / "docs"
    capacity = (docs / "capacity.md").read_text()
    names = ("smollm2_calibration.json", "smollm2_calibration_load2.json", "smollm2_calibration_alllinear_load2.json",
             "smollm2_calibration_alllinear_r4_load2.json", "smollm2_calibration_alllinear_r8_load2.json",
             "smollm2_calibration_alllinear_r8_load1.json", "smollm2_calibration_alllinear_r8_load1.5.json")
    for name in names:
        assert module.tables(str(docs / "realdata" / name)) in capacity, name


def test_the_all_linear_ranks_run_separately_are_fitted_together(capsys):
    """docs/capacity.md's kappa(P) through SmolLM2's all-linear ranks is `smollm2_calibrate.py --fit` of their JSON;
    calibrations of another recipe (target, rate, epochs) are refused with exit 2."""
    module = _smollm2_calibrate()
    realdata = STUDY.parents[1] / "docs" / "realdata"
    runs = [str(realdata / f"smollm2_calibration_alllinear{part}_load2.json") for part in ("", "_r4", "_r8")]
    assert module.main(["--fit", *runs]) == 0
    line = capsys.readouterr().out.strip()
    assert line == ("ranks 1, 2, 4: kappa 0.582, 0.569, 0.831; fit kappa(P) ~ P^+0.26, 0.544 at 10,176 to 0.778 at "
                    "40,704 LoRA parameters, residual 0.16; left out: rank 8 (0.230, under half of rank 4's 0.831: a "
                    "collapse)")
    assert line in (STUDY.parents[1] / "docs" / "capacity.md").read_text()
    # rank 8 again at load 1: it did not collapse there, so the rank keeps that load, as calibrate keeps a retry
    assert module.main(["--fit", *runs, str(realdata / "smollm2_calibration_alllinear_r8_load1.json")]) == 0
    line = capsys.readouterr().out.strip()
    assert line == ("ranks 1, 2, 4, 8: kappa 0.582 (load 2), 0.569 (load 2), 0.831 (load 2), 0.844 (load 1, not full: "
                    "a lower bound); fit kappa(P) ~ P^+0.22, 0.555 at 10,176 to 0.869 at 81,408 LoRA parameters, "
                    "residual 0.12; left out: rank 8 at load 2 (0.230: load 1 held more)")
    assert line in (STUDY.parents[1] / "docs" / "capacity.md").read_text()
    # and at load 1.5, between the two: full, and more than load 1 held, so it replaces the lower bound
    assert module.main(["--fit", *runs, str(realdata / "smollm2_calibration_alllinear_r8_load1.json"),
                        str(realdata / "smollm2_calibration_alllinear_r8_load1.5.json")]) == 0
    line = capsys.readouterr().out.strip()
    assert line == ("ranks 1, 2, 4, 8: kappa 0.582 (load 2), 0.569 (load 2), 0.831 (load 2), 1.016 (load 1.5); fit "
                    "kappa(P) ~ P^+0.30, 0.535 at 10,176 to 0.989 at 81,408 LoRA parameters, residual 0.12; left out: "
                    "rank 8 at load 1 (0.844: load 1.5 held more), rank 8 at load 2 (0.230: load 1.5 held more)")
    assert line in (STUDY.parents[1] / "docs" / "capacity.md").read_text()
    with pytest.raises(SystemExit) as refused:  # attention-only: another target
        module.main(["--fit", runs[0], str(realdata / "smollm2_calibration_load2.json")])
    assert refused.value.code == 2
    assert "one recipe" in capsys.readouterr().err


def test_the_smollm2_repredicted_tables_are_the_checked_in_json():
    """docs/realdata_smollm2.md's post-hoc forecast tables are `smollm2_repredict.py --tables` of the checked-in JSON,
    and each verdict in it follows from its own runway and the measured falloff."""
    spec = importlib.util.spec_from_file_location("smollm2_repredict", STUDY / "smollm2_repredict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    docs = STUDY.parents[1] / "docs"
    result = json.loads((docs / "realdata" / "smollm2_repredicted.json").read_text())
    assert module.tables(result) in (docs / "realdata_smollm2.md").read_text()
    for data in result["tasks"].values():
        assert len(data["forecasts"]) == 6  # two probe learning rates x three kappas
        for forecast in data["forecasts"].values():
            for criterion, cells in forecast["verdicts"].items():
                for rank, cell in cells.items():
                    predicted = forecast["rows"][rank]["examples"]
                    assert cell == module.measure.verdict(predicted, data["falloff"][criterion][rank])
