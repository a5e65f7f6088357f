"""``lorascope compare``: planted falloffs found at the planted step, no false falloff, the checks that refuse
incomparable runs, predictions, the report files, the CLI, and real recordings (full fine-tuning and a PEFT LoRA)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import lorascope
from lorascope.analysis.falloff import detect_falloff, moving_median, paired_gap, thin_grid
from lorascope.errors import InvalidOptionError, LorascopeError
from lorascope.report.compare import format_comparison, write_comparison
from lorascope.store.payloads import Snapshot
from lorascope.store.writer import RunWriter
from lorascope.workflows.compare import DEFAULT_SMOOTH, DEFAULT_THRESHOLD, DEFAULT_WINDOW, compare
from lorascope_cli.main import cli

N_STEPS, BATCH, TOKENS_PER_EXAMPLE = 400, 8, 16
PNG = b"\x89PNG\r\n\x1a\n"
MODULE = dict(name="model.layers.0.mlp.up_proj", module="model.layers.0.mlp.up_proj", parameter="weight", kind="mlp",
              role="up", layer=0, expert=-1, out_features=8, in_features=4)


def write_run(path, loss, *, rank=None, batch=BATCH, examples=True, shape=(8, 4), model_config=None,
              lora_config=True, lora_spectrum=None):
    """A real run file holding a given loss curve: one step row per value, optionally a PEFT LoRA run of ``rank``.

    ``lora_spectrum``: singular values of the (single) LoRA module's merged update, written as one snapshot.
    """
    loss = np.asarray(loss, dtype=np.float64)
    steps = np.arange(1, loss.size + 1)
    lora = rank is not None or lora_spectrum is not None
    name = ("base_model.model." if lora else "") + MODULE["name"]
    module = dict(MODULE, name=name, module=name, out_features=shape[0], in_features=shape[1], lora=lora)
    config = {"recorder": {"source": "tests/test_compare.py"}}
    if model_config is not None:
        config["model"] = {"class": "LlamaForCausalLM", "config": model_config}
    if rank is not None and lora_config:
        config["lora"] = {"default": {"r": rank, "lora_alpha": 32, "use_rslora": False, "scaling_rule": "alpha/r",
                                      "rank_pattern": {}, "alpha_pattern": {}}}
    with RunWriter(path, [module], config=config, overwrite=True) as writer:
        writer.append_steps({"step": steps, "examples_seen": batch * steps if examples else np.full(loss.size, -1),
                             "tokens_seen": TOKENS_PER_EXAMPLE * batch * steps, "loss": loss,
                             "batch_examples": np.full(loss.size, batch)})
        if lora_spectrum is not None:
            sv = np.zeros(min(shape))
            sv[: len(lora_spectrum)] = lora_spectrum
            writer.append_snapshot(Snapshot(step=int(steps[-1]), examples_seen=int(batch * steps[-1]),
                                            tokens_seen=int(TOKENS_PER_EXAMPLE * batch * steps[-1]),
                                            energy=[float(np.sum(sv**2))], sv=[sv]))
    return path


def curves(seed, *, falloff_step=None, jump=0.1, slope=0.1, paired=True, noise=0.1, n=N_STEPS):
    """(full, lora) losses: a loss linear in log(steps), batch noise shared by both runs when ``paired`` (the same
    batches in the same order) plus small independent noise; LoRA follows full fine-tuning exactly until
    ``falloff_step``, then sits ``jump + slope * ln(step / falloff_step)`` above it."""
    rng = np.random.default_rng(seed)
    steps = np.arange(1, n + 1)
    clean = 3.0 - 0.35 * np.log(steps)
    batch_noise = rng.normal(0.0, noise, n)
    full = clean + batch_noise + rng.normal(0.0, 0.02, n)
    lora = clean + (batch_noise if paired else rng.normal(0.0, noise, n)) + rng.normal(0.0, 0.02, n)
    if falloff_step is not None:
        lora += np.where(steps >= falloff_step, jump + slope * np.log(steps / falloff_step), 0.0)
    return full, lora


def decades(a, b):
    return abs(float(np.log10(a / b)))


# -- the criterion on planted falloffs -------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("planted", [40, 120, 250])
def test_planted_falloff_is_found_at_the_planted_step(tmp_path, seed, planted):
    full, lora = curves(seed, falloff_step=planted)
    result = compare(write_run(tmp_path / "full.h5", full), write_run(tmp_path / "lora.h5", lora, rank=1))
    (run,) = result.loras
    assert run.status == "falloff"
    # Localised within the median window's half-width (the falloff is a jump well above the noise).
    assert decades(run.falloff_x, BATCH * planted) <= DEFAULT_SMOOTH
    assert run.falloff_x == BATCH * run.falloff_step
    assert run.transients == [] and run.gap[-1] > DEFAULT_THRESHOLD


@pytest.mark.parametrize("seed", range(5))
def test_planted_falloff_is_found_without_paired_batches(tmp_path, seed):
    full, lora = curves(seed, falloff_step=120, jump=0.3, slope=0.0, paired=False)
    run = compare(write_run(tmp_path / "full.h5", full), write_run(tmp_path / "lora.h5", lora, rank=1)).loras[0]
    assert run.status == "falloff"
    assert decades(run.falloff_x, BATCH * 120) <= 2 * DEFAULT_SMOOTH
    # The noise level is estimated: two independent batch noises of 0.1 plus 0.02 each.
    assert run.noise_sigma == pytest.approx(np.sqrt(2 * (0.1**2 + 0.02**2)), rel=0.25)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("paired", [True, False])
def test_lora_that_tracks_full_finetuning_has_no_falloff(tmp_path, seed, paired):
    full, lora = curves(seed, paired=paired)
    result = compare(write_run(tmp_path / "full.h5", full), write_run(tmp_path / "lora.h5", lora, rank=8))
    (run,) = result.loras
    assert run.status == "none" and run.falloff_x is None and run.falloff_step is None
    assert abs(run.gap[-1]) < 3 * run.gap_se[-1]  # zero within the estimated noise of the smoothed gap


def test_gradual_falloff_is_found_where_the_gap_clears_the_threshold(tmp_path):
    full, lora = curves(0, falloff_step=100, jump=0.0, slope=0.1)
    run = compare(write_run(tmp_path / "full.h5", full), write_run(tmp_path / "lora.h5", lora, rank=2)).loras[0]
    # The gap 0.1 ln(step / 100) reaches the threshold 0.02 at step 100 e^0.2 = 122; with the z = 2 margin a bit later.
    assert run.status == "falloff"
    assert 122 <= run.falloff_step <= 100 * 10**DEFAULT_WINDOW


def test_early_lag_that_closes_is_a_transient_not_a_falloff(tmp_path):
    full, lora = curves(0)
    lora = lora + np.where(np.arange(1, N_STEPS + 1) < 40, 0.3, 0.0)  # LoRA lags early, then catches up
    result = compare(write_run(tmp_path / "full.h5", full), write_run(tmp_path / "lora.h5", lora, rank=4))
    run = result.loras[0]
    assert run.status == "none"
    assert len(run.transients) == 1
    start, end = run.transients[0]
    assert start == BATCH and BATCH * 40 <= end <= BATCH * 40 * 10**DEFAULT_WINDOW
    assert any("transient" in note for note in result.notes)


def test_lora_above_from_the_start_is_flagged(tmp_path):
    full, lora = curves(0, falloff_step=1, jump=0.3, slope=0.0)
    result = compare(write_run(tmp_path / "full.h5", full), write_run(tmp_path / "lora.h5", lora, rank=1))
    assert result.loras[0].status == "falloff" and result.loras[0].falloff_step == 1
    assert any("never tracked full fine-tuning" in note for note in result.notes)
    full, lora = curves(0, falloff_step=40, jump=0.3, slope=0.0)
    result = compare(write_run(tmp_path / "full.h5", full), write_run(tmp_path / "lora.h5", lora, rank=1))
    assert not any("never tracked" in note for note in result.notes)


@pytest.mark.parametrize("seed", range(3))
def test_a_lora_slower_from_the_start_that_closes_the_gap_is_a_lag_not_a_falloff(tmp_path, seed):
    full, lora = curves(seed)
    steps = np.arange(1, N_STEPS + 1)
    lora = lora + 0.8 / np.sqrt(steps)  # behind from step 1, converging: still 0.04 above at the last step
    result = compare(write_run(tmp_path / "full.h5", full), write_run(tmp_path / "lora.h5", lora, rank=4),
                     predictions={4: 100})
    run = result.loras[0]
    assert run.status == "lag" and run.falloff_x is None
    assert any("a lag in learning speed" in note for note in result.notes)
    (row,) = result.predictions  # no falloff measured: the prediction is checked against the end of the data
    assert row.measured is None and row.measured_lower_bound == run.compared_range[1] and row.consistent is False
    assert "lag, closing" in format_comparison(result.summary)


def test_a_lora_behind_from_the_start_whose_gap_stays_is_still_a_falloff(tmp_path):
    full, lora = curves(0)
    lora = lora + 0.3 + 0.02 * np.log(np.arange(1, N_STEPS + 1))  # behind from step 1 and drifting further
    result = compare(write_run(tmp_path / "full.h5", full), write_run(tmp_path / "lora.h5", lora, rank=1))
    assert result.loras[0].status == "falloff" and result.loras[0].falloff_step == 1
    assert any("the gap does not close" in note for note in result.notes)


@pytest.mark.parametrize("rise_from", [5, 60])
def test_a_lora_whose_loss_rises_above_its_start_diverged_and_measures_no_falloff(tmp_path, rise_from):
    """A LoRA run at too high a learning rate: its loss climbs above the base model's (where it started) and stays
    there, from the first steps or after tracking full fine-tuning for a while. The gap is then large and
    sustained, but it is instability, not the rank's capacity: no falloff, no predicted-vs-measured ratio."""
    full, lora = curves(0)
    steps = np.arange(1, N_STEPS + 1)
    lora = np.where(steps >= rise_from, 4.0 + 0.02 * np.random.default_rng(1).normal(size=N_STEPS), lora)
    result = compare(write_run(tmp_path / "full.h5", full), write_run(tmp_path / "lora.h5", lora, rank=1),
                     predictions={1: 800})
    run = result.loras[0]
    assert run.status == "diverged" and run.falloff_x is None and run.falloff_step is None
    assert run.gap[-1] > 1.0  # the gap is there, and large
    assert any("its loss ended above its start" in note for note in result.notes)
    assert not any("lag in learning speed" in note or "never tracked" in note for note in result.notes)
    (row,) = result.predictions
    assert (row.status, row.measured, row.ratio, row.consistent) == ("diverged", None, None, None)
    text = format_comparison(result.summary)
    assert "diverged: its loss rose" in text and "the run diverged: it measures nothing" in text
    assert result.summary["loras"][0]["falloff"]["status"] == "diverged"


# The real study's curves (docs/realdata_smollm2.md, SFT third seed, N = 16): training losses per step, rounded to
# 0.01, of full fine-tuning at 3e-3 and of the rank-1 LoRA at 1e-2, which learned to 0.16 and blew up in its last
# four steps (its final model's loss, 5.07, ended above the base's 3.44).
REAL_FULL_N16 = [3.44, 3.42, 2.73, 2.19, 1.59, 1.46, 1.18, 0.79, 0.55, 0.42, 0.31, 0.21, 0.15, 0.11, 0.07, 0.04, 0.03,
                 0.02, 0.02, 0.01, 0.01, 0.01] + [0.0] * 42
REAL_LORA_R1_N16 = [3.44, 3.29, 3.91, 3.07, 3.08, 3.0, 2.93, 2.64, 2.5, 2.26, 2.13, 1.97, 1.94, 1.8, 1.71, 1.68, 1.54,
                    1.55, 1.41, 1.29, 1.27, 1.18, 1.12, 1.07, 0.99, 0.94, 0.9, 0.8, 0.79, 0.73, 0.68, 0.64, 0.61, 0.59,
                    0.54, 0.52, 0.51, 0.48, 0.43, 0.41, 0.38, 0.36, 0.33, 0.32, 0.3, 0.28, 0.27, 0.25, 0.25, 0.23,
                    0.21, 0.21, 0.2, 0.19, 0.18, 0.17, 0.16, 0.18, 0.17, 0.18, 0.31, 1.0, 1.36, 5.75]
REAL_LORA_R4_N16 = [3.44, 3.27, 3.76, 3.49, 2.77, 3.03, 2.75, 2.56, 2.22, 2.01, 1.84, 1.63, 1.41, 1.19, 1.01, 0.84,
                    0.67, 0.54, 0.41, 0.33, 0.25, 0.2, 0.16, 0.14, 0.1, 0.09, 0.07, 0.06, 0.05, 0.04, 0.03, 0.03,
                    0.02, 0.02, 0.02, 0.02] + [0.01] * 12 + [0.0] * 16


def test_the_real_studys_rank_1_run_that_blew_up_at_the_end_diverged(tmp_path):
    """On the real study's curves: rank 1 learned, then climbed from 0.17 to 1.36 (medians of 3) in its last steps;
    rank 4 (same learning rate, same data) did not, and keeps its falloff reading."""
    full = write_run(tmp_path / "full.h5", REAL_FULL_N16)
    result = compare(full, [write_run(tmp_path / "r1.h5", REAL_LORA_R1_N16, rank=1),
                            write_run(tmp_path / "r4.h5", REAL_LORA_R4_N16, rank=4)], predictions={1: 40, 4: 60})
    rank1, rank4 = result.loras
    assert rank1.status == "diverged"
    assert any("r1.h5: its loss climbed back at the end" in note and "1.36 at the end" in note
               for note in result.notes)
    assert rank4.status != "diverged"
    assert not any("r4.h5: its loss" in note for note in result.notes)
    rows = {row.rank: row for row in result.predictions}
    assert rows[1].status == "diverged" and rows[1].ratio is None and rows[4].status != "diverged"


def test_a_lora_that_falls_off_but_still_learns_is_not_diverged(tmp_path):
    """Falling off the full fine-tuning curve while the loss still ends below its start is a falloff: the gap grows
    by 0.5 nats, the run's own loss falls by 1.5."""
    full, lora = curves(0, falloff_step=60, jump=0.2, slope=0.15)
    run = compare(write_run(tmp_path / "full.h5", full), write_run(tmp_path / "lora.h5", lora, rank=1)).loras[0]
    assert run.status == "falloff"
    assert lora[-20:].mean() < lora[:9].mean() - 1.0


def test_falloff_at_the_end_of_the_data_is_tentative(tmp_path):
    full, lora = curves(0, falloff_step=370, jump=0.3, slope=0.0)
    run = compare(write_run(tmp_path / "full.h5", full), write_run(tmp_path / "lora.h5", lora, rank=4)).loras[0]
    assert run.status == "tentative"
    assert decades(run.falloff_x, BATCH * 370) <= DEFAULT_SMOOTH


def test_threshold_and_window_are_honoured(tmp_path):
    full, lora = curves(0, falloff_step=120, jump=0.06, slope=0.0)
    paths = write_run(tmp_path / "full.h5", full), write_run(tmp_path / "lora.h5", lora, rank=1)
    assert compare(*paths).loras[0].status == "falloff"
    assert compare(*paths, threshold=0.1).loras[0].status == "none"  # the gap of 0.06 never clears 0.1
    # A window longer than the data after the jump (0.52 decades) cannot be confirmed: tentative.
    assert compare(*paths, window=0.8).loras[0].status == "tentative"


def test_relative_gap(tmp_path):
    rng = np.random.default_rng(0)
    steps = np.arange(1, N_STEPS + 1)
    full = (2.0 - 0.25 * np.log(steps)) * (1 + rng.normal(0, 0.01, N_STEPS))
    lora = full * np.where(steps >= 150, 1.1, 1.0)  # 10% above full fine-tuning from step 150
    result = compare(write_run(tmp_path / "full.h5", full), write_run(tmp_path / "lora.h5", lora, rank=1),
                     relative=True, threshold=0.05)
    run = result.loras[0]
    assert run.status == "falloff" and decades(run.falloff_x, BATCH * 150) <= DEFAULT_SMOOTH
    assert run.gap[-1] == pytest.approx(0.1, rel=1e-6)
    assert result.to_dict()["criterion"]["units"] == "fraction of the full fine-tuning loss"


@pytest.mark.parametrize(("x", "scale"), [("tokens_seen", TOKENS_PER_EXAMPLE * BATCH), ("step", 1)])
def test_other_data_axes_find_the_same_step(tmp_path, x, scale):
    full, lora = curves(1, falloff_step=120)
    paths = write_run(tmp_path / "full.h5", full), write_run(tmp_path / "lora.h5", lora, rank=1)
    by_examples = compare(*paths).loras[0]
    other = compare(*paths, x=x).loras[0]
    assert other.falloff_step == by_examples.falloff_step
    assert other.falloff_x == scale * other.falloff_step


def test_runs_with_different_batch_sizes_are_aligned_on_examples(tmp_path):
    full, _ = curves(0, n=800)
    examples_full = 4 * np.arange(1, 801)
    _, lora = curves(0, n=400, falloff_step=120, paired=False, jump=0.3, slope=0.0)
    # The LoRA run takes 8 examples per step: the same clean curve on examples, a falloff at 960 examples.
    lora = lora - 0.35 * np.log(2.0)  # the clean loss at step s of the half-batch run is the full run's at 2s
    result = compare(write_run(tmp_path / "full.h5", full, batch=4), write_run(tmp_path / "lora.h5", lora, rank=1))
    run = result.loras[0]
    assert examples_full[-1] == 3200 and run.status == "falloff"
    assert decades(run.falloff_x, BATCH * 120) <= 2 * DEFAULT_SMOOTH
    assert any("batch of 8 examples against 4" in note for note in result.notes)


# -- the pieces of the criterion -------------------------------------------------------------------------------


def test_moving_median_equals_a_brute_force_reference():
    rng = np.random.default_rng(3)
    lx = np.sort(rng.uniform(0, 3, 200))
    values = rng.normal(size=200)
    at = np.linspace(-0.1, 3.1, 57)
    got, counts = moving_median(lx, values, at, 0.1, 5)
    for a, g, c in zip(at, got, counts):
        inside = np.abs(lx - a) <= 0.1
        if inside.sum() >= 5:
            expected, n = np.median(values[inside]), inside.sum()
        else:  # the 5 nearest points
            nearest = np.sort(np.argsort(np.abs(lx - a), kind="stable")[:5])
            expected, n = np.median(values[nearest]), 5
        assert g == pytest.approx(expected) and c == n


def test_paired_gap_and_thin_grid():
    x = np.array([1.0, 2.0, 4.0, 8.0])
    np.testing.assert_allclose(paired_gap(x, [1.0, 1.0, 1.0, 1.0], [1.0, 8.0], [1.0, 0.4]), [0.0, 0.2, 0.4, 0.6])
    lx = np.log10(np.arange(1, 100001))
    grid = thin_grid(lx, per_decade=100)
    assert grid[0] == 0 and grid[-1] == lx.size - 1 and np.all(np.diff(grid) > 0)
    assert grid.size <= 5 * 100 + 1
    assert np.array_equal(thin_grid(np.log10(np.arange(1, 6))), np.arange(5))  # short runs keep every point


def test_detect_falloff_needs_evidence_beyond_the_threshold():
    lx = np.linspace(0, 3, 61)
    gap = np.where(lx >= 1.5, 0.05, 0.0)
    assert detect_falloff(lx, gap, np.full(61, 0.01), threshold=0.02, window=0.2, z=2.0).status == "falloff"
    # Same gap, standard error 0.02: 0.05 - 2 * 0.02 does not clear 0.02.
    assert detect_falloff(lx, gap, np.full(61, 0.02), threshold=0.02, window=0.2, z=2.0).status == "none"


# -- rank, predictions, result and report ----------------------------------------------------------------------


def test_rank_alpha_and_scaling_from_the_peft_config(tmp_path):
    full, lora = curves(0)
    result = compare(write_run(tmp_path / "full.h5", full), write_run(tmp_path / "lora.h5", lora, rank=4))
    run = result.loras[0]
    assert (run.rank, run.rank_source, run.lora_alpha, run.scaling, run.scaling_rule) == (4, "config", 32, 8.0,
                                                                                        "alpha/r")
    assert run.run.label == "r=4"


def test_rank_inferred_from_the_recorded_spectrum(tmp_path):
    full, lora = curves(0)
    path = write_run(tmp_path / "lora.h5", lora, lora_spectrum=[3.0, 1.0, 1e-7])
    result = compare(write_run(tmp_path / "full.h5", full), path)
    assert (result.loras[0].rank, result.loras[0].rank_source) == (2, "spectrum")
    assert any("inferred r = 2" in note for note in result.notes)


def test_explicit_rank_accepts_a_lora_peft_does_not_describe(tmp_path):
    full, lora = curves(0)
    paths = write_run(tmp_path / "full.h5", full), write_run(tmp_path / "mine.h5", lora)
    with pytest.raises(LorascopeError, match="not a LoRA run"):
        compare(*paths)
    run = compare(*paths, ranks=[16], labels=["my LoRA"]).loras[0]
    assert (run.rank, run.rank_source, run.run.label) == (16, "given", "my LoRA")


def test_predictions_against_measured_falloffs(tmp_path):
    full, fall = curves(0, falloff_step=120)
    _, track = curves(1)
    result = compare(write_run(tmp_path / "full.h5", full),
                     [write_run(tmp_path / "r1.h5", fall, rank=1), write_run(tmp_path / "r8.h5", track, rank=8)],
                     predictions={"1": 1500, 8: 1e5, 64: 2e6})
    rows = {row.rank: row for row in result.predictions}
    assert set(rows) == {1, 8, 64}
    measured = result.loras[0].falloff_x
    assert rows[1].measured == measured and rows[1].ratio == pytest.approx(1500 / measured)
    assert rows[1].status == "falloff" and rows[1].label == "r=1"
    assert rows[8].status == "none" and rows[8].measured is None and rows[8].ratio is None
    assert rows[8].measured_lower_bound == BATCH * N_STEPS and rows[8].consistent is True
    assert rows[64].status == "no_run" and rows[64].label is None


@pytest.mark.parametrize("bad", [{"one": 100}, {0: 100}, {1: -5}, {1: float("nan")}, {True: 5}, [1, 2]])
def test_invalid_predictions_are_refused(tmp_path, bad):
    full, lora = curves(0)
    with pytest.raises(InvalidOptionError, match="predictions"):
        compare(write_run(tmp_path / "full.h5", full), write_run(tmp_path / "lora.h5", lora, rank=1),
                predictions=bad)


def test_result_is_strict_json_and_report_files(tmp_path):
    full, fall = curves(2, falloff_step=120)
    _, track = curves(3)
    result = compare(write_run(tmp_path / "full.h5", full),
                     [write_run(tmp_path / "r1.h5", fall, rank=1), write_run(tmp_path / "r16.h5", track, rank=16)],
                     predictions={1: 1000})
    summary = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert summary["format"] == "lorascope-compare" and summary["x"] == "examples_seen"
    assert summary["criterion"] == {"threshold": 0.02, "gap": "absolute", "units": "nats per token",
                                    "window_decades": 0.2, "smooth_decades": 0.05, "z": 2.0, "min_points": 9}
    r1, r16 = summary["loras"]
    assert r1["falloff"]["status"] == "falloff" and r16["falloff"]["status"] == "none"
    step = r1["falloff"]["step"]
    assert r1["falloff"]["examples_seen"] == BATCH * step == r1["falloff"]["x"]
    assert r1["falloff"]["tokens_seen"] == TOKENS_PER_EXAMPLE * BATCH * step
    assert r16["falloff"] == {"status": "none", "x": None, "step": None, "examples_seen": None, "tokens_seen": None,
                              "gap": None}
    assert len(r1["gap_curve"]["x"]) == len(r1["gap_curve"]["gap"]) == r1["compared"]["points"]
    assert summary["full"]["steps"] == N_STEPS and summary["full"]["examples_seen"] == BATCH * N_STEPS
    assert summary["predictions"][0]["rank"] == 1

    text = format_comparison(summary)
    assert "r=1" in text and f"{r1['falloff']['x']:,.0f}" in text and "none up to 3,200 examples" in text
    assert "Predicted vs measured" in text
    files = write_comparison(result, tmp_path / "out")
    assert json.loads(files.json.read_text()) == summary
    assert files.plot.read_bytes()[:8] == PNG
    with pytest.raises(LorascopeError, match="--force"):
        write_comparison(result, tmp_path / "out")
    assert write_comparison(result, tmp_path / "out", force=True).plot.exists()


def test_open_runs_are_accepted_and_left_open(tmp_path):
    full, lora = curves(0, falloff_step=120)
    with lorascope.open_run(write_run(tmp_path / "full.h5", full)) as f, \
            lorascope.open_run(write_run(tmp_path / "lora.h5", lora, rank=1)) as lo:
        result = lorascope.compare(f, [lo])
        assert isinstance(result, lorascope.Comparison) and result.loras[0].status == "falloff"
        assert f.n_steps == N_STEPS  # still readable


# -- refusals --------------------------------------------------------------------------------------------------


def test_incomparable_runs_are_refused(tmp_path):
    full, lora = curves(0)
    full_path = write_run(tmp_path / "full.h5", full)
    lora_path = write_run(tmp_path / "lora.h5", lora, rank=1)
    with pytest.raises(LorascopeError, match="at least one LoRA run"):
        compare(full_path, [])
    with pytest.raises(LorascopeError, match="first run must be full fine-tuning"):
        compare(lora_path, [full_path])
    with pytest.raises(LorascopeError, match="different models.*8x4.*16x4"):
        compare(full_path, write_run(tmp_path / "other.h5", lora, rank=1, shape=(16, 4)))
    with pytest.raises(LorascopeError, match="examples_seen was not recorded.*tokens_seen"):
        compare(full_path, write_run(tmp_path / "noex.h5", lora, rank=1, examples=False))
    with pytest.raises(LorascopeError, match="too few steps"):
        compare(full_path, write_run(tmp_path / "short.h5", lora[:5], rank=1))
    with pytest.raises(LorascopeError, match="share 0 step"):
        far = write_run(tmp_path / "far.h5", lora, rank=1, batch=100_000)
        compare(full_path, far)
    with pytest.raises(lorascope.RunFileNotFoundError):
        compare(full_path, tmp_path / "missing.h5")


def test_different_model_configs_are_refused(tmp_path):
    full, lora = curves(0)
    small = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2}
    big = dict(small, num_hidden_layers=4)
    with pytest.raises(LorascopeError, match="num_hidden_layers = 2.*num_hidden_layers = 4"):
        compare(write_run(tmp_path / "full.h5", full, model_config=small, shape=(8, 4)),
                write_run(tmp_path / "lora.h5", lora, rank=1, model_config=big, shape=(6, 4)))


@pytest.mark.parametrize(("kwargs", "match"), [({"threshold": 0}, "threshold"), ({"window": -1}, "window"),
                                               ({"smooth": float("nan")}, "smooth"), ({"z": -1}, "'z'"),
                                               ({"min_points": 0}, "min_points"), ({"x": "epochs"}, "'x'"),
                                               ({"ranks": [1, 2]}, "one entry per LoRA run")])
def test_invalid_parameters_are_refused(tmp_path, kwargs, match):
    full, lora = curves(0)
    with pytest.raises(InvalidOptionError, match=match):
        compare(write_run(tmp_path / "full.h5", full), write_run(tmp_path / "lora.h5", lora, rank=1), **kwargs)


# -- the command line ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def planted_runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compare_cli")
    full, fall = curves(0, falloff_step=120)
    _, track = curves(1)
    return (write_run(folder / "full.h5", full), write_run(folder / "r1.h5", fall, rank=1),
            write_run(folder / "r8.h5", track, rank=8))


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_cli_compare_text_json_and_files(planted_runs, tmp_path):
    full, r1, r8 = planted_runs
    out = tmp_path / "cmp"
    result = _invoke("compare", full, r1, r8, "-o", out)
    assert result.exit_code == 0, result.output
    assert "falls off" in result.output and "none up to 3,200 examples" in result.output
    assert (out / "compare.png").read_bytes()[:8] == PNG
    as_json = _invoke("compare", full, r1, r8, "-o", out, "--json", "--force")
    assert as_json.exit_code == 0
    summary = json.loads(as_json.output)
    assert summary == json.loads((out / "compare.json").read_text())
    assert [lo["falloff"]["status"] for lo in summary["loras"]] == ["falloff", "none"]


def test_cli_options_reach_the_criterion(planted_runs, tmp_path):
    full, r1, _ = planted_runs
    predictions = tmp_path / "pred.json"
    predictions.write_text(json.dumps({"1": 2000}))
    result = _invoke("compare", full, r1, "-o", tmp_path / "o", "--json", "--threshold", "0.05", "--window", "0.3",
                     "--smooth", "0.04", "--tokens", "--predictions", predictions)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["x"] == "tokens_seen"
    assert (summary["criterion"]["threshold"], summary["criterion"]["window_decades"],
            summary["criterion"]["smooth_decades"]) == (0.05, 0.3, 0.04)
    assert summary["predictions"][0]["predicted"] == 2000.0
    help_text = " ".join(_invoke("compare", "--help").output.split())  # unwrapped
    assert f"[default: {DEFAULT_THRESHOLD}]" in help_text and f"[default: {DEFAULT_WINDOW}]" in help_text


def test_cli_bad_input_is_one_line_and_exit_2(planted_runs, tmp_path):
    full, r1, _ = planted_runs
    text = tmp_path / "notes.txt"
    text.write_text("not a run")
    out = tmp_path / "o"
    _one_line_error(_invoke("compare", full, "-o", out), "at least one LoRA run")
    _one_line_error(_invoke("compare", full, tmp_path / "missing.h5", "-o", out), "no such file")
    _one_line_error(_invoke("compare", full, text, "-o", out), "not an HDF5 file")
    _one_line_error(_invoke("compare", r1, full, "-o", out), "must be full fine-tuning")
    _one_line_error(_invoke("compare", full, r1, "-o", out, "--tokens", "--steps"), "at most one")
    _one_line_error(_invoke("compare", full, r1, "-o", out, "--threshold", "0"), "threshold")
    _one_line_error(_invoke("compare", full, r1, "-o", out, "--predictions", tmp_path / "none.json"),
                    "no such predictions file")
    _one_line_error(_invoke("compare", full, r1, "-o", out, "--predictions", text), "not a readable JSON")
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    _one_line_error(_invoke("compare", full, r1, "-o", out, "--predictions", listed), "JSON object")
    short = write_run(tmp_path / "short.h5", np.ones(5), rank=1)
    _one_line_error(_invoke("compare", full, short, "-o", out), "too few steps")
    other = write_run(tmp_path / "other.h5", np.ones(50), rank=1, shape=(16, 4))
    _one_line_error(_invoke("compare", full, other, "-o", out), "different models")
    assert not out.exists()
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    _one_line_error(_invoke("compare", full, r1, "-o", out), "--force")


# -- real recordings -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory):
    """A tiny Llama fully fine-tuned and a rank-1 PEFT LoRA of it, recorded by lorascope in a plain loop on the
    same batches (a deterministic successor language), and a LoRA of a wider Llama."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    folder = tmp_path_factory.mktemp("compare_real")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def config(hidden=32):
        return transformers.LlamaConfig(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=48, vocab_size=64,
                                        max_position_embeddings=64, tie_word_embeddings=False)

    def batches(steps):
        g = torch.Generator().manual_seed(1)
        successor = torch.randperm(64, generator=g)
        for _ in range(steps):
            ids = torch.empty(4, 16, dtype=torch.long)
            ids[:, 0] = torch.randint(64, (4,), generator=g)
            for t in range(1, 16):
                ids[:, t] = successor[ids[:, t - 1]]
            yield ids

    def train(name, rank=None, hidden=32, steps=30):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config(hidden))
        lr = 3e-3
        if rank is not None:
            model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=32, target_modules="all-linear"))
            lr *= 10  # LoRA Without Regret: LoRA's optimal learning rate is about 10x full fine-tuning's
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        path = folder / name
        with lorascope.record(model, path, optimizer=optimizer, total_steps=steps):
            for ids in batches(steps):
                model(input_ids=ids, labels=ids).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
        return path

    try:
        return train("full.h5"), train("lora_r1.h5", rank=1), train("wide_lora.h5", rank=1, hidden=48)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_real_recordings_end_to_end(real_runs, tmp_path):
    full, lora, _ = real_runs
    result = compare(full, lora)
    (run,) = result.loras
    assert (run.rank, run.rank_source, run.lora_alpha, run.scaling, run.scaling_rule) == (1, "config", 32, 32.0,
                                                                                        "alpha/r")
    assert not any("could not verify" in note for note in result.notes)  # same model: configs and matrices agree
    assert run.status in ("falloff", "tentative", "none")
    assert result.full.step.size == run.run.step.size == 30
    np.testing.assert_array_equal(result.full.examples_seen, 4 * np.arange(1, 31))
    assert run.grid_x[0] == 4 and run.grid_x[-1] == 120 and np.isfinite(run.gap).all()
    # Both runs start from the same weights on the same first batch: the first step's losses agree.
    assert run.run.loss[0] == pytest.approx(result.full.loss[0], rel=1e-6)
    summary = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert summary["loras"][0]["rank"] == 1
    cli_result = _invoke("compare", full, lora, "-o", tmp_path / "out", "--json")
    assert cli_result.exit_code == 0, cli_result.output
    assert json.loads(cli_result.output)["loras"][0]["falloff"] == summary["loras"][0]["falloff"]
    assert (tmp_path / "out" / "compare.png").read_bytes()[:8] == PNG


def test_real_recordings_of_different_models_are_refused(real_runs):
    full, _, wide = real_runs
    with pytest.raises(LorascopeError, match="different models.*hidden_size = 32.*hidden_size = 48"):
        compare(full, wide)


def test_capacities_are_placed_where_full_finetuning_absorbed_them(tmp_path):
    # Full fine-tuning on 100 examples of 2 loss tokens, 10 per step, 40 steps: 2.0 nats per token over the first
    # epoch, then the loss falls linearly to 0.5, so it has absorbed 100 x 2 x (2.0 - loss) / ln 2 bits by then.
    steps = np.arange(1, 41)
    seen = 10 * steps
    loss = np.where(seen <= 100, 2.0, 2.0 - 1.5 * (seen - 100) / 300)
    full = tmp_path / "full.h5"
    with RunWriter(full, [dict(MODULE, lora=False)], config={"dataset": {"examples": 100}}, overwrite=True) as w:
        w.append_steps({"step": steps, "examples_seen": seen, "tokens_seen": 2 * seen, "loss": loss,
                        "batch_examples": np.full(40, 10), "batch_loss_tokens": np.full(40, 20)})
    lora = write_run(tmp_path / "lora.h5", loss, rank=1, batch=10)
    result = compare(full, lora, capacities={1: 100 * 2 * 0.75 / np.log(2), 4: 1e6})
    rows = {row.rank: row for row in result.predictions}
    # 0.75 nats saved per token: the loss reaches 1.25 at 100 + 0.5 x 300 = 250 examples seen (moving median: +-1 step)
    assert abs(rows[1].predicted - 250) <= 10
    assert rows[4].predicted == np.inf and rows[4].to_dict()["predicted"] is None  # never absorbed within the run
    with pytest.raises(InvalidOptionError, match="not both"):
        compare(full, lora, predictions={1: 100}, capacities={1: 50.0})
