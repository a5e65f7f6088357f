"""Record a plain PyTorch training loop with ``lorascope.record``, then analyse the recording.

A small language model of one's own (embedding, a residual MLP block, an output layer: no transformers needed)
learns a synthetic language with AdamW; lorascope records every weight matrix from inside the loop, and
``lorascope.analyze`` says how much rank the update needs and what a LoRA of each candidate rank could hold.

    python examples/plain_loop.py [OUTPUT_FOLDER]     # default: a new temporary folder

Writes ``OUTPUT_FOLDER/run.h5`` and prints the headline. A few seconds on one CPU core.
"""

from __future__ import annotations

import torch
from _common import TinyLM, grouped_tokens, output_folder, print_headline

import lorascope

STEPS, BATCH, LENGTH = 60, 16, 16


def main(argv: list[str] | None = None) -> lorascope.Analysis:
    folder = output_folder(__doc__, argv, "plain")
    torch.set_num_threads(1)  # a tiny model: one thread is fastest, and several oversubscribe a busy machine
    path = folder / "run.h5"
    data = grouped_tokens(STEPS * BATCH, LENGTH).split(BATCH)

    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # total_steps spreads the log-spaced snapshots over the whole run; overwrite replaces an earlier run.h5; the
    # dataset size (which HF and Lightning read from their data loaders) lets analyze forecast LoRA capacity.
    with lorascope.record(model, path, optimizer=opt, total_steps=STEPS, overwrite=True,
                          extra_config={"dataset": {"examples": STEPS * BATCH}}) as rec:
        for ids in data:
            loss = model.loss(ids)
            loss.backward()
            rec.log(loss=loss, examples=len(ids), tokens=ids[:, 1:].numel())  # what the hooks cannot see here
            opt.step()
            opt.zero_grad()

    analysis = lorascope.analyze(path, ranks=(1, 4, 16))
    print_headline(analysis)
    return analysis


if __name__ == "__main__":
    main()
