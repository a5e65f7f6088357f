"""Which part of per-step recording costs the wall time? Options toggled, interleaved with baselines, one process.

SmolLM2-135M with the HF Trainer as in ``smollm2_trainer_overhead.py`` (its ``run``), each configuration a fresh
model and Trainer, ``--steps`` steps (no warm-up run: the first run is slower):

``baseline``  no recorder;
``stats``     per-step statistics only (``snapshots=[10**9]``);
``nogns``     the same with ``gns=None`` (no tensor hooks inside backward);
``noworker``  the same with ``snapshot_worker=False`` (no snapshot thread);
``bf16w0``    the same with W_0 kept in bfloat16.

Prints each run's median step, the recorder's hook time and the garbage collector's time (``gc.callbacks``).

    python benchmarks/smollm2_cost_toggles.py --out docs/benchmarks/smollm2_cost_toggles.json   # ~13 min
"""
import gc
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import smollm2_trainer_overhead as bench  # noqa: E402

import lorascope  # noqa: E402

GC = {"seconds": 0.0, "gen2": 0, "count": 0}  # the garbage collector's time and collections during a run
_gc_start = [0.0]


def _gc_timer(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _gc_start[0] = time.perf_counter()
    else:
        GC["seconds"] += time.perf_counter() - _gc_start[0]
        GC["count"] += 1
        GC["gen2"] += info["generation"] == 2


VARIANTS = {
    "stats": {"snapshots": [10**9]},
    "nogns": {"snapshots": [10**9], "gns": None},
    "noworker": {"snapshots": [10**9], "snapshot_worker": False},
    "bf16w0": {"snapshots": [10**9], "w0_dtype": "bfloat16"},
}
real_record = lorascope.record


def main() -> None:
    gc.callbacks.append(_gc_timer)
    a, base, args = bench.diagnostic_setup("baseline,stats,nogns,noworker,baseline,stats,nogns,noworker,baseline",
                                           25, "smollm2_cost_toggles.json")
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for config in a.order.split(","):
            if config in VARIANTS:
                opts = VARIANTS[config]
                lorascope.record = lambda trainer, path, opts=opts, **kw: real_record(trainer, path, **opts)
                r = bench.run("stats", base, args, Path(tmp))  # bench.run calls lorascope.record: the variant
                r["config"] = config
            else:
                lorascope.record = real_record
                r = bench.run("baseline", base, args, Path(tmp))
            r["gc"] = dict(GC)
            GC.update(seconds=0.0, gen2=0, count=0)
            out.append(r)
            rc = r.get("recording_cost", {})
            print(config, f"train {r['train_seconds']:.1f} median {r['median_step_seconds']:.3f} "
                  f"hooks {rc.get('step_hooks_seconds', 0):.2f} gc {r['gc']}", flush=True)
    Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
