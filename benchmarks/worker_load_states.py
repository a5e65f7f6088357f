"""Does the snapshot worker put a loaded machine in the slow state? A randomized test.

Under outside load (two busy processes on the two cores) the steps of a two-thread training loop switch between a
fast and a slow state in stretches (docs/benchmarks.md), and the state-matched ratio (:mod:`step_states`) assumes
recording does not choose the state. One 60-step SmolLM2 run saw eight snapshots, too few to test that. Here a
short training loop (an MLP of ``--layers`` linear layers of ``--width``, batch 256, AdamW, two torch threads; a
step beside the load takes ~0.27 s or ~0.82 s) runs beside the same load for ``--minutes``; time is cut into slots of
``--slot`` seconds, and a seeded draw decides for each slot whether a thread of its own runs the snapshot worker's
kernel all through it (:func:`lorascope.record.snapshot_worker.gram_measure` on SmolLM2-shaped float32 updates, BLAS
limited to one thread, as the worker computes), and how: ``normal``, or ``niceN`` (the thread first lowers its own
scheduling priority to nice N). Half the slots are ``off``; ``--arms`` names the others, drawn evenly.

The slow state is read from the scheduler: after each step, whether both training threads were last seen on one
core (``/proc``; the other core then holds the two busy processes). Per arm: the training's steps per second in its
slots (the worker's direct cost), the same in the ``off`` slots right after one of its slots (what the worker
leaves behind), the share of that time the training threads spent on one core, and the worker's kernel calls per
slot. Since the draw cannot know the machine's state, a difference from the ``off`` slots is the arm's doing; the
p-values come from redrawing the arms (a randomization test, exact under the null of no effect however long the
states last).

Usage::

    python benchmarks/worker_load_states.py --minutes 40 --arms normal --json docs/benchmarks/worker_load_states.json
    python benchmarks/worker_load_states.py --minutes 60 --arms normal,nice10,nice19 --seed 1 \
        --json docs/benchmarks/worker_nice_states.json
    python benchmarks/worker_load_states.py --renew docs/benchmarks/worker_load_states.json
    python benchmarks/worker_load_states.py --minutes 60 --arms normal --seed 2 \
        --json docs/benchmarks/worker_load_states_run3.json
    python benchmarks/worker_load_states.py --pool docs/benchmarks/worker_load_states.json \
        docs/benchmarks/worker_nice_states.json docs/benchmarks/worker_load_states_run3.json --arms normal \
        --json docs/benchmarks/worker_load_states_pooled.json

``--pool`` tests the after-effect of one arm over several runs at once (:func:`pooled`).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from smollm2_trainer_overhead import start_load  # noqa: E402

# One SmolLM2-135M block's recorded matrices (out, in): q, k, v, o, gate, up, down.
SMOLLM2_BLOCK = ((576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536))


def stat_fields(path: str) -> list[str]:
    """A ``/proc`` stat file's fields after the command name's ")": field N of stat(5) is at index N - 3."""
    return Path(path).read_text().rsplit(")", 1)[1].split()


def cpu_of(pid: int, tid: int | None = None) -> int:
    """The core a task last ran on (``/proc``'s ``processor`` field); -1 when the task is gone."""
    try:
        fields = stat_fields(f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat")
    except OSError:
        return -1
    return int(fields[36])  # processor, field 39


def busy_threads() -> list[int]:
    """This process's threads (ids) that use CPU over a short burst of matrix products: the training's compute
    threads (torch's OpenMP pool starts with its first parallel region)."""
    def ticks() -> dict[int, int]:
        out = {}
        for tid in map(int, os.listdir("/proc/self/task")):
            fields = stat_fields(f"/proc/self/task/{tid}/stat")
            out[tid] = int(fields[11]) + int(fields[12])  # utime + stime, fields 14 and 15
        return out

    before = ticks()
    a = torch.randn(1024, 1024)
    for _ in range(40):
        a = (a @ a).tanh_()
    after = ticks()
    return sorted(t for t in after if after[t] > before.get(t, 0))


def nice_of(arm: str) -> int:
    """The nice value of a worker arm: 0 for ``normal``, N for ``niceN``."""
    if arm == "normal":
        return 0
    if arm.startswith("nice") and arm[4:].isdigit() and 0 < int(arm[4:]) < 20:
        return int(arm[4:])
    raise ValueError(f"a worker arm is normal or niceN (N from 1 to 19), not {arm!r}")


def worker_kernel(until: float, nice: int, calls: list[int]) -> None:
    """The snapshot worker's kernel on random SmolLM2-shaped updates until ``until`` (perf_counter), counting its
    calls; with ``nice`` this thread first lowers its own priority (Linux: nice applies per thread)."""
    from lorascope.record.snapshot_worker import blas_threads, gram_measure

    if nice:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    rng = np.random.default_rng(0)
    updates = [rng.standard_normal(shape, dtype=np.float32) for shape in SMOLLM2_BLOCK]
    with blas_threads(1):
        while time.perf_counter() < until:
            for delta in updates:
                gram_measure(delta)
                calls[0] += 1


def draw_arms(arms: Sequence[str], slots: int, rng: random.Random) -> list[str]:
    """Half the slots ``off``, the rest spread evenly over ``arms``, independently per slot."""
    return [("off" if rng.random() < 0.5 else rng.choice(list(arms))) for _ in range(slots)]


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(args.width, args.width) for _ in range(args.layers)])
    optimizer = torch.optim.AdamW(model.parameters(), 1e-4)
    x = torch.randn(256, args.width)
    slots = round(args.minutes * 60 / args.slot)
    arms = draw_arms(args.arms.split(","), slots, random.Random(args.seed))
    calls = [0] * slots
    load = start_load(args.load_kind)
    try:
        training = busy_threads()
        started = time.perf_counter()

        def schedule() -> None:
            for i, arm in enumerate(arms):
                slot_end = started + (i + 1) * args.slot
                if arm != "off":  # a fresh thread per slot: an unprivileged thread cannot undo its nice
                    count = [0]
                    thread = threading.Thread(target=worker_kernel, args=(slot_end, nice_of(arm), count))
                    thread.start()
                    thread.join()
                    calls[i] = count[0]
                time.sleep(max(slot_end - time.perf_counter(), 0.0))

        worker = threading.Thread(target=schedule, daemon=True)
        worker.start()
        ends, seconds, same_core = [], [], []
        while (now := time.perf_counter()) < started + slots * args.slot:
            loss = model(x).square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            end = time.perf_counter()
            ends.append(round(end - started, 4))
            seconds.append(round(end - now, 4))
            cores = {cpu_of(os.getpid(), tid) for tid in training} - {-1}
            same_core.append(len(cores) == 1)
        worker.join()
    finally:
        for process in load:
            process.kill()
    return {"slot_seconds": args.slot, "arms": arms, "kernel_calls": calls, "step_ends": ends,
            "step_seconds": seconds, "training_threads": len(training), "same_core": same_core,
            "setting": {k: getattr(args, k) for k in ("minutes", "slot", "seed", "width", "layers", "load_kind",
                                                      "arms")},
            "load_average": os.getloadavg()[0]}


def step_slots(result: dict[str, Any]) -> list[int]:
    """The slot of each step: the one its middle falls in."""
    slot, last = result["slot_seconds"], len(result["arms"]) - 1
    return [min(int((end - t / 2) // slot), last) for end, t in zip(result["step_ends"], result["step_seconds"],
                                                                     strict=True)]


def per_slot(result: dict[str, Any]) -> tuple[list[int], list[float]]:
    """Per slot: the steps whose middle falls in it, and the seconds of those steps after which both training
    threads were on one core."""
    n = len(result["arms"])
    steps, one_core = [0] * n, [0.0] * n
    for k, t, same in zip(step_slots(result), result["step_seconds"], result["same_core"], strict=True):
        steps[k] += 1
        one_core[k] += t * same
    return steps, one_core


def groups(arms: Sequence[str], arm: str) -> tuple[list[int], list[int]]:
    """Slot indices: those of ``arm``, and the ``off`` slots right after one of ``arm``'s."""
    return ([i for i, a in enumerate(arms) if a == arm],
            [i for i in range(1, len(arms)) if arms[i] == "off" and arms[i - 1] == arm])


def mean_over(values: Sequence[float], slots: Sequence[int]) -> float:
    return statistics.fmean(values[i] for i in slots) if slots else float("nan")


def randomization_test(statistic: Callable[[Sequence[Sequence[str]]], float], arms: Sequence[Sequence[str]],
                       names: Sequence[Sequence[str]], draws: int, seed: int = 1) -> tuple[float, float]:
    """``statistic`` of one or several runs' ``arms`` against its values when every run's arms are redrawn
    (:func:`draw_arms`, each run with its own ``names``): the two-sided p-value, and the 95th percentile of the
    statistic's size under the redraws (the smallest size that would have reached p < 0.05)."""
    seen = statistic(arms)
    if seen != seen:  # NaN: a group without slots
        return float("nan"), float("nan")
    rng = random.Random(seed)
    null = [abs(statistic([draw_arms(n, len(a), rng) for a, n in zip(arms, names, strict=True)]))
            for _ in range(draws)]
    return (sum(v >= abs(seen) - 1e-12 for v in null) + 1) / (draws + 1), float(np.quantile(null, 0.95))


def arm_difference(drawn: Sequence[str], values: Sequence[float], which: int, arm: str) -> float:
    """The mean of ``values`` over ``arm``'s slots (``which`` 0) or the ``off`` slots after them (1), less the same
    for ``off``, under the arms ``drawn``."""
    return mean_over(values, groups(drawn, arm)[which]) - mean_over(values, groups(drawn, "off")[which])


def of_first_run(statistic: Callable[[Sequence[str]], float], drawn: Sequence[Sequence[str]]) -> float:
    """A one-run statistic as :func:`randomization_test` calls it, with a list of runs' arms."""
    return statistic(drawn[0])


def off_medians(result: dict[str, Any]) -> dict[str, float]:
    """The median step time in the ``off`` slots when the step ended with both training threads on one core, and on
    two: the two states."""
    times: dict[bool, list[float]] = {True: [], False: []}
    for k, t, same in zip(step_slots(result), result["step_seconds"], result["same_core"], strict=True):
        if result["arms"][k] == "off":
            times[same].append(t)
    return {name: statistics.median(times[key]) if times[key] else float("nan")
            for name, key in (("one_core", True), ("two_cores", False))}


def summarize(result: dict[str, Any], draws: int = 2000) -> dict[str, Any]:
    """The two states' median steps without the worker (:func:`off_medians`); per arm (``off`` included): steps per
    second in its slots and in the ``off`` slots after them, the share of that time on one core, kernel calls per
    slot; for each worker arm, randomization p-values of its differences from ``off``."""
    arms, slot = result["arms"], result["slot_seconds"]
    names = sorted(set(arms) - {"off"})
    steps, one_core = per_slot(result)
    rate = [s / slot for s in steps]
    share = [c / slot for c in one_core]
    out: dict[str, Any] = {"slots": len(arms), "steps": len(result["step_seconds"]),
                           "training_threads": result["training_threads"],
                           "off_median_step_seconds": off_medians(result), "arms": {}}
    for arm in ["off", *names]:
        own, after = groups(arms, arm)
        row = {"slots": len(own), "steps_per_second": mean_over(rate, own), "one_core_share": mean_over(share, own),
               "kernel_calls_per_slot": mean_over(result["kernel_calls"], own) if result.get("kernel_calls") else None,
               "off_slots_after": len(after), "steps_per_second_after": mean_over(rate, after),
               "one_core_share_after": mean_over(share, after)}
        if arm != "off":
            for key, values, which in (("p_steps_per_second", rate, 0), ("p_steps_per_second_after", rate, 1),
                                       ("p_one_core_share_after", share, 1)):
                difference = functools.partial(arm_difference, values=values, which=which, arm=arm)
                row[key] = randomization_test(functools.partial(of_first_run, difference), [arms], [names], draws)[0]
        out["arms"][arm] = row
    return out


def pooled(results: Sequence[dict[str, Any]], arm: str = "normal", draws: int = 2000) -> dict[str, Any]:
    """What ``arm`` leaves behind over several runs: each run's difference between the ``off`` slots after ``arm``'s
    and those after ``off`` (:func:`arm_difference`), averaged over the runs with the after-``arm`` slots as
    weights; the p-values redraw every run's arms at once, each with its own arms (a stratified randomization
    test), so runs on different days, with their machine's own share of slow time, are never compared with each
    other. Runs without ``arm`` are left out. ``*_detectable``: the size a difference needed to reach p < 0.05."""
    runs = []
    for result in results:
        names = sorted(set(result["arms"]) - {"off"})
        if arm in names:
            steps, one_core = per_slot(result)
            slot = result["slot_seconds"]
            runs.append((result["arms"], names, [s / slot for s in steps], [c / slot for c in one_core]))

    def combined(drawn: Sequence[Sequence[str]], column: int) -> float:
        total = weight = 0.0
        for arms, kept in zip(drawn, runs, strict=True):
            n = len(groups(arms, arm)[1])
            difference = arm_difference(arms, kept[column], 1, arm)
            if n and difference == difference:
                total, weight = total + n * difference, weight + n
        return total / weight if weight else float("nan")

    def test(column: int) -> tuple[float, float]:
        return randomization_test(functools.partial(combined, column=column), [r[0] for r in runs],
                                  [r[1] for r in runs], draws)

    after_off = [(len(groups(r[0], "off")[1]), mean_over(r[2], groups(r[0], "off")[1])) for r in runs]
    base = sum(n * v for n, v in after_off) / sum(n for n, _ in after_off) if runs else float("nan")
    (p_rate, detectable_rate), (p_share, detectable_share) = test(2), test(3)
    return {"arm": arm, "runs": len(runs), "off_slots_after_arm": [len(groups(r[0], arm)[1]) for r in runs],
            "off_slots_after_off": [n for n, _ in after_off], "steps_per_second_after_off": base,
            "steps_per_second_difference": combined([r[0] for r in runs], 2), "p_steps_per_second": p_rate,
            "steps_per_second_detectable": detectable_rate,
            "one_core_share_difference": combined([r[0] for r in runs], 3), "p_one_core_share": p_share,
            "one_core_share_detectable": detectable_share}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=40.0)
    parser.add_argument("--slot", type=float, default=10.0, help="seconds per draw")
    parser.add_argument("--arms", default="normal", help="the worker's arms besides off: normal, niceN")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--load-kind", default="spin", choices=("matmul", "spin"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--renew", type=Path, help="recompute the summary of a JSON this script wrote")
    parser.add_argument("--pool", type=Path, nargs="+", help="JSONs this script wrote: the after-effect of --arms "
                        "(one arm) over all of them, printed (and written to --json)")
    args = parser.parse_args(argv)
    if args.pool:
        if "," in args.arms:
            parser.error("--pool takes one arm in --arms")
        try:
            results = [json.loads(path.read_text()) for path in args.pool]
        except (OSError, ValueError) as exc:
            parser.error(f"cannot read a --pool file: {exc}")
        summary = pooled(results, args.arms)
        summary["files"] = [path.name for path in args.pool]
        if args.json:
            args.json.write_text(json.dumps(summary, indent=1) + "\n")
        print(json.dumps(summary, indent=1))
        return 0
    try:
        [nice_of(arm) for arm in args.arms.split(",")]
    except ValueError as exc:
        parser.error(str(exc))
    result = json.loads(args.renew.read_text()) if args.renew else run(args)
    result["summary"] = summarize(result)
    target = args.renew or args.json
    if target:
        target.write_text(json.dumps(result) + "\n")
    print(json.dumps(result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
