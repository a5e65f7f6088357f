"""Helper of tests/test_record_kill.py (not a test): train a tiny model with recording until killed.

Usage: python _record_kill_script.py RUN_PATH [MAX_STEPS]

Prints "READY" once the run file exists, then "STEP n" after each optimizer step, flushing each line, so the
test can kill the process (SIGKILL) at a known point, or read the live file while it is being written.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

import lorascope

VOCAB = 64
QUEUE_SIZE = 4  # small, so the file lags the printed steps by a few rows at most


def main() -> None:
    path = sys.argv[1]
    max_steps = int(sys.argv[2]) if len(sys.argv) > 2 else 100_000
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(VOCAB, 32), nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 32),
                          nn.Linear(32, VOCAB))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    # A snapshot after every step, with singular vectors and full updates, keeps the writer thread busy, so kills
    # land in the middle of writes as well as between them. On the training thread, so that every step row has its
    # snapshot before the next step starts (the worker, which also computes vectors now, would let them lag).
    with lorascope.record(model, path, optimizer=optimizer, snapshots=1, factors_k=2, store_delta="float16",
                          queue_size=QUEUE_SIZE, snapshot_worker=False) as recorder:
        print("READY", flush=True)
        for step in range(1, max_steps + 1):
            ids = torch.randint(0, VOCAB, (4, 8))
            logits = model(ids)
            loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
            loss.backward()
            recorder.log(loss=loss)
            optimizer.step()
            optimizer.zero_grad()
            print(f"STEP {step}", flush=True)


if __name__ == "__main__":
    main()
