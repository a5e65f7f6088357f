"""Memory and communication of recording two processes (torch.distributed, gloo, CPU): one snapshot and one step.

The model is a stack of Llama-shaped blocks written as plain ``nn.Linear`` layers (hidden ``H``, MLP ``I``: q, k,
v, o are H x H; gate, up are I x H; down is H x I) between an embedding and an output layer (V x H), float32. It
is recorded in three ways, each in fresh processes:

``single``  one process;
``ddp``     two processes, DDP;
``fsdp2``   two processes, ``fully_shard`` per block and on the root.

After two training steps every rank takes two snapshots exactly as the training loop does at a snapshot step
(the first one warms up: the first SVD maps LAPACK's code into the process) and reports, for the second one:

- **bytes** its collectives sent and received during the snapshot, counted by wrapping the
  ``torch.distributed`` calls the recorder makes (``gather``, ``send``, ``recv``), and the payload of the
  per-step ``all_reduce`` (one step);
- **peak memory**: the increase of the resident set's high-water mark over the snapshot (``VmHWM`` of
  /proc/self/status, reset through /proc/self/clear_refs just before) with glibc's mmap threshold fixed at
  64 KiB (``MALLOC_MMAP_THRESHOLD_``), so that every large buffer is mapped when allocated and unmapped when
  freed and shows in the resident set (with the default dynamic threshold freed heap memory is reused and the
  increase under-counts);
- **W_0 bytes** the rank keeps.

Usage::

    python benchmarks/distributed_snapshot.py            # H=768, I=2048, V=4096, 2 blocks (about a minute)
    python benchmarks/distributed_snapshot.py --hidden 256 --mlp 704 --vocab 1024   # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

WORLD = 2


class Block(nn.Module):
    """Attention-shaped and MLP-shaped projections (no softmax attention: the shapes are what matter here)."""

    def __init__(self, hidden: int, mlp: int) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(hidden, hidden, bias=False) for _ in range(4))
        self.gate_proj, self.up_proj = (nn.Linear(hidden, mlp, bias=False) for _ in range(2))
        self.down_proj = nn.Linear(mlp, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.o_proj(self.v_proj(x) + self.q_proj(x) * self.k_proj(x).sigmoid())
        return x + self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Blocks(nn.Module):
    def __init__(self, hidden: int, mlp: int, vocab: int, blocks: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(Block(hidden, mlp) for _ in range(blocks))
        self.out = nn.Linear(hidden, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.out(x)


def _memory_kib() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmHWM:", "VmRSS:")):
            key, value = line.split(":", 1)
            fields[key] = int(value.split()[0])
    return fields


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


class _Traffic:
    """Counts the bytes of the recorder's collectives by wrapping the torch.distributed functions it calls."""

    def __init__(self) -> None:
        self.sent = self.received = 0
        self.calls: dict[str, int] = {}
        dist = torch.distributed
        self._saved = {name: getattr(dist, name) for name in ("gather", "send", "recv", "all_reduce")}
        dist.gather, dist.send, dist.recv, dist.all_reduce = self._gather, self._send, self._recv, self._all_reduce

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def _gather(self, tensor, gather_list=None, dst=0, **kwargs):
        self._count("gather")
        size = tensor.numel() * tensor.element_size()
        if gather_list is None:
            self.sent += size
        else:
            self.received += size * (len(gather_list) - 1)
        return self._saved["gather"](tensor, gather_list, dst=dst, **kwargs)

    def _send(self, tensor, dst, **kwargs):
        self._count("send")
        self.sent += tensor.numel() * tensor.element_size()
        return self._saved["send"](tensor, dst, **kwargs)

    def _recv(self, tensor, src=None, **kwargs):
        self._count("recv")
        self.received += tensor.numel() * tensor.element_size()
        return self._saved["recv"](tensor, src, **kwargs)

    def _all_reduce(self, tensor, **kwargs):
        self._count("all_reduce")
        self.sent += tensor.numel() * tensor.element_size()  # the payload; a ring moves 2 (W - 1) / W of it
        return self._saved["all_reduce"](tensor, **kwargs)

    def reset(self) -> dict[str, object]:
        out = {"sent": self.sent, "received": self.received, "calls": dict(self.calls)}
        self.sent = self.received = 0
        self.calls = {}
        return out


def worker(mode: str, rank: int, args: argparse.Namespace, out: Path) -> None:
    """One process: train two steps with recording, then one snapshot under measurement."""
    import lorascope

    torch.set_num_threads(1)
    if mode != "single":
        torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    model = Blocks(args.hidden, args.mlp, args.vocab, args.blocks)
    if mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
    trained = model
    if mode == "ddp":
        trained = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    traffic = _Traffic() if mode != "single" else None
    with lorascope.record(trained, out / f"{mode}.h5", optimizer=optimizer, snapshots=[10**9], gns=None,
                          flush_seconds=0.0) as recorder:
        for step in range(2):
            ids = torch.randint(0, args.vocab, (2, 16), generator=torch.Generator().manual_seed(step * 10 + rank))
            logits = trained(ids)
            nn.functional.cross_entropy(logits.reshape(-1, args.vocab), ids.reshape(-1)).backward()
            if traffic is not None:
                traffic.reset()
            optimizer.step()  # the per-step exchange happens in the optimizer's post-step hook
            step_traffic = traffic.reset() if traffic is not None else {}
            optimizer.zero_grad()
        snapshot = recorder._snapshot if mode == "single" else recorder._snapshot_distributed
        snapshot()  # warm-up: LAPACK's code pages and the collectives' buffers count once, not per snapshot
        if traffic is not None:
            traffic.reset()
        before = _memory_kib()["VmRSS"]
        _reset_peak()
        snapshot()
        peak = _memory_kib()["VmHWM"] - before
        snapshot_traffic = traffic.reset() if traffic is not None else {}
        if recorder._sharded is not None:
            w0 = recorder._sharded.initial_bytes()
        else:
            w0 = sum(w.numel() * w.element_size() for w in recorder._w0 if isinstance(w, torch.Tensor))
        largest = max(r.out_features * r.in_features for r in recorder.refs) * 4
        total = sum(r.out_features * r.in_features for r in recorder.refs) * 4
    result = {"mode": mode, "rank": rank, "peak_kib": peak, "w0_bytes": w0, "largest_matrix_bytes": largest,
              "recorded_bytes": total, "snapshot_traffic": snapshot_traffic, "step_traffic": step_traffic}
    (out / f"{mode}-{rank}.json").write_text(json.dumps(result))
    if mode != "single":
        # torch's gloo process group sometimes aborts the interpreter's exit on CPU ("terminate called without an
        # active exception"), lorascope or not: leave without tearing it down once every rank is done.
        torch.distributed.barrier()
        sys.stdout.flush()
        os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(mode: str, args: argparse.Namespace, out: Path) -> list[dict]:
    ranks = 1 if mode == "single" else WORLD
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), WORLD_SIZE=str(ranks))
    argv = [sys.executable, __file__, "--worker", mode, "--out", str(out), "--hidden", str(args.hidden), "--mlp",
            str(args.mlp), "--vocab", str(args.vocab), "--blocks", str(args.blocks)]
    children = [subprocess.Popen(argv + ["--rank", str(r)], env=dict(env, RANK=str(r))) for r in range(ranks)]
    for child in children:
        if child.wait(timeout=900) != 0:
            raise SystemExit(f"{mode} worker failed")
    return [json.loads((out / f"{mode}-{r}.json").read_text()) for r in range(ranks)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--mlp", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--worker")
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.rank, args, Path(args.out))
        return
    mib = 2**20
    with tempfile.TemporaryDirectory() as tmp:
        rows = [row for mode in ("single", "ddp", "fsdp2") for row in _launch(mode, args, Path(tmp))]
    first = rows[0]
    print(f"model: hidden {args.hidden}, MLP {args.mlp}, vocab {args.vocab}, {args.blocks} blocks; recorded matrices "
          f"{first['recorded_bytes'] / mib:.1f} MiB float32, the largest {first['largest_matrix_bytes'] / mib:.1f} MiB")
    print(f"{'mode':<7}{'rank':>5}{'snapshot peak MiB':>19}{'x largest':>10}{'W_0 MiB':>9}{'snapshot sent MiB':>19}"
          f"{'received MiB':>14}{'step all_reduce B':>19}")
    for row in rows:
        snap, step = row["snapshot_traffic"], row["step_traffic"]
        print(f"{row['mode']:<7}{row['rank']:>5}{row['peak_kib'] / 1024:>19.1f}"
              f"{row['peak_kib'] * 1024 / row['largest_matrix_bytes']:>10.2f}{row['w0_bytes'] / mib:>9.1f}"
              f"{snap.get('sent', 0) / mib:>19.2f}{snap.get('received', 0) / mib:>14.2f}{step.get('sent', 0):>19}")


if __name__ == "__main__":
    main()
