"""Which part runs out first, from contributions, set against the reproduction study's target-set experiment.

The study's model (Llama hidden 64, 2 layers, pretrained on a Markov language) is fully fine-tuned on N random
facts with ``contributions=True`` (held batch: the first 64 facts); ``lorascope.analyze`` then says, per rank, which
kind's LoRA runs out first (the smallest capacity against its share of the bits). docs/reproduction.md measured the
target sets at matched parameter count: attention-only falls behind MLP-only (N = 512: attention-only r2 loss 4.97
vs MLP-only r2 4.26; N = 2,048: attention-only r9 4.28 vs MLP-only r8 4.01), so the prediction to check is
"attention runs out first".

    python examples/reproduce/repro_contributions.py --examples 512 --pretrain-steps 600 --epochs 50
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import repro_train as train  # noqa: E402

import lorascope  # noqa: E402
from lorascope.report.terminal import format_summary  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 9])
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base.pt"
        train.pretrain_base(base, steps=args.pretrain_steps)
        model = train.load_base(base)
        ids, labels = train.facts(args.examples, args.examples)
        held = {"input_ids": ids[:64], "labels": labels[:64]}
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
        order_generator = torch.Generator().manual_seed(0)
        steps = args.epochs * -(-args.examples // args.batch_size)
        path = Path(tmp) / "full.h5"
        model.train()
        with lorascope.record(model, path, optimizer=optimizer, total_steps=steps, snapshots=[steps],
                              contributions=True, held_batch=held,
                              extra_config={"dataset": {"examples": args.examples}}):
            for _ in range(args.epochs):
                order = torch.randperm(args.examples, generator=order_generator)
                for first in range(0, args.examples, args.batch_size):
                    batch = order[first:first + args.batch_size]
                    model(input_ids=ids[batch], labels=labels[batch]).loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
        analysis = lorascope.analyze(path, ranks=args.ranks)
        text = format_summary(analysis.summary)
        start = text.index("\nForecast")
        end = text.index("\nAt step")
        print(text[start:end])
        c = analysis.contributions
        if c is not None:
            for kind in c.kinds:
                print(f"{kind.name}: share {kind.share:.3f}, rank needed {kind.rank_needed}, "
                      + ", ".join(f"r{r.rank}: {r.lora_parameters} params runway {r.runway}" for r in kind.ranks))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
