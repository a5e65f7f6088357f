"""How long `lorascope analyze` takes on a realistic recording: a SmolLM2-135M-shaped model (30 layers x 7
matrices + the embedding = 211 modules, full spectra up to 576 values) with 24 snapshots and 2,000 steps.

The recording is synthesized through the real writer (spectra drawn from a decaying law, exact energies), since
the analysis cost depends on array sizes, not on where the values came from. Target: under 10 s on 2 cores.

    python benchmarks/analyze_speed.py [--snapshots 24] [--steps 2000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HIDDEN, INTER, LAYERS, KV, VOCAB = 576, 1536, 30, 192, 49152


def smollm_modules() -> list[dict]:
    shapes = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (KV, HIDDEN), "self_attn.v_proj": (KV, HIDDEN),
              "self_attn.o_proj": (HIDDEN, HIDDEN), "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN),
              "mlp.down_proj": (HIDDEN, INTER)}
    mods = [dict(name="model.embed_tokens", module="model.embed_tokens", parameter="weight", kind="embedding",
                 role="token_embedding", layer=-1, expert=-1, out_features=VOCAB, in_features=HIDDEN,
                 transposed=False, part="", lora=False)]
    for layer in range(LAYERS):
        for suffix, (out_f, in_f) in shapes.items():
            name = f"model.layers.{layer}.{suffix}"
            mods.append(dict(name=name, module=name, parameter="weight", kind=suffix.split(".")[0].replace(
                "self_attn", "attention"), role=suffix.split(".")[1].split("_")[0], layer=layer, expert=-1,
                out_features=out_f, in_features=in_f, transposed=False, part="", lora=False))
    return mods


def write_recording(path: Path, n_snapshots: int, n_steps: int, seed: int = 0) -> float:
    from lorascope.store.payloads import Snapshot
    from lorascope.store.writer import RunWriter

    rng = np.random.default_rng(seed)
    mods = smollm_modules()
    start = time.perf_counter()
    writer = RunWriter(path, mods).open()
    batch = 256
    for first in range(1, n_steps + 1, batch):
        steps = np.arange(first, min(first + batch, n_steps + 1))
        writer.append_steps({"step": steps, "examples_seen": steps * 32, "tokens_seen": steps * 32 * 512,
                             "loss": 2.0 / np.sqrt(steps), "lr": np.full(steps.size, 1e-4),
                             "grad_sq_norm": rng.uniform(0.1, 1.0, size=(steps.size, len(mods)))})
    candidates = np.unique(np.geomspace(1, n_steps, 4 * n_snapshots).astype(int))
    snapshot_steps = candidates[np.unique(np.linspace(0, len(candidates) - 1, n_snapshots).round().astype(int))]
    for step in snapshot_steps:
        spectra, energies = [], []
        for m in mods:
            n = min(m["out_features"], m["in_features"])
            s = (np.arange(1, n + 1) ** -0.6) * (1 + 0.05 * rng.standard_normal(n))
            s = np.sort(np.abs(s))[::-1] * np.sqrt(step)
            spectra.append(s)
            energies.append(float(np.sum(s**2)))
        writer.append_snapshot(Snapshot(step=int(step), examples_seen=int(step) * 32,
                                        tokens_seen=int(step) * 32 * 512, energy=energies, sv=spectra))
    writer.close()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snapshots", type=int, default=24)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)

    from click.testing import CliRunner

    from lorascope.report.folder import write_report
    from lorascope.workflows.analyze import analyze
    from lorascope_cli.main import cli

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run.h5"
        write_s = write_recording(run, args.snapshots, args.steps)
        from lorascope import open_run

        with open_run(run) as r:
            shape = (r.n_snapshots, len(r.modules), r.n_steps)
        results = {"analyze()": [], "write_report()": [], "lorascope analyze (CLI, in-process)": [],
                   "lorascope analyze (new process, with imports)": []}
        for i in range(args.repeats):
            t0 = time.perf_counter()
            analysis = analyze(run, ranks=(8, 16, 64))
            t1 = time.perf_counter()
            write_report(analysis, Path(tmp) / f"report{i}")
            t2 = time.perf_counter()
            out = CliRunner().invoke(cli, ["analyze", str(run), "-o", str(Path(tmp) / f"cli{i}")])
            t3 = time.perf_counter()
            if out.exit_code != 0:
                raise SystemExit(f"CLI failed: {out.output}")
            results["analyze()"].append(t1 - t0)
            results["write_report()"].append(t2 - t1)
            results["lorascope analyze (CLI, in-process)"].append(t3 - t2)
            t4 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "lorascope_cli.main", "analyze", str(run), "-o",
                                   str(Path(tmp) / f"proc{i}")], capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"CLI process failed: {proc.stderr}")
            results["lorascope analyze (new process, with imports)"].append(time.perf_counter() - t4)
    print(f"recording: {shape[1]} modules x {shape[0]} snapshots x {shape[2]} steps "
          f"(synthesized in {write_s:.1f} s)")
    print(f"{'what':46s} {'median s':>9s} {'min s':>7s} {'max s':>7s}  target")
    for name, times in results.items():
        target = "< 10 s" if "lorascope analyze" in name else ""
        print(f"{name:46s} {np.median(times):9.2f} {min(times):7.2f} {max(times):7.2f}  {target}")
    if args.json:
        args.json.write_text(json.dumps({"shape": shape, "seconds": results}, indent=2))


if __name__ == "__main__":
    main()
