"""benchmarks/step_states.py: recorded / unrecorded time at the same machine state, on step times whose answer is
known (constructed runs: each state's step time and the recording's factor are set)."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "step_states.py"
spec = importlib.util.spec_from_file_location("step_states", PATH)
assert spec is not None and spec.loader is not None
step_states = importlib.util.module_from_spec(spec)
sys.modules["step_states"] = step_states
spec.loader.exec_module(step_states)

FAST, SLOW = 10.0, 37.0


def run(config: str, states: str, factor: float = 1.0, close: float = 0.0) -> dict:
    """A run whose steps (the first included) take FAST or SLOW (``states``: one letter per step, f or s) times
    ``factor``, then ``close`` seconds after the last step, as the benchmark writes it."""
    steps = [(SLOW if s == "s" else FAST) * factor for s in states]
    ends = [sum(steps[:i + 1]) for i in range(len(steps))]
    return {"config": config, "train_seconds": sum(steps) + close, "step_seconds": steps[1:], "step_ends": ends}


def test_two_states_splits_the_modes_and_not_one():
    times = [10.2, 10.8, 11.5, 36.0, 37.5, 38.1, 12.0, 9.9]
    assert 12.0 < step_states.two_states(times) < 36.0
    assert step_states.two_states([3.4, 3.5, 3.6, 3.8, 4.1, 3.3]) is None  # a quiet machine: one state
    assert step_states.two_states([10.0, 37.0, 10.0]) is None  # too few


def test_state_matched_recovers_the_factor_whatever_the_slow_share():
    base = [run("baseline", "ssssffff"), run("baseline", "sssssssf")]  # 11 of 16 slow
    recorded = run("defaults", "fffffffs", factor=1.05)  # 1 of 8 slow
    plain = recorded["train_seconds"] / (sum(r["train_seconds"] for r in base) / 2)
    assert plain < 0.6  # the whole-run ratio says recording saves over 40%
    matched = step_states.state_matched([base[0], recorded, base[1]])
    assert matched["baseline_mean_step_seconds"] == {"fast": FAST, "slow": SLOW}
    [row] = matched["runs"]
    assert (row["slow_steps"], row["steps"], row["baseline_slow_share"]) == (1, 8, 11 / 16)
    assert row["central"] == pytest.approx(1.05, rel=1e-12)
    assert "worker_charged" not in row
    # the time after the last step (the recorder's close) is charged in full
    closing = run("defaults", "fffffffs", factor=1.05, close=5.0)
    [row] = step_states.state_matched([*base, closing])["runs"]
    assert row["central"] == pytest.approx(1.05 + 5.0 / (7 * FAST + SLOW), rel=1e-12)


def test_without_step_ends_the_first_step_is_outside_the_steps():
    base, recorded = run("baseline", "ssff", close=3.0), run("defaults", "ffss", close=4.0)
    for r in (base, recorded):
        r["train_seconds"] += 20.0  # set-up, unclocked
        del r["step_ends"]
    [row] = step_states.state_matched([base, recorded])["runs"]
    assert (row["steps"], row["slow_steps"]) == (3, 2)  # steps 2-4: f, s, s
    outside = 20.0 + SLOW + 3.0  # the baseline's set-up, first step and close
    assert row["central"] == pytest.approx(recorded["train_seconds"] / (outside + FAST + 2 * SLOW), rel=1e-12)


def test_worker_charged_counts_the_slow_steps_the_worker_overlapped_as_fast():
    base = [run("baseline", "ffffffff")] * 2 + [run("baseline", "ssssssss")]
    recorded = run("defaults", "fssfffff")
    ends = recorded["step_ends"]
    recorded["worker_busy"] = [[ends[1] + 1, ends[2] - 1]]  # inside step 2 only (slow)
    [row] = step_states.state_matched([*base, recorded])["runs"]
    assert row["central"] == pytest.approx(1.0, rel=1e-12)
    assert (row["worker_steps"], row["worker_steps_slow"]) == (1, 1)
    expected = 7 * FAST + SLOW  # step 2 (slow, overlapped) expected fast; step 3 (slow) slow
    assert row["worker_charged"] == pytest.approx(recorded["train_seconds"] / expected, rel=1e-12)
    assert row["worker_charged"] > 1.0


def test_one_state_is_the_plain_ratio_and_missing_states_say_so():
    quiet = [run("baseline", "ffff"), run("defaults", "ffff", factor=1.02)]
    quiet[1]["step_seconds"] = [t * (1 + 0.01 * i) for i, t in enumerate(quiet[1]["step_seconds"])]
    quiet[1]["train_seconds"] = quiet[1]["step_ends"][0] + sum(quiet[1]["step_seconds"])
    matched = step_states.state_matched(quiet)
    assert matched["threshold_seconds"] is None
    assert matched["runs"][0]["central"] == pytest.approx(quiet[1]["train_seconds"] / quiet[0]["train_seconds"])
    never_slow = step_states.state_matched([run("baseline", "ffff"), run("defaults", "ffss")])
    assert never_slow["runs"][0]["central"] is None
    assert step_states.state_matched([run("baseline", "ffff")]) is None


def test_stretch_charged_counts_the_slow_stretches_that_began_at_the_workers_steps():
    base = [run("baseline", "ffffffff"), run("baseline", "ssssssss")]
    recorded = run("defaults", "sfsssffs")  # stretches at steps 1, 3-5 and 8
    ends = [0.0, *recorded["step_ends"]]
    recorded["worker_busy"] = [[ends[1] + 1, ends[2] - 1], [ends[6] + 1, ends[7] - 1]]  # steps 2 and 7 (fast)
    assert step_states.worker_started([s == "s" for s in "sfsssffs"], [i in (1, 6) for i in range(8)]) == [
        False, False, True, True, True, False, False, True]
    [row] = step_states.state_matched([*base, recorded])["runs"]
    assert (row["worker_steps"], row["worker_steps_slow"]) == (2, 0)
    assert (row["slow_stretches"], row["worker_stretches"]) == (3, 2)
    assert row["worker_step_seconds"] == [[2, FAST], [7, FAST]]
    assert row["worker_charged"] == pytest.approx(1.0, rel=1e-12)  # it overlapped no slow step
    assert row["stretch_charged"] == pytest.approx(recorded["train_seconds"] / (7 * FAST + SLOW), rel=1e-12)


def test_the_interval_holds_the_factor_of_noisy_steps_and_shrinks_with_more_of_them():
    rng = random.Random(7)

    def noisy(config: str, states: str, factor: float = 1.0) -> dict:
        r = run(config, states, factor)
        steps = [t * rng.uniform(0.8, 1.2) for t in [r["step_ends"][0], *r["step_seconds"]]]
        r["step_ends"] = [sum(steps[:i + 1]) for i in range(len(steps))]
        r["step_seconds"], r["train_seconds"] = steps[1:], sum(steps)
        return r

    widths = []
    for n in (10, 80):
        pattern = ("ffsfs" * n)[: 4 * n]
        base = [noisy("baseline", pattern), noisy("baseline", pattern[::-1])]
        [row] = step_states.state_matched([*base, noisy("defaults", pattern, factor=1.05)])["runs"]
        low, high = row["central_interval"]
        assert low < row["central"] < high
        assert low < 1.05 < high
        widths.append(high - low)
    assert 0 < widths[1] < widths[0] / 2  # 8x the steps: about 1 / sqrt(8) the width
