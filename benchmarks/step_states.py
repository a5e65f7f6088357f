"""Recorded / unrecorded wall time at the same machine state, for runs whose step times switch between states.

Under outside load on shared cores (two busy processes beside a two-thread training loop) a step of the same
training takes either about 10 s or about 37 s, in stretches of several steps, and two identical unrecorded runs
differ by 31-74% in wall time: how many of its steps a run spends in the slow state sets its time, and that swamps
a 10% effect. Here each step is put in a state (two-means in log time over every run's steps; one state when the
two means are within 1.5x of each other), and a recorded run's time is compared with what the unrecorded runs
take per step in each state, summed over the recorded run's own sequence of states:

    ratio = recorded train() / (unrecorded train() outside its steps + sum over the recorded run's steps of the
            unrecorded runs' mean step time in that step's state)

Time outside the steps (after the last one: the recorder's close) is the recorded run's own, charged in full.

``central_interval`` is a 95% bootstrap interval of ``central``: the steps of each state resampled, the recorded run's
and the unrecorded runs' alike (the recorded run's time outside its steps kept).

``central`` assumes recording does not choose the state. It might: the snapshot worker is one more runnable
thread, and in one of three randomized tests (:mod:`worker_load_states`) the scheduler left both training threads on
one core more often than chance after it slept (the three pooled show no such effect, 3%, p = 0.36).
So ``worker_charged`` expects every step that overlaps the worker's work (``worker_busy``) at the fast state's mean
whatever its state, which charges recording with every slow step it touched (not with a slow stretch that outlasts
the worker's work), and ``stretch_charged`` every step of each slow stretch that began in a step the worker
overlapped or in the step after one (``worker_stretches`` of them). The checks of the assumption: how many of the
steps the worker overlapped were slow (``worker_steps_slow`` of ``worker_steps``), against the share of the other
steps, and how many slow stretches began at the worker's steps.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence
from typing import Any

# Below this ratio of the two means the runs have one state (a quiet machine): no stratification.
MIN_STATE_RATIO = 1.5


def two_states(times: Sequence[float], iterations: int = 50) -> float | None:
    """The threshold (seconds) between the fast and slow states of ``times``: two-means in log time; None when
    the two means lie within :data:`MIN_STATE_RATIO` of each other, or there are fewer than 4 times."""
    logs = sorted(math.log(t) for t in times if t > 0)
    if len(logs) < 4 or logs[0] == logs[-1]:
        return None
    cut = (logs[0] + logs[-1]) / 2
    for _ in range(iterations):
        low, high = [x for x in logs if x <= cut], [x for x in logs if x > cut]
        if not low or not high:
            return None
        new = (statistics.fmean(low) + statistics.fmean(high)) / 2
        if new == cut:
            break
        cut = new
    if statistics.fmean(high) - statistics.fmean(low) < math.log(MIN_STATE_RATIO):
        return None
    return math.exp(cut)


def overlaps(steps: Sequence[tuple[float, float]], busy: Sequence[Sequence[float]]) -> list[bool]:
    """Per step (start, end): whether any busy interval (start, end) overlaps it."""
    return [any(b0 < end and b1 > start for b0, b1 in busy) for start, end in steps]


def step_times(run: dict[str, Any]) -> list[float]:
    """The run's step times: with ``step_ends`` (seconds from the start of ``train()``) the first step too, from
    the start (its set-up included, which recording lengthens by the W_0 copy); else ``step_seconds`` (from the
    second step)."""
    if "step_ends" in run:
        return [run["step_ends"][0], *run["step_seconds"]]
    return list(run["step_seconds"])


def step_spans(run: dict[str, Any]) -> list[tuple[float, float]]:
    """(start, end) of every step of :func:`step_times`, from ``step_ends``."""
    ends = [0.0, *run["step_ends"]]
    return list(zip(ends, ends[1:]))


def stretches(flags: Sequence[bool]) -> int:
    """How many stretches of consecutive True ``flags`` there are."""
    return sum(flag and not (i and flags[i - 1]) for i, flag in enumerate(flags))


def worker_started(states: Sequence[bool], touched: Sequence[bool]) -> list[bool]:
    """Per step: whether it lies in a slow stretch that began in a step the worker overlapped or in the step right
    after one (the stretches the worker may have started)."""
    out, started = [], False
    for i, slow in enumerate(states):
        if slow and (i == 0 or not states[i - 1]):  # a stretch begins
            started = touched[i] or (i > 0 and touched[i - 1])
        out.append(slow and started)
    return out


def central_interval(times: Sequence[float], states: Sequence[bool], train_seconds: float,
                     base_by_state: dict[bool, list[float]], outside_steps: float, draws: int = 2000,
                     seed: int = 0) -> list[float]:
    """The 2.5th and 97.5th percentiles of the state-matched ratio when each state's steps are resampled with
    replacement, in the recorded run (``times`` in ``states``; its time outside the steps kept) and in the unrecorded
    runs (``base_by_state``)."""
    rng = random.Random(seed)
    own = {s: [t for t, st in zip(times, states, strict=True) if st == s] for s in set(states)}
    outside = train_seconds - sum(times)

    def resampled_mean(values: list[float]) -> float:
        return statistics.fmean(rng.choices(values, k=len(values)))

    ratios = []
    for _ in range(draws):
        recorded = outside + sum(len(v) * resampled_mean(v) for v in own.values())
        expected = outside_steps + sum(len(v) * resampled_mean(base_by_state[s]) for s, v in own.items())
        ratios.append(recorded / expected)
    ratios.sort()
    return [ratios[int(0.025 * draws)], ratios[int(0.975 * draws) - 1]]


def state_matched(results: Sequence[dict[str, Any]], recorded: str = "defaults") -> dict[str, Any] | None:
    """The state-matched ratio of each ``recorded`` run to the ``baseline`` runs (see the module's docstring);
    None without step times on both sides. ``worker_busy`` intervals on a recorded run add the pessimistic readings."""
    base = [r for r in results if r["config"] == "baseline" and r.get("step_seconds")]
    runs = [r for r in results if r["config"] == recorded and r.get("step_seconds")]
    if not base or not runs:
        return None
    threshold = two_states([t for r in (*base, *runs) for t in step_times(r)])

    def slow(t: float) -> bool:
        return threshold is not None and t > threshold

    base_steps = [t for r in base for t in step_times(r)]
    base_by_state = {state: ts for state in (False, True) if (ts := [t for t in base_steps if slow(t) == state])}
    mean_in = {state: statistics.fmean(ts) for state, ts in base_by_state.items()}
    outside_steps = statistics.fmean(r["train_seconds"] - sum(step_times(r)) for r in base)
    out: dict[str, Any] = {"threshold_seconds": threshold,
                           "baseline_mean_step_seconds": {"fast": mean_in.get(False), "slow": mean_in.get(True)},
                           "runs": []}
    for run in runs:
        times = step_times(run)
        states = [slow(t) for t in times]
        row: dict[str, Any] = {"slow_steps": sum(states), "steps": len(states),
                               "baseline_slow_share": sum(map(slow, base_steps)) / len(base_steps)}
        if any(s not in mean_in for s in states):
            row["central"] = None  # a state the unrecorded runs never visited: no like-for-like time
        else:
            row["central"] = run["train_seconds"] / (outside_steps + sum(mean_in[s] for s in states))
            row["central_interval"] = central_interval(times, states, run["train_seconds"], base_by_state,
                                                       outside_steps)
        if "worker_busy" in run and "step_ends" in run and False in mean_in:
            touched = overlaps(step_spans(run), run["worker_busy"])
            started = worker_started(states, touched)
            for key, charged in (("worker_charged", touched), ("stretch_charged", started)):
                expected = [False if hit else s for s, hit in zip(states, charged, strict=True)]
                if all(s in mean_in for s in expected):
                    row[key] = run["train_seconds"] / (outside_steps + sum(mean_in[s] for s in expected))
            row["worker_stretches"], row["slow_stretches"] = stretches(started), stretches(states)
            # does the worker choose the slow state? its steps' slow share against the others'
            row["worker_steps"] = sum(touched)
            row["worker_step_seconds"] = [[i + 1, t] for i, (t, hit) in enumerate(zip(times, touched)) if hit]
            row["worker_steps_slow"] = sum(s for s, hit in zip(states, touched, strict=True) if hit)
        out["runs"].append(row)
    return out
