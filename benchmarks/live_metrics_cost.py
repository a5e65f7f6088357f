"""What the live metrics (docs/recording.md, "Live metrics in your tracker") cost per snapshot.

For model shapes from tiny to 7B, one snapshot's spectra are made up (descending random singular values of the
right count), and four things are timed in this process: the snapshot scalars alone (``snapshot_scalars``:
analyze's ``update_metrics`` + ``aggregate``); everything the writer thread does for the live metrics at that
snapshot (``LiveMetrics`` fed through its writer tap: the step rows since the last snapshot, then the snapshot's
scalars, the noise scale and the capacity share, whose estimator reads every step so far, ``--run-steps`` of
them); the training thread's share (``LiveMetrics.publish``: the hand-over to a no-op sink); and as the baseline
the spectra those scalars come from (the singular values of every matrix, which the recorder computes anyway:
``torch.linalg.svdvals`` on one thread; above 1,024 per side estimated from 1,024 by ``n^3``). Prints a table of
times and ratios to the baseline.

    python benchmarks/live_metrics_cost.py [--repeats 3] [--steps 100] [--run-steps 10000]
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import numpy as np
import torch

from lorascope.analysis.live import snapshot_scalars
from lorascope.model.taxonomy import MatrixRef
from lorascope.record.live_metrics import LiveMetrics
from lorascope.store.payloads import Snapshot

SHAPES = {  # name: (layers, hidden, intermediate)
    "tiny (2 x 32)": (2, 32, 48),
    "Llama 4 x 256": (4, 256, 688),
    "SmolLM2-135M": (30, 576, 1536),
    "Llama-7B": (32, 4096, 11008),
}


def _matrices(layers: int, hidden: int, intermediate: int) -> list[tuple[str, int, int]]:
    out = []
    for _ in range(layers):
        out += [("attention", hidden, hidden)] * 4
        out += [("mlp", intermediate, hidden), ("mlp", intermediate, hidden), ("mlp", hidden, intermediate)]
    return out


def _svd_seconds(shapes: list[tuple[str, int, int]]) -> float:
    """Seconds of ``torch.linalg.svdvals`` over every matrix (one thread), each distinct shape timed once; above
    1,024 per side timed at 1,024 on the longer side (same aspect) and scaled by n^3."""
    per_shape: dict[tuple[int, int], float] = {}
    for o, i in {(o, i) for _, o, i in shapes}:
        factor = min(1.0, 1024 / max(o, i))
        m = torch.randn(max(1, round(o * factor)), max(1, round(i * factor)))
        started = time.perf_counter()
        torch.linalg.svdvals(m)
        per_shape[(o, i)] = (time.perf_counter() - started) / factor**3
    return sum(per_shape[(o, i)] for _, o, i in shapes)


def _step_columns(first: int, last: int, n_matrices: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The step rows ``first``..``last`` as the run file's writer appends them (a falling loss, 8 examples of 64
    loss tokens a step, noise-scale norms at 4 and 8 examples with |G|^2 > 0)."""
    steps = np.arange(first, last + 1)
    norms = rng.random((steps.size, n_matrices)).astype(np.float32)
    return {"step": steps, "loss": 3.0 / np.sqrt(steps), "lr": np.full(steps.size, 1e-4),
            "batch_examples": np.full(steps.size, 8), "batch_tokens": np.full(steps.size, 512),
            "batch_loss_tokens": np.full(steps.size, 64), "examples_seen": 8 * steps,
            "gns_batch_small": np.full(steps.size, 4.0), "gns_batch_big": np.full(steps.size, 8.0),
            "gns_sq_norm_small": 1.5 * norms, "gns_sq_norm_big": norms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100, help="steps since the last snapshot")
    parser.add_argument("--run-steps", type=int, default=10_000, help="steps so far (the capacity share reads all)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    torch.set_num_threads(1)
    print(f"{'model':<16} {'matrices':>8} {'scalars s':>10} {'writer thread s':>16} {'publish (training) s':>21} "
          f"{'spectra s':>10} {'writer / spectra':>17}")
    for name, dims in SHAPES.items():
        shapes = _matrices(*dims)
        sv = [np.sort(rng.random(min(o, i)))[::-1].astype(np.float32) for _, o, i in shapes]
        energy = [float(np.sum(s.astype(np.float64) ** 2)) for s in sv]
        kinds, outs, ins = zip(*shapes)
        scalars = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            snapshot_scalars(energy, sv, outs, ins, kinds)
            scalars.append(time.perf_counter() - started)
        refs = [MatrixRef(name=f"m{j}", module=f"m{j}", parameter="weight", kind=k, role="", layer=-1, expert=-1,
                          out_features=o, in_features=i) for j, (k, o, i) in enumerate(shapes)]
        writer_seconds, publish_seconds = [], []
        for _ in range(args.repeats):
            live = LiveMetrics(refs, lambda scalars, step: None)
            run_file = SimpleNamespace(_config={"dataset": {"examples": 8 * args.run_steps // 4}},  # 4 epochs
                                       append_steps=lambda rows: None, append_snapshot=lambda snapshot: None)
            tapped = live.tap(run_file)
            before = args.run_steps - args.steps
            tapped.append_steps(_step_columns(1, before, len(refs), rng))  # the run so far, not timed
            tapped.append_snapshot(Snapshot(step=before, energy=energy, sv=sv))
            live.publish()
            started = time.perf_counter()
            tapped.append_steps(_step_columns(before + 1, args.run_steps, len(refs), rng))
            tapped.append_snapshot(Snapshot(step=args.run_steps, energy=energy, sv=sv))
            writer_seconds.append(time.perf_counter() - started)
            started = time.perf_counter()
            live.publish()
            publish_seconds.append(time.perf_counter() - started)
        spectra = _svd_seconds(shapes)
        writer = min(writer_seconds)
        print(f"{name:<16} {len(shapes):>8} {min(scalars):>10.3f} {writer:>16.3f} {min(publish_seconds):>21.5f} "
              f"{spectra:>10.2f} {writer / spectra:>17.3f}")


if __name__ == "__main__":
    main()
