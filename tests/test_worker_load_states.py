"""benchmarks/worker_load_states.py: the randomized test of whether the snapshot worker puts a loaded machine in the
slow state, on constructed runs whose answer is known (steps of set times, on one core or not, arms set)."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
spec = importlib.util.spec_from_file_location("worker_load_states", BENCHMARKS / "worker_load_states.py")
assert spec is not None and spec.loader is not None
states = importlib.util.module_from_spec(spec)
sys.modules["worker_load_states"] = states
spec.loader.exec_module(states)

FAST, SLOW, SLOT = 0.25, 1.0, 10.0  # both divide the slot


def constructed(slow_slots: list[bool], arms: list[str]) -> dict:
    """A run whose steps are all FAST, threads on two cores, in a slot marked False, and all SLOW on one core in a
    slot marked True, as the benchmark writes it."""
    seconds, ends, same, clock = [], [], [], 0.0
    for slow in slow_slots:
        for _ in range(round(SLOT / (SLOW if slow else FAST))):
            clock += SLOW if slow else FAST
            seconds.append(SLOW if slow else FAST)
            ends.append(clock)
            same.append(slow)
    return {"slot_seconds": SLOT, "arms": arms, "kernel_calls": [0 if a == "off" else 7 for a in arms],
            "step_ends": ends, "step_seconds": seconds, "same_core": same, "training_threads": 2}


def test_per_slot_counts_each_step_in_the_slot_of_its_middle():
    run = {"slot_seconds": 10.0, "arms": ["off", "normal"], "step_ends": [1.0, 2.0, 12.0, 13.0],
           "step_seconds": [1.0, 1.0, 10.0, 1.0], "same_core": [False, True, True, False]}
    steps, one_core = states.per_slot(run)
    assert steps == [3, 1]  # the third step's middle is at 7 s
    assert one_core == [11.0, 0.0]


def test_groups_are_an_arms_slots_and_the_off_slots_right_after_them():
    arms = ["normal", "off", "off", "nice10", "off", "normal", "normal", "off"]
    assert states.groups(arms, "normal") == ([0, 5, 6], [1, 7])
    assert states.groups(arms, "off") == ([1, 2, 4, 7], [2])
    assert states.groups(arms, "nice10") == ([3], [4])


def test_a_worker_that_leaves_the_machine_slow_is_found_and_one_that_does_not_is_not():
    rng = random.Random(3)
    arms = states.draw_arms(["normal", "nice19"], 120, rng)
    # the slot after a normal slot is slow (threads on one core); nothing else is
    slow = [i > 0 and arms[i - 1] == "normal" for i in range(len(arms))]
    whole = states.summarize(constructed(slow, arms), draws=400)
    assert whole["off_median_step_seconds"] == {"one_core": SLOW, "two_cores": FAST}
    summary = whole["arms"]
    normal, nice, off = summary["normal"], summary["nice19"], summary["off"]
    assert normal["steps_per_second_after"] == pytest.approx(1 / SLOW)
    assert normal["one_core_share_after"] == pytest.approx(1.0)
    assert normal["p_steps_per_second_after"] < 0.01 and normal["p_one_core_share_after"] < 0.01
    assert nice["one_core_share_after"] == 0.0 and nice["p_one_core_share_after"] > 0.05
    assert off["kernel_calls_per_slot"] == 0 and normal["kernel_calls_per_slot"] == 7


def test_states_that_ignore_the_arms_give_no_effect():
    # the machine's own stretches: three slots slow, four fast, over and over, whatever the draw says
    arms = states.draw_arms(["normal"], 140, random.Random(5))
    summary = states.summarize(constructed([k % 7 < 3 for k in range(140)], arms), draws=400)["arms"]
    normal = summary["normal"]
    for key in ("p_steps_per_second", "p_steps_per_second_after", "p_one_core_share_after"):
        assert normal[key] > 0.05


def test_draw_arms_leaves_half_the_slots_off():
    arms = states.draw_arms(["normal", "nice10"], 4000, random.Random(0))
    assert arms.count("off") / 4000 == pytest.approx(0.5, abs=0.03)
    assert arms.count("normal") == pytest.approx(arms.count("nice10"), rel=0.1)


def test_nice_of_reads_an_arm_and_refuses_others():
    assert (states.nice_of("normal"), states.nice_of("nice10")) == (0, 10)
    for bad in ("nice", "nice0", "nice20", "fast"):
        with pytest.raises(ValueError, match="normal or niceN"):
            states.nice_of(bad)


def test_cpu_of_reads_a_core_this_process_may_run_on():
    assert states.cpu_of(os.getpid()) in os.sched_getaffinity(0)
    assert states.cpu_of(2**22 + 7) == -1  # no such process


def test_pooled_runs_find_an_after_effect_each_run_shows_and_none_where_the_arms_do_not_matter():
    runs = []
    for seed in (11, 12):
        arms = states.draw_arms(["normal"], 60, random.Random(seed))
        runs.append(constructed([i > 0 and arms[i - 1] == "normal" for i in range(60)], arms))
    other = states.draw_arms(["nice19"], 60, random.Random(13))  # no normal arm: left out
    runs.append(constructed([False] * 60, other))
    found = states.pooled(runs, "normal", draws=400)
    assert found["runs"] == 2
    assert found["steps_per_second_after_off"] == pytest.approx(1 / FAST)
    assert found["steps_per_second_difference"] == pytest.approx(1 / SLOW - 1 / FAST)
    assert found["one_core_share_difference"] == pytest.approx(1.0)
    assert found["p_steps_per_second"] < 0.01 and found["p_one_core_share"] < 0.01

    ignoring = []
    for seed in (21, 22, 23):
        arms = states.draw_arms(["normal"], 140, random.Random(seed))
        ignoring.append(constructed([(k + seed) % 7 < 3 for k in range(140)], arms))
    none = states.pooled(ignoring, "normal", draws=400)
    assert none["p_steps_per_second"] > 0.05 and none["p_one_core_share"] > 0.05


def test_pooled_weights_each_run_by_its_slots_after_the_arm():
    # run A: every off slot after normal is slow; run B: none is. Pooled: A's difference times its share of slots
    a_arms = ["normal", "off", "off", "off", "normal", "off", "off"]
    b_arms = ["normal", "off", "off", "normal", "off", "off", "off", "off"]
    a = constructed([False, True, False, False, False, True, False], a_arms)
    b = constructed([False] * 8, b_arms)
    pooled = states.pooled([a, b], "normal", draws=50)
    assert pooled["off_slots_after_arm"] == [2, 2]
    assert pooled["steps_per_second_difference"] == pytest.approx((2 * (1 / SLOW - 1 / FAST) + 2 * 0.0) / 4)


def test_the_checked_in_pooled_summary_recomputes_from_the_three_runs():
    """docs/benchmarks.md quotes worker_load_states_pooled.json: its differences come back from the runs' JSONs,
    and with fewer redraws the after-effect is still far from significant."""
    docs = BENCHMARKS.parent / "docs" / "benchmarks"
    checked_in = json.loads((docs / "worker_load_states_pooled.json").read_text())
    runs = [json.loads((docs / name).read_text()) for name in checked_in["files"]]
    again = states.pooled(runs, "normal", draws=200)
    assert again["off_slots_after_arm"] == checked_in["off_slots_after_arm"] == [64, 37, 95]
    for key in ("steps_per_second_difference", "one_core_share_difference", "steps_per_second_after_off"):
        assert again[key] == pytest.approx(checked_in[key], abs=1e-12)
    assert checked_in["steps_per_second_difference"] / checked_in["steps_per_second_after_off"] == pytest.approx(
        -0.032, abs=0.001)
    assert again["p_steps_per_second"] > 0.2 and again["p_one_core_share"] > 0.2
