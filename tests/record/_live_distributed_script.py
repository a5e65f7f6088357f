"""Helper of tests/record/test_live_distributed.py (not a test): a DDP run of two CPU processes (gloo) recorded
with a live tracker on every rank, as tests/record/_distributed_script.py's ``ddp`` mode trains it.

Usage:
    python -m torch.distributed.run --standalone --nproc_per_node 2 _live_distributed_script.py OUT

Rank 0 writes OUT/live.h5; each rank writes what its tracker was given to OUT/live_rank<r>.json.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
from pathlib import Path

import torch
from _distributed_script import (
    HANG_SECONDS,
    LR,
    SNAPSHOTS,
    STEPS,
    _init,
    _shut_down,
    ddp_step,
    tiny_lm,
)

import lorascope


def main() -> None:
    from torch.nn.parallel import DistributedDataParallel

    out = Path(sys.argv[1])
    faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)  # never outlive the test as a hung orphan
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rank = _init()
    published: list[tuple[int, dict[str, float]]] = []
    model = DistributedDataParallel(tiny_lm())
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    with lorascope.record(model, out / "live.h5", optimizer=optimizer, snapshots=SNAPSHOTS, total_steps=STEPS,
                          tracker=lambda scalars, step: published.append((step, dict(scalars)))) as recorder:
        for step in range(1, STEPS + 1):
            ddp_step(model, optimizer, recorder, rank, step)
    (out / f"live_rank{rank}.json").write_text(json.dumps(published))
    _shut_down()


if __name__ == "__main__":
    main()
