"""What handing step rows to the writer thread costs the training thread (issue 16, per-step statistics).

A Llama of 8 tiny layers (58 recorded matrices; hidden 32, so the step's own arithmetic is small and the
recorder's Python work shows) trains ``--steps`` AdamW steps on one torch thread, recorded with per-step statistics
only (``snapshots=[10**9]``), in two configurations alternated ``--rounds`` times in this process:

``batched``   the recorder as it is: rows held on the training thread and handed over every ``flush_seconds / 2``;
``per-step``  every row handed over at its step, as before (``put_step`` patched to queue each row at once).

Printed per configuration: the training thread's time in the per-step hooks (the recorder's own timer,
``step_seconds``) and, within it, in ``put_step``, both in ms per step (median over rounds).

Usage::

    python benchmarks/step_handoff.py                 # under a minute
    python benchmarks/step_handoff.py --steps 500 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    from transformers import LlamaConfig, LlamaForCausalLM

    import lorascope
    from lorascope.record import background

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=8, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 128, (2, 8))

    def loop(n: int) -> None:
        for _ in range(n):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    batched = background.BackgroundWriter.put_step
    in_put = [0.0]

    def per_step(self: background.BackgroundWriter, row: dict) -> bool:
        return self._put(background._STEPS, [row])

    def timed(put):  # noqa: ANN001, ANN202 - a wrapper of either put_step
        def put_step(self: background.BackgroundWriter, row: dict) -> bool:
            started = time.perf_counter()
            try:
                return put(self, row)
            finally:
                in_put[0] += time.perf_counter() - started
        return put_step

    loop(5)
    results: dict[str, list[tuple[float, float]]] = {"batched": [], "per-step": []}
    load = os.getloadavg()[0]
    for _ in range(args.rounds):
        for name, put in (("batched", batched), ("per-step", per_step)):
            background.BackgroundWriter.put_step = timed(put)  # type: ignore[method-assign]
            with tempfile.TemporaryDirectory() as folder:
                recorder = lorascope.record(model, os.path.join(folder, "run.h5"), optimizer=optimizer,
                                            snapshots=[10**9])
                in_put[0] = 0.0
                hooks_before = recorder._taker.cost.step_seconds  # private: the recorder's own timer
                loop(args.steps)
                hooks = recorder._taker.cost.step_seconds - hooks_before
                results[name].append((1e3 * hooks / args.steps, 1e3 * in_put[0] / args.steps))
                recorder.close()
    background.BackgroundWriter.put_step = batched  # type: ignore[method-assign]
    print(f"lorascope step hand-off ({' '.join(sys.argv[1:]) or 'defaults'}): {args.steps} steps x {args.rounds} "
          f"rounds, one torch thread, load average {load:.1f} before, {os.getloadavg()[0]:.1f} after")
    for name, rows in results.items():
        hooks = statistics.median(r[0] for r in rows)
        put = statistics.median(r[1] for r in rows)
        print(f"  {name:<9} per-step hooks {hooks:.3f} ms/step, of which put_step {put:.3f} ms/step "
              f"(rounds: {', '.join(f'{r[0]:.3f}' for r in rows)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
