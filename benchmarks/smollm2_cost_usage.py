"""Per-run resource usage of a baseline run against one with per-step statistics: page faults, context switches,
user and system CPU time (``getrusage``), and each thread's CPU time and minor page faults (/proc/self/task), one
process.

SmolLM2-135M with the HF Trainer as in ``smollm2_trainer_overhead.py`` (its ``run``; ``stats`` is
``snapshots=[10**9]``), a 3-step uncounted run first:

    python benchmarks/smollm2_cost_usage.py --out docs/benchmarks/smollm2_cost_usage.json            # ~7 min
    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=68719476736 \
        python benchmarks/smollm2_cost_usage.py --out docs/benchmarks/smollm2_cost_usage_mallopt.json  # glibc fixed
"""
import argparse
import json
import os
import resource
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import smollm2_trainer_overhead as bench  # noqa: E402

USAGE = ("ru_utime", "ru_stime", "ru_minflt", "ru_majflt", "ru_nvcsw", "ru_nivcsw")


def threads_usage() -> dict[str, tuple[float, int]]:
    """(CPU seconds, minor page faults) of each thread of this process, by ``name:tid``."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            stat = Path(f"/proc/self/task/{tid}/stat").read_text()
            name = Path(f"/proc/self/task/{tid}/comm").read_text().strip()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        out[f"{name}:{tid}"] = ((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), int(fields[7]))
    return out


def main() -> None:
    a, base, args = bench.diagnostic_setup("baseline,stats,baseline,stats,baseline,stats,baseline", 20,
                                           "smollm2_cost_usage.json")
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        bench.run("baseline", base, argparse.Namespace(**{**vars(args), "steps": 3}), Path(tmp))  # uncounted
        for config in a.order.split(","):
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), threads_usage()
            r = bench.run("stats" if config == "stats" else "baseline", base, args, Path(tmp))
            r1, t1 = resource.getrusage(resource.RUSAGE_SELF), threads_usage()
            r["usage"] = {k: getattr(r1, k) - getattr(r0, k) for k in USAGE}
            delta = {k: (v[0] - t0.get(k, (0.0, 0))[0], v[1] - t0.get(k, (0.0, 0))[1]) for k, v in t1.items()}
            r["threads"] = {k: round(cpu, 2) for k, (cpu, _) in delta.items() if cpu > 0.05}
            r["thread_minor_faults"] = {k: faults for k, (_, faults) in delta.items() if faults > 1000}
            out.append(r)
            print(config, f"train {r['train_seconds']:.1f} median {r['median_step_seconds']:.3f}",
                  {k: round(v, 2) for k, v in r["usage"].items()}, r["threads"], r["thread_minor_faults"], flush=True)
    Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
