"""The CUDA check of the recorder (issue 16, item 5): correctness against the CPU and overhead, in one short run.

On a machine without CUDA it says so and exits 0 (``--device cpu`` runs every step on the CPU instead, to check
the script itself). On a CUDA device:

1. **Correctness.** A small Llama (transformers, built from a config) is trained for ``--check-steps`` AdamW steps
   on CUDA, recorded with the defaults, in float32 and in bfloat16. The spectra of the final snapshot are compared
   with a float64 LAPACK SVD, on the host, of the same model's own update W_T - W_0 (target: every singular value
   within 1e-6 of s_1 for float32; bfloat16 weights are differenced in float32, so the same target holds). The same
   seed is then trained and recorded on the CPU: its spectra must agree with the CUDA run's to ``--cpu-tolerance``
   of s_1 (the two devices' kernels round differently, so the weights themselves drift apart a little).
2. **Host synchronisation.** With ``torch.cuda.set_sync_debug_mode("warn")``, the synchronising calls of
   ``--sync-steps`` training steps are counted without a recorder, with per-step statistics only, and with the
   default recorder over steps that include snapshots, by the thread that made them: the training thread should
   make none beyond the loop's own (the writer and the snapshot worker wait for the device by design).
3. **Overhead.** A larger Llama (``--hidden``, ``--layers``) is trained without a recorder, with per-step
   statistics only, with the defaults (snapshot worker, ``time_budget=0.05``), and with every spectrum on the
   training thread (``snapshot_worker=False, time_budget=None``, the recorder before issue 16), and with the
   defaults but a worker of 8 BLAS threads (``snapshot_threads=8``: a GPU host's spare cores), and with the
   spectra on the host worker (``spectra_device="host"``, the default before the device route), in alternating
   blocks of ``--block`` steps; each block ends with ``torch.cuda.synchronize()``. Printed: loop time ratios
   against the baseline of the same run, snapshots taken, and the recording's own cost as the file records it.

Usage::

    python benchmarks/gpu_check.py                       # a few minutes on one GPU
    python benchmarks/gpu_check.py --json gpu_check.json
    python benchmarks/gpu_check.py --device cpu --quick  # the script itself, on the CPU, in seconds
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

CONFIGS = {
    "baseline": None,
    "stats": {"snapshots": [10**9]},
    "defaults": {},
    "inthread": {"snapshot_worker": False, "time_budget": None},
    "threads8": {"snapshot_threads": 8},
    "host": {"spectra_device": "host"},
}


def build(hidden: int, layers: int, vocab: int, seed: int, device: str, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = max(1, hidden // 64)
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=int(hidden * 8 / 3) // 8 * 8,
                         vocab_size=vocab, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=512)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).train()


def batches(vocab: int, batch: int, seq: int, seed: int, n: int, device: str) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed + 1)
    return [torch.randint(0, vocab, (batch, seq), generator=generator).to(device) for _ in range(n)]


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor) -> None:
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# -- 1. correctness -----------------------------------------------------------------------------------------------
def recorded_run(device: str, dtype: torch.dtype, args: argparse.Namespace, path: Path
                 ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Train and record; returns (recorded final spectra, host float64 reference spectra) by matrix name."""
    import lorascope

    model = build(args.check_hidden, 2, args.vocab, args.seed, device, dtype)
    start = {name: p.detach().float().cpu().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = batches(args.vocab, 4, 32, args.seed, args.check_steps, device)
    with lorascope.record(model, path, optimizer=optimizer, total_steps=args.check_steps):
        for ids in data:
            step(model, optimizer, ids)
    recorded, reference = {}, {}
    with lorascope.open_run(path) as run:
        snaps = run.snapshots
        for j, (name, module, parameter) in enumerate(zip(run.modules["name"], run.modules["module"],
                                                          run.modules["parameter"], strict=True)):
            count = int(snaps["sv_count"].values[-1, j])
            recorded[name] = snaps["sv"].values[-1, j, :count].astype(np.float64)
            key = f"{module}.{parameter}"
            now = dict(model.named_parameters())[key].detach().float().cpu()
            delta = (now - start[key]).numpy()  # float32 difference, as the recorder takes it
            reference[name] = np.linalg.svd(delta.astype(np.float64), compute_uv=False)
    return recorded, reference


def max_error(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> tuple[float, str]:
    worst, where = 0.0, ""
    for name in a:
        scale = max(float(b[name][0]) if b[name].size else 0.0, 1e-30)
        err = float(np.max(np.abs(a[name] - b[name]))) / scale if a[name].size else 0.0
        if err > worst:
            worst, where = err, name
    return worst, where


def correctness(device: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    spectra = {}
    for label, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        recorded, reference = recorded_run(device, dtype, args, tmp / f"check-{device}-{label}.h5")
        err, where = max_error(recorded, reference)
        out[f"{device} {label}: recorded vs float64 SVD of its own update"] = {"max_error_over_s1": err,
                                                                               "matrix": where, "target": 1e-6}
        spectra[label] = recorded
    if device != "cpu":
        cpu_recorded, _ = recorded_run("cpu", torch.float32, args, tmp / "check-cpu-float32.h5")
        err, where = max_error(spectra["float32"], cpu_recorded)
        out[f"{device} float32 vs cpu float32, same seed"] = {"max_error_over_s1": err, "matrix": where,
                                                             "target": args.cpu_tolerance}
    return out


# -- 2. host synchronisation -------------------------------------------------------------------------------------
def count_syncs(args: argparse.Namespace, tmp: Path) -> dict[str, dict[str, int]]:
    """Per configuration: synchronising calls by thread name (``MainThread`` is the training thread)."""
    import threading
    from collections import Counter

    import lorascope

    counts = {}
    for config in ("baseline", "stats", "defaults"):
        model = build(args.check_hidden, 2, args.vocab, args.seed, "cuda", torch.float32)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        data = batches(args.vocab, 4, 32, args.seed, args.sync_steps + 2, "cuda")
        step(model, optimizer, data[0])  # optimizer state allocated before counting
        recorder = None
        if CONFIGS[config] is not None:
            recorder = lorascope.record(model, tmp / f"sync-{config}.h5", optimizer=optimizer,
                                        total_steps=args.sync_steps + 1, **CONFIGS[config])
        sync("cuda")
        seen: Counter[str] = Counter()

        def note(message: Any, *args: Any, seen: Counter[str] = seen, **kwargs: Any) -> None:
            if "synchroniz" in str(message):
                seen[threading.current_thread().name] += 1

        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = note  # restored by catch_warnings
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for ids in data[1:-1]:
                    step(model, optimizer, ids)
                sync("cuda")
                if recorder is not None:  # the worker's and writer's syncs of these steps, not the final snapshot's
                    deadline = time.monotonic() + 30
                    while recorder._taker.worker is not None and recorder._taker.worker.in_flight and \
                            time.monotonic() < deadline:
                        time.sleep(0.05)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts[config] = dict(seen)
        if recorder is not None:
            recorder.close()
    return counts


# -- 3. overhead -------------------------------------------------------------------------------------------------
class Run:
    def __init__(self, config: str, device: str, args: argparse.Namespace, path: Path) -> None:
        import lorascope

        self.config, self.device = config, device
        self.model = build(args.hidden, args.layers, args.vocab, args.seed, device, torch.float32)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.data = batches(args.vocab, args.batch, args.seq, args.seed, 8, device)
        for ids in self.data[:2]:
            step(self.model, self.optimizer, ids)
        options = CONFIGS[config]
        self.recorder = None
        if options is not None:
            self.recorder = lorascope.record(self.model, path, optimizer=self.optimizer,
                                             total_steps=args.steps, **options)
        self.loop_s, self.steps = 0.0, 0

    def block(self, n: int) -> None:
        sync(self.device)
        began = time.perf_counter()
        for _ in range(n):
            step(self.model, self.optimizer, self.data[self.steps % len(self.data)])
            self.steps += 1
        sync(self.device)
        self.loop_s += time.perf_counter() - began

    def finish(self) -> dict[str, Any]:
        out: dict[str, Any] = {"loop_s": self.loop_s, "steps": self.steps}
        if self.recorder is not None:
            out["snapshots_in_loop"] = self.recorder._taker.cost.taken  # private: the recorder's own count
            began = time.perf_counter()
            self.recorder.close()
            out["close_s"] = time.perf_counter() - began
            with __import__("lorascope").open_run(self.recorder.path) as run:
                out["recording_cost"] = run.config.get("recording_cost")
        return out


def overhead(device: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    configs = [c.strip() for c in args.configs.split(",")]
    runs = {config: Run(config, device, args, tmp / f"overhead-{config}.h5") for config in configs}
    names = list(runs)
    done, k = 0, 0
    while done < args.steps:
        n = min(args.block, args.steps - done)
        for name in names[k % len(names):] + names[: k % len(names)]:
            runs[name].block(n)
        done, k = done + n, k + 1
    results = {name: run.finish() for name, run in runs.items()}
    base = results["baseline"]["loop_s"]
    for result in results.values():
        result["ratio"] = result["loop_s"] / base
        result["ms_per_step"] = 1e3 * result["loop_s"] / result["steps"]
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cuda (default; exits 0 when there is none) or cpu (a check of the script)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few steps")
    parser.add_argument("--steps", type=int, default=300, help="timed steps per overhead configuration")
    parser.add_argument("--block", type=int, default=25, help="steps per alternating block")
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size of the overhead model")
    parser.add_argument("--layers", type=int, default=8, help="layers of the overhead model")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--check-hidden", type=int, default=256, help="hidden size of the correctness model")
    parser.add_argument("--check-steps", type=int, default=20)
    parser.add_argument("--sync-steps", type=int, default=10)
    parser.add_argument("--cpu-tolerance", type=float, default=1e-2,
                        help="CUDA vs CPU training of the same seed: max |s_i difference| / s_1")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"overhead configurations, comma-separated, baseline first (default: {','.join(CONFIGS)})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    configs = [c.strip() for c in args.configs.split(",")]
    if not configs or configs[0] != "baseline" or set(configs) - set(CONFIGS):
        parser.error(f"--configs: baseline first, then any of {', '.join(CONFIGS)}; got {args.configs!r}")
    if args.quick:
        args.steps, args.block, args.hidden, args.layers, args.seq = 20, 5, 128, 2, 32
        args.check_hidden, args.check_steps, args.sync_steps, args.vocab = 64, 6, 4, 512
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing to check. "
              "Run it on a machine with a GPU, or with --device cpu to check the script.")
        return 0
    device = args.device
    report: dict[str, Any] = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                              "torch": torch.__version__, "cpus": os.cpu_count(), "args": vars(args) | {"json": None}}
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lorascope-gpu-check-") as tmp:
        report["correctness"] = correctness(device, args, Path(tmp))
        if device == "cuda":
            report["host_syncs"] = count_syncs(args, Path(tmp))
        report["overhead"] = overhead(device, args, Path(tmp))
    report["elapsed_s"] = time.perf_counter() - began
    failed = print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))
    return 1 if failed else 0


def print_report(report: dict[str, Any]) -> bool:
    print(f"lorascope gpu_check on {report['device']} (torch {report['torch']}, {report['cpus']} CPUs), "
          f"{report['elapsed_s']:.0f} s")
    failed = False
    print("\ncorrectness (final snapshot, max over matrices of max_i |s_i - s_i(ref)| / s_1(ref)):")
    for what, r in report["correctness"].items():
        ok = r["max_error_over_s1"] <= r["target"]
        failed = failed or not ok
        print(f"  {what}: {r['max_error_over_s1']:.2e} ({r['matrix']}); target {r['target']:.0e}: "
              f"{'ok' if ok else 'FAILED'}")
    if "host_syncs" in report:
        syncs = report["host_syncs"]
        print("\nsynchronising calls over the counted steps, by thread (MainThread: training):")
        for config, by_thread in syncs.items():
            print(f"  {config}: " + (", ".join(f"{t} {n}" for t, n in sorted(by_thread.items())) or "none"))
    a = report["args"]
    print(f"\noverhead: Llama hidden {a['hidden']}, {a['layers']} layers, batch {a['batch']} x {a['seq']}, "
          f"{a['steps']} steps per configuration in alternating blocks of {a['block']}")
    print(f"  {'configuration':<12}{'ms/step':>10}{'ratio':>8}{'snapshots':>11}{'close s':>9}  recording_cost")
    for name, r in report["overhead"].items():
        cost = r.get("recording_cost") or {}
        note = "" if not cost else (f"share {cost.get('share_of_training', float('nan')):.3f}, thinned "
                                    f"{cost.get('snapshots_thinned')}, worker CPU "
                                    f"{cost.get('snapshot_worker_cpu_seconds', 0):.2f} s, device route "
                                    f"{cost.get('snapshot_worker_device_seconds', 0):.2f} s, training-thread snapshot "
                                    f"{cost.get('snapshot_training_thread_seconds', 0):.2f} s")
        print(f"  {name:<12}{r['ms_per_step']:>10.2f}{r['ratio']:>8.3f}{r.get('snapshots_in_loop', 0):>11}"
              f"{r.get('close_s', 0.0):>9.2f}  {note}")
    return failed


if __name__ == "__main__":
    sys.exit(main())
