"""Recording overhead: a small Llama trained on CPU with and without ``lorascope.record``, in one process.

Five configurations, each trained for ``--steps`` optimizer steps from the same initial weights on the same
seeded random tokens:

``baseline``   no recorder;
``stats``      (a) per-step statistics only: ``snapshots=[10**9]`` so no snapshot falls inside the loop;
``inthread``   (b0) the log-spaced schedule with every spectrum on the training thread and no time budget
               (``snapshot_worker=False, time_budget=None``: the recorder before issue 16);
``worker``     (b1) the same schedule, spectra on the snapshot worker, no time budget;
``snapshots``  (b) the defaults: worker and ``time_budget=0.05``, ``total_steps`` given.

In each of ``--rounds`` rounds the configurations get fresh models, optimizers and recorders and are
advanced side by side in alternating blocks of ``--block`` steps (A/B/C, then B/C/A, ...), so that drift and
bursts of outside load on a shared machine hit every configuration alike. Only the training steps are timed:
attaching the recorder (``start``: W_0 copy, file creation) and closing it (final snapshot, draining the
writer, closing the file) are timed and reported separately. Each run begins with unrecorded warm-up steps on
its fresh model and optimizer (AdamW state allocated, caches warm).

Timing: the headline ratio is the amortized one (loop wall time / steps, which includes the snapshot steps),
per round against the baseline of the same round; the table gives its median over rounds and its range.
The median per-step time (robust to outside load, blind to snapshot steps) is given with a bootstrap 95%
interval of its ratio. Process CPU time and the writer thread's CPU time are reported too: on 2 cores the
writer thread competes with torch's intra-op threads.

Memory: each configuration runs again in a fresh subprocess (twice, order rotated) with identical imports,
model, data and warm-up; its peak resident set size (``VmHWM`` of /proc/self/status, process-wide: torch
tensors, numpy, HDF5 buffers and library pages, allocator slack) is compared with the baseline process's, before
and after ``close()``. The extra peak is set against the size of one float32 copy of the recorded weights, which
is what the recorder keeps as W_0. (RSS growth inside one process is not used: freed heap memory is reused, so it
under-counts; tracemalloc does not see torch's allocations.)

Usage::

    python benchmarks/record_overhead.py                  # full: 3 rounds x 300 steps, a few minutes
    python benchmarks/record_overhead.py --quick          # tiny smoke check, seconds
    python benchmarks/record_overhead.py --json out.json  # also write every measurement as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

CONFIGS = ("baseline", "stats", "inthread", "worker", "snapshots")
LABELS = {
    "baseline": "baseline (no recorder)",
    "stats": "(a) per-step stats only",
    "inthread": "(b0) log, training thread",
    "worker": "(b1) log, worker, no budget",
    "snapshots": "(b) defaults (worker+budget)",
}
SNAPSHOT_CONFIGS = ("inthread", "worker", "snapshots")
TARGETS = {"stats": 1.02, "snapshots": 1.08}
MEMORY_TARGET = 1.25  # extra peak RSS / one fp32 copy of the recorded weights: "about one copy"


@dataclass(frozen=True)
class Setup:
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    batch: int
    seq: int
    steps: int
    rounds: int
    warmup: int
    memory_steps: int
    memory_repeats: int
    threads: int
    block: int = 25
    seed: int = 0


FULL = dict(hidden=256, layers=4, intermediate=688, vocab=2048, heads=4, batch=8, seq=64, steps=300, rounds=3,
            warmup=5, memory_steps=10, memory_repeats=2, block=25)
QUICK = dict(hidden=64, layers=2, intermediate=172, vocab=256, heads=4, batch=2, seq=16, steps=20, rounds=2,
             warmup=3, memory_steps=5, memory_repeats=1, block=5)


# -- the training job ----------------------------------------------------------------------------------------
def build(setup: Setup) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    """The model (seeded, so every run starts from the same weights) and a pool of random token batches."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=setup.hidden, num_hidden_layers=setup.layers,
                         intermediate_size=setup.intermediate, vocab_size=setup.vocab,
                         num_attention_heads=setup.heads, num_key_value_heads=setup.heads,
                         max_position_embeddings=max(setup.seq, 16))
    torch.manual_seed(setup.seed)
    model = LlamaForCausalLM(config)
    model.train()
    generator = torch.Generator().manual_seed(setup.seed + 1)
    batches = [torch.randint(0, setup.vocab, (setup.batch, setup.seq), generator=generator) for _ in range(16)]
    return model, batches


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor) -> None:
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def record_options(config: str, setup: Setup) -> dict[str, Any] | None:
    if config == "baseline":
        return None
    if config == "stats":
        return {"snapshots": [10**9]}  # no snapshot inside the loop; close() still takes the final one
    if config == "inthread":
        return {"total_steps": setup.steps, "snapshot_worker": False, "time_budget": None}
    if config == "worker":
        return {"total_steps": setup.steps, "time_budget": None}
    return {"total_steps": setup.steps}  # the default log-spaced schedule fitted to the run


def fresh_run(setup: Setup) -> tuple[torch.nn.Module, torch.optim.Optimizer, list[torch.Tensor]]:
    model, batches = build(setup)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    for i in range(setup.warmup):
        train_step(model, optimizer, batches[i % len(batches)])
    return model, optimizer, batches


def _thread_cpu_s(thread: Any) -> float:
    # The writer thread's own CPU time (Linux: per-thread CPU clock); NaN where unavailable.
    try:
        return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
    except (AttributeError, OSError, TypeError):
        return float("nan")


class _Run:
    """One configuration's model, optimizer and (maybe) recorder, stepped block by block."""

    def __init__(self, config: str, setup: Setup, path: Path) -> None:
        import lorascope

        self.config, self.setup = config, setup
        self.model, self.optimizer, self.batches = fresh_run(setup)
        self.options = record_options(config, setup)
        self.recorder = None
        self.start_s = self.close_s = 0.0
        self.writer_cpu_s = float("nan")
        if self.options is not None:
            t0 = time.perf_counter()
            self.recorder = lorascope.record(self.model, path, optimizer=self.optimizer, **self.options)
            self.start_s = time.perf_counter() - t0
            self._writer_thread = self.recorder._writer._thread  # private: only to read the writer's CPU clock
            self._writer_cpu0 = _thread_cpu_s(self._writer_thread)
        self.cost: dict[str, Any] = {}
        self.step_s: list[float] = []
        self.block_s: list[float] = []
        self.block_cpu_s: list[float] = []

    def block(self, n: int) -> None:
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for _ in range(n):
            i = self.setup.warmup + len(self.step_s)
            t0 = time.perf_counter()
            train_step(self.model, self.optimizer, self.batches[i % len(self.batches)])
            self.step_s.append(time.perf_counter() - t0)
        self.block_s.append(time.perf_counter() - wall0)
        self.block_cpu_s.append(time.process_time() - cpu0)

    def finish(self) -> dict[str, Any]:
        n_snapshots = 0
        if self.recorder is not None:
            self.writer_cpu_s = _thread_cpu_s(self._writer_thread) - self._writer_cpu0
            if self.config in SNAPSHOT_CONFIGS:  # taken in the loop (the budget may thin the schedule)
                n_snapshots = self.recorder._taker.cost.taken  # private: the recorder's own count
            self.cost = self.recorder._taker.cost_section()
            t0 = time.perf_counter()
            self.recorder.close()
            self.close_s = time.perf_counter() - t0
        return {"config": self.config, "step_s": self.step_s, "block_s": self.block_s,
                "block_cpu_s": self.block_cpu_s, "loop_s": sum(self.block_s), "loop_cpu_s": sum(self.block_cpu_s),
                "writer_cpu_s": self.writer_cpu_s, "start_s": self.start_s, "close_s": self.close_s,
                "snapshots_in_loop": n_snapshots, "recording_cost": self.cost}


def timed_round(setup: Setup, workdir: Path, round_index: int) -> list[dict[str, Any]]:
    """The configurations side by side, each with its own model, optimizer and recorder, advanced in
    alternating blocks of ``setup.block`` steps (order rotated per block), so that outside load and drift hit
    every configuration alike. Only the steps are timed; start and close are timed apart."""
    runs = [_Run(config, setup, workdir / f"r{round_index}-{config}.h5") for config in CONFIGS]
    done, block_index = 0, 0
    while done < setup.steps:
        n = min(setup.block, setup.steps - done)
        shift = (round_index + block_index) % len(runs)
        for run in runs[shift:] + runs[:shift]:
            run.block(n)
        done, block_index = done + n, block_index + 1
    return [run.finish() for run in runs]


# -- memory: one fresh process per configuration --------------------------------------------------------------
def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_child(config: str, setup: Setup) -> dict[str, Any]:
    import lorascope  # imported by every configuration, so the baseline carries the same libraries
    from lorascope.model.taxonomy import classify

    torch.set_num_threads(setup.threads)
    model, optimizer, batches = fresh_run(setup)
    refs = classify(model).matrices
    options = record_options(config, setup)
    if options is not None and config in SNAPSHOT_CONFIGS:
        options = {**options, "total_steps": setup.memory_steps}  # the log schedule fitted to this shorter run
    with tempfile.TemporaryDirectory(prefix="lorascope-bench-mem-") as tmp:
        recorder, w0_bytes = None, 0
        if options is not None:
            recorder = lorascope.record(model, Path(tmp) / "run.h5", optimizer=optimizer, **options)
            w0_bytes = sum(w.numel() * w.element_size() for w in recorder._w0 if isinstance(w, torch.Tensor))
        for i in range(setup.memory_steps):
            train_step(model, optimizer, batches[i % len(batches)])
        peak_loop = _proc_status_kib("VmHWM")
        if recorder is not None:
            recorder.close()  # for "stats" this takes the one snapshot of the run
        peak_all = _proc_status_kib("VmHWM")
    return {"config": config, "peak_loop_kib": peak_loop, "peak_kib": peak_all, "w0_bytes": w0_bytes,
            "recorded_fp32_bytes": sum(4 * r.out_features * r.in_features for r in refs),
            "largest_matrix_fp32_bytes": max(4 * r.out_features * r.in_features for r in refs)}


def measure_memory(setup: Setup) -> list[dict[str, Any]]:
    results = []
    for repeat in range(setup.memory_repeats):
        k = repeat % len(CONFIGS)
        order = CONFIGS[k:] + CONFIGS[:k]
        for config in order:
            command = [sys.executable, __file__, "--memory-child", config, "--setup-json", json.dumps(asdict(setup))]
            done = subprocess.run(command, check=True, capture_output=True, text=True)
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return results


# -- where the per-step and snapshot time goes (same process, after the timed rounds) --------------------------
def breakdown(setup: Setup, workdir: Path) -> dict[str, Any]:
    """Time the recorder's work directly: the gradient statistics of one step and one snapshot (all matrices,
    then the singular values per matrix shape)."""
    import lorascope
    from lorascope.record.snapshot import take_snapshot, update_delta
    from lorascope.spectrum import singular_values

    try:
        from lorascope.spectrum import singular_values_many
    except ImportError:
        singular_values_many = None

    model, optimizer, batches = fresh_run(setup)
    recorder = lorascope.record(model, workdir / "breakdown.h5", optimizer=optimizer, snapshots=[10**9])
    for i in range(3):
        train_step(model, optimizer, batches[i])
    loss = model(input_ids=batches[0], labels=batches[0]).loss
    loss.backward()

    def best_ms(fn: Any, repeats: int) -> float:
        # Best of n: the cost of the work itself, with as little outside load in it as the machine allows.
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return 1e3 * min(times)

    grad_ms = best_ms(recorder._capture_gradients, 50)  # private: the pre-step hook's work, without the hook
    gns_ms = float("nan")
    micro = getattr(recorder, "_micro", None)  # private: the gradient-noise-scale tensor hooks (gns="auto")
    if micro is not None:
        tensors = {key: tensor for key, (tensor, _) in micro._plan.items()}
        grads = {key: tensor.grad for key, tensor in tensors.items()}

        def first_pass() -> None:
            # What the hooks do during the one backward pass of a step without accumulation (param.grad is None).
            for tensor in tensors.values():
                tensor.grad = None
            for key, grad in grads.items():
                micro._on_grad(key, grad)
            for key, tensor in tensors.items():
                tensor.grad = grads[key]
            micro.reset()

        gns_ms = best_ms(first_pass, 50)
    snapshot_ms = best_ms(lambda: take_snapshot(recorder.refs, model, recorder._w0, options=recorder.options,
                                                step=recorder.step), 5)
    # The snapshot worker's path: what the training thread does (copies) and what the worker computes.
    from lorascope.record.snapshot_worker import SnapshotWorker, blas_threads, capture, host_copy_bytes

    nbytes = host_copy_bytes(recorder.refs, recorder._tensors, False)  # private: the recorder's tensors
    capture_ms = best_ms(lambda: capture(recorder.refs, model, recorder._w0, step=recorder.step, nbytes=nbytes), 5)
    job = capture(recorder.refs, model, recorder._w0, step=recorder.step, nbytes=nbytes)
    worker = SnapshotWorker(recorder.refs, deliver=lambda s: None, missing=lambda s, r: None, buffer_bytes=nbytes,
                            threads=1)

    def worker_compute() -> None:
        with blas_threads(1):
            worker.compute(job)

    worker_ms = best_ms(worker_compute, 5)
    shapes: dict[tuple[int, int], list[Any]] = {}
    for ref, w0 in zip(recorder.refs, recorder._w0, strict=True):
        shapes.setdefault((ref.out_features, ref.in_features), []).append((ref, w0))
    per_shape = []
    with torch.no_grad():
        for shape, items in shapes.items():
            delta = update_delta(model, items[0][0], items[0][1])
            row = {"shape": list(shape), "count": len(items),
                   "svdvals_ms": best_ms(lambda d=delta: singular_values(d), 7),
                   "svdvals_transposed_ms": best_ms(lambda d=delta: singular_values(d.mT), 7)}
            if singular_values_many is not None:  # the analysis side's float64 Gram route, one matrix per call
                row["gram_ms"] = best_ms(lambda d=delta: singular_values_many([d]), 7)
            per_shape.append(row)
        many_ms = float("nan")
        if singular_values_many is not None:
            deltas = [update_delta(model, ref, w0) for ref, w0 in zip(recorder.refs, recorder._w0, strict=True)]
            many_ms = best_ms(lambda: singular_values_many(deltas), 5)
            del deltas
    optimizer.zero_grad(set_to_none=True)
    recorder.close()
    return {"grad_stats_ms": grad_ms, "gns_hooks_ms": gns_ms, "snapshot_ms": snapshot_ms, "per_shape": per_shape,
            "all_spectra_many_ms": many_ms, "capture_ms": capture_ms, "worker_compute_ms": worker_ms,
            "copy_mib": nbytes / 2**20}


# -- statistics and the table ---------------------------------------------------------------------------------
def bootstrap_median_ratio(x: np.ndarray, base: np.ndarray, rng: np.random.Generator, n: int = 2000
                           ) -> tuple[float, float]:
    xs = np.median(rng.choice(x, size=(n, x.size)), axis=1)
    bs = np.median(rng.choice(base, size=(n, base.size)), axis=1)
    low, high = np.percentile(xs / bs, [2.5, 97.5])
    return float(low), float(high)


def summarize(runs: list[dict[str, Any]], setup: Setup) -> dict[str, Any]:
    rng = np.random.default_rng(setup.seed)
    by_round: dict[int, dict[str, dict[str, Any]]] = {}
    for run in runs:
        by_round.setdefault(run["round"], {})[run["config"]] = run
    pooled = {c: np.concatenate([np.asarray(r["step_s"]) for r in runs if r["config"] == c]) for c in CONFIGS}
    base_median = float(np.median(pooled["baseline"]))
    rows = {}
    for config in CONFIGS:
        mine = [by_round[k][config] for k in sorted(by_round)]
        ratios = [by_round[k][config]["loop_s"] / by_round[k]["baseline"]["loop_s"] for k in sorted(by_round)]
        cpu_ratios = [by_round[k][config]["loop_cpu_s"] / by_round[k]["baseline"]["loop_cpu_s"]
                      for k in sorted(by_round)]
        median_step = float(np.median(pooled[config]))
        ci = (1.0, 1.0) if config == "baseline" else bootstrap_median_ratio(pooled[config], pooled["baseline"], rng)
        rows[config] = {
            "mean_step_ms": 1e3 * statistics.median(r["loop_s"] / setup.steps for r in mine),
            "median_step_ms": 1e3 * median_step,
            "ratio_mean": statistics.median(ratios),
            "ratio_mean_min": min(ratios),
            "ratio_mean_max": max(ratios),
            "ratio_median": median_step / base_median,
            "ratio_median_ci95": ci,
            "ratio_cpu": statistics.median(cpu_ratios),
            "writer_cpu_ms_per_step": 1e3 * statistics.median(r["writer_cpu_s"] for r in mine) / setup.steps,
            "start_ms": 1e3 * statistics.median(r["start_s"] for r in mine),
            "close_ms": 1e3 * statistics.median(r["close_s"] for r in mine),
            "snapshots_in_loop": mine[0]["snapshots_in_loop"],
            "slow_steps": int(np.sum(pooled[config] > 3 * base_median)),
        }
    return rows


def memory_rows(results: list[dict[str, Any]]) -> dict[str, Any]:
    def median_mib(config: str, key: str) -> float:
        return statistics.median(r[key] for r in results if r["config"] == config) / 1024

    copy_mib = results[0]["recorded_fp32_bytes"] / 2**20
    base = median_mib("baseline", "peak_kib")
    rows = {}
    for config in CONFIGS:
        peaks = [r["peak_kib"] / 1024 for r in results if r["config"] == config]
        rows[config] = {"peak_loop_mib": median_mib(config, "peak_loop_kib"),
                        "peak_mib": median_mib(config, "peak_kib"),
                        "peak_range_mib": [min(peaks), max(peaks)],
                        "extra_loop_mib": median_mib(config, "peak_loop_kib") - base,
                        "extra_mib": median_mib(config, "peak_kib") - base,
                        "w0_mib": statistics.median(r["w0_bytes"] for r in results if r["config"] == config) / 2**20}
        rows[config]["extra_over_copy"] = rows[config]["extra_mib"] / copy_mib
    return {"one_fp32_copy_mib": copy_mib, "largest_matrix_mib": results[0]["largest_matrix_fp32_bytes"] / 2**20,
            "rows": rows}


def verdict(value: float, target: float) -> str:
    if value <= target:
        return f"met (<= {target:.2f})"
    return f"NOT met: {value:.3f} > {target:.2f} by {value - target:+.3f}"


def print_report(report: dict[str, Any]) -> None:
    s, env, timing = report["setup"], report["environment"], report["timing"]
    print(f"lorascope recording overhead  (python {' '.join(sys.argv[1:]) or '(defaults)'})")
    print(f"machine: {env['cpus']} CPUs, torch {env['torch']} on {env['device']}, {env['threads']} torch threads, "
          f"transformers {env['transformers']}, h5py {env['h5py']}, python {env['python']}; "
          f"load average {env['load_before']:.2f} before, {env['load_after']:.2f} after")
    if max(env["load_before"], env["load_after"]) > env["cpus"] - 1:
        print(f"warning: load average above {env['cpus'] - 1} on {env['cpus']} CPUs: other processes compete for the "
              "cores; expect slow steps and wider ranges")
    print(f"model: LlamaForCausalLM hidden {s['hidden']}, {s['layers']} layers, intermediate {s['intermediate']}, "
          f"vocab {s['vocab']}: {report['recorded_matrices']} recorded matrices, "
          f"{report['recorded_params'] / 1e6:.2f} M weights; AdamW; batch {s['batch']} x {s['seq']} tokens")
    print(f"{s['rounds']} rounds x {s['steps']} timed steps per configuration, side by side in alternating blocks of "
          f"{s['block']} steps, {s['warmup']} unrecorded warm-up steps before each run; total "
          f"{report['elapsed_s']:.0f} s\n")
    header = (f"{'configuration':<27}{'median step':>12}{'mean step':>11}{'ratio mean':>12}{'[min, max]':>16}"
              f"{'ratio median [95% CI]':>25}{'ratio CPU':>11}{'snapshots':>11}{'writer CPU':>12}"
              f"{'start':>9}{'close':>9}{'slow':>6}")
    print(header)
    for config in CONFIGS:
        r = timing[config]
        lo, hi = r["ratio_median_ci95"]
        writer = "" if config == "baseline" else f"{r['writer_cpu_ms_per_step']:.2f} ms/st"
        start = "" if config == "baseline" else f"{r['start_ms']:.0f} ms"
        close = "" if config == "baseline" else f"{r['close_ms']:.0f} ms"
        print(f"{LABELS[config]:<27}{r['median_step_ms']:>9.1f} ms{r['mean_step_ms']:>8.1f} ms{r['ratio_mean']:>12.3f}"
              f"{'[' + format(r['ratio_mean_min'], '.3f') + ', ' + format(r['ratio_mean_max'], '.3f') + ']':>16}"
              f"{format(r['ratio_median'], '.3f') + ' [' + format(lo, '.3f') + ', ' + format(hi, '.3f') + ']':>25}"
              f"{r['ratio_cpu']:>11.3f}{r['snapshots_in_loop']:>11d}{writer:>12}{start:>9}{close:>9}"
              f"{r['slow_steps']:>6d}")
    print("\nratio mean = loop wall time / baseline loop wall time of the same round (median over rounds); "
          "ratio median = pooled per-step medians;\nratio CPU = process CPU time (all threads) of the loop; "
          "slow = steps over 3x the baseline median step (outside load).")
    for config, target in TARGETS.items():
        print(f"target {LABELS[config]}: ratio mean {timing[config]['ratio_mean']:.3f}: "
              f"{verdict(timing[config]['ratio_mean'], target)}")
    if "memory" in report:
        mem = report["memory"]
        print(f"\npeak host memory: fresh process per configuration, VmHWM, {s['memory_steps']} steps, "
              f"{s['memory_repeats']} repeat(s), median; one fp32 copy of the recorded weights = "
              f"{mem['one_fp32_copy_mib']:.1f} MiB")
        print(f"{'configuration':<27}{'peak RSS':>12}{'[min, max]':>20}{'extra peak':>12}{'of which loop':>15}"
              f"{'extra / copy':>14}{'W_0 kept':>11}")
        for config in CONFIGS:
            r = mem["rows"][config]
            lo, hi = r["peak_range_mib"]
            print(f"{LABELS[config]:<27}{r['peak_mib']:>8.1f} MiB{'[' + f'{lo:.1f}, {hi:.1f}' + ']':>20}"
                  f"{r['extra_mib']:>8.1f} MiB{r['extra_loop_mib']:>11.1f} MiB{r['extra_over_copy']:>14.2f}"
                  f"{r['w0_mib']:>7.1f} MiB")
        print(f"extra peak = peak RSS (training loop and close) - baseline peak RSS; of which loop = the same before "
              f"close() (for (a), close takes the run's one snapshot); W_0 kept = the recorder's own tensors; largest "
              f"recorded matrix {mem['largest_matrix_mib']:.1f} MiB in fp32")
        for config in TARGETS:
            value = mem["rows"][config]["extra_over_copy"]
            print(f"target {LABELS[config]}: extra memory {value:.2f} copies: {verdict(value, MEMORY_TARGET)}")
    if "breakdown" in report:
        b, base_ms = report["breakdown"], timing["baseline"]["mean_step_ms"]
        n_snap = timing["inthread"]["snapshots_in_loop"]
        print(f"\nwhere the time goes (timed directly, best of 5-50 calls; baseline mean step {base_ms:.1f} ms):")
        print(f"  gradient statistics (optimizer pre-step hook): {b['grad_stats_ms']:.2f} ms per step = "
              f"{100 * b['grad_stats_ms'] / base_ms:.1f}% of a step")
        print(f"  gradient-noise-scale tensor hooks (gns='auto'), one backward pass per step: "
              f"{b['gns_hooks_ms']:.2f} ms per step = {100 * b['gns_hooks_ms'] / base_ms:.1f}% of a step")
        print(f"  writer thread CPU: {timing['stats']['writer_cpu_ms_per_step']:.2f} ms per step (stats), "
              f"{timing['snapshots']['writer_cpu_ms_per_step']:.2f} ms per step (defaults)")
        amortized = b["snapshot_ms"] * n_snap / s["steps"]
        print(f"  one snapshot on the training thread (b0): {b['snapshot_ms']:.1f} ms = "
              f"{b['snapshot_ms'] / base_ms:.2f} steps; x {n_snap} snapshots / {s['steps']} steps = {amortized:.2f} ms "
              f"per step = {100 * amortized / base_ms:.1f}% of a step")
        print(f"  one snapshot with the worker: training thread {b['capture_ms']:.1f} ms (copies, "
              f"{b['copy_mib']:.1f} MiB) = {b['capture_ms'] / base_ms:.2f} steps; worker "
              f"{b['worker_compute_ms']:.1f} ms on one BLAS thread")
        for config in SNAPSHOT_CONFIGS:
            costs = [r["recording_cost"] for r in report["runs"] if r["config"] == config]
            if costs:
                c = costs[0]
                print(f"  {LABELS[config]} round 1 recording_cost: taken {c['snapshots_taken']}, thinned "
                      f"{c['snapshots_thinned']}, snapshot time on the training thread "
                      f"{c['snapshot_training_thread_seconds']:.2f} s, worker CPU "
                      f"{c['snapshot_worker_cpu_seconds']:.2f} s, share of training (as recorded) "
                      f"{c['share_of_training']:.3f}")
        print("  singular values per matrix (ms): svdvals = what the recorder calls now (float32 LAPACK); (.mT) = the "
              "same on the transposed view; gram = lorascope.spectrum.singular_values_many([delta]) (float64 Gram)")
        print(f"  {'matrix shape':<14}{'count':>6}{'svdvals':>10}{'x count':>10}{'(.mT)':>9}{'gram':>9}{'x count':>10}")
        total = {"svdvals": 0.0, "gram": 0.0}
        for row in b["per_shape"]:
            shape = "x".join(map(str, row["shape"]))
            gram = row.get("gram_ms", float("nan"))
            total["svdvals"] += row["svdvals_ms"] * row["count"]
            total["gram"] += gram * row["count"]
            print(f"  {shape:<14}{row['count']:>6}{row['svdvals_ms']:>10.2f}{row['svdvals_ms'] * row['count']:>10.1f}"
                  f"{row['svdvals_transposed_ms']:>9.2f}{gram:>9.2f}{gram * row['count']:>10.1f}")
        print(f"  {'all matrices':<14}{'':>6}{'':>10}{total['svdvals']:>10.1f}{'':>9}{'':>9}{total['gram']:>10.1f}"
              f"   (singular_values_many of all {report['recorded_matrices']} at once: "
              f"{b['all_spectra_many_ms']:.1f} ms)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, help="timed optimizer steps per run (default 300; quick 20)")
    parser.add_argument("--rounds", type=int, help="rounds of the three configurations (default 3; quick 2)")
    parser.add_argument("--quick", action="store_true", help="tiny model and few steps: a smoke check")
    parser.add_argument("--json", type=Path, help="also write every measurement to this JSON file")
    parser.add_argument("--batch-size", type=int, help="sequences per step (default 8)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default 64)")
    parser.add_argument("--block", type=int, help="steps per alternating block (default 25; quick 5)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--memory-child", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--setup-json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, Setup(**json.loads(args.setup_json)))))
        return 0

    base = dict(QUICK if args.quick else FULL)
    for key, value in (("steps", args.steps), ("rounds", args.rounds), ("batch", args.batch_size),
                       ("seq", args.seq_len), ("block", args.block)):
        if value is not None:
            if value < 1:
                parser.error(f"--{key} must be >= 1")
            base[key] = value
    setup = Setup(threads=args.threads, **base)
    torch.set_num_threads(setup.threads)

    import h5py
    import transformers

    from lorascope.model.taxonomy import classify

    began, load_before = time.perf_counter(), os.getloadavg()[0]
    model, _ = build(setup)
    refs = classify(model).matrices
    report: dict[str, Any] = {
        "setup": asdict(setup),
        "recorded_matrices": len(refs),
        "recorded_params": sum(r.out_features * r.in_features for r in refs),
    }
    del model
    runs = []
    with tempfile.TemporaryDirectory(prefix="lorascope-bench-") as tmp:
        workdir = Path(tmp)
        for round_index in range(setup.rounds):
            for run in timed_round(setup, workdir, round_index):
                run["round"] = round_index
                runs.append(run)
                print(f"round {round_index + 1}/{setup.rounds} {run['config']:<10} "
                      f"{1e3 * run['loop_s'] / setup.steps:7.1f} ms/step", file=sys.stderr, flush=True)
        report["timing"] = summarize(runs, setup)
        report["breakdown"] = breakdown(setup, workdir)
    if not args.no_memory:
        report["memory"] = memory_rows(measure_memory(setup))
    report["elapsed_s"] = time.perf_counter() - began
    report["environment"] = {
        "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "device": platform.processor() or platform.machine(), "transformers": transformers.__version__,
        "h5py": h5py.__version__, "python": platform.python_version(),
        "load_before": load_before, "load_after": os.getloadavg()[0],
    }
    report["runs"] = runs
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
