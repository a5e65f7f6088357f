"""What the examples share: the output folder argument, a synthetic language with a low-rank structure, and tiny
models built locally (nothing is downloaded)."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

VOCAB, GROUPS = 64, 4


def output_folder(doc: str, argv: list[str] | None, prefix: str) -> Path:
    """The folder named on the command line, created if needed; a new temporary folder when none is named."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("folder", nargs="?", help="output folder (default: a new temporary folder)")
    folder = parser.parse_args(argv).folder
    path = Path(folder) if folder else Path(tempfile.mkdtemp(prefix=f"lorascope-{prefix}-"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def grouped_tokens(n: int, length: int, *, groups: int = 4, shifts: tuple[int, ...] = (1,), seed: int = 0
                   ) -> torch.Tensor:
    """``n`` token sequences of a language whose tokens fall into ``groups`` fixed random groups: the next token is
    drawn uniformly from group ``(g + s) % groups``, g being the current token's group and s drawn from ``shifts``.
    What there is to learn has rank about ``groups``."""
    members = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(1234)).reshape(groups, -1)
    group = torch.empty(VOCAB, dtype=torch.long)
    group[members] = torch.arange(groups).unsqueeze(1)  # group[token]; members[k]: the tokens of group k
    g = torch.Generator().manual_seed(seed)
    shift = torch.tensor(shifts)
    ids = torch.empty(n, length, dtype=torch.long)
    ids[:, 0] = torch.randint(VOCAB, (n,), generator=g)
    for t in range(1, length):
        step = shift[torch.randint(len(shifts), (n,), generator=g)]
        pick = torch.randint(members.shape[1], (n,), generator=g)
        ids[:, t] = members[(group[ids[:, t - 1]] + step) % groups, pick]
    return ids


class TinyLM(nn.Module):
    """A language model of one's own: embedding, one residual MLP block, a norm and an output layer."""

    def __init__(self, dim: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, VOCAB)

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over the sequences ``ids``."""
        h = self.embed(ids[:, :-1])
        logits = self.out(self.norm(h + self.mlp(h)))
        return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def tiny_llama(seed: int = 0) -> Any:
    """A transformers Llama built from a tiny config (hidden 32, 2 layers, 4 heads): random weights, no download."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, vocab_size=VOCAB,
                                      max_position_embeddings=64, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config)


def print_headline(analysis: Any) -> None:
    """What ``lorascope analyze`` leads with, read from the analysis' JSON summary (schema in docs/analysis.md):
    the run, the update's ranks, what an all-linear LoRA of each candidate rank could capture, the noise scale."""
    summary = analysis.to_dict()
    for run in summary["runs"]:
        print(f"{run['path']}: {run['status']} recording of {run['steps']} steps ({run['examples_seen']} examples, "
              f"{run['snapshots']} snapshots), final loss {run['final_loss']:.3f}")
    forecast = summary["forecast"]  # what analyze leads with: where a LoRA of each rank runs out on this data
    if "missing" in forecast:
        print(f"no forecast: {forecast['missing']}")
    else:
        bound = " (an upper bound: the run saw its data once)" if forecast["bits"]["upper_bound"] else ""
        print(f"the data asked {forecast['bits']['bits_per_example']:.3g} bits per example{bound}; an all-linear LoRA "
              "runs out at about:")
        for row in forecast["rows"]:
            if row["target"] == "all-linear":
                low, high = row["runway_range"]
                print(f"  rank {row['rank']:>2}: {row['runway_examples']:,.0f} examples ({low:,.0f}..{high:,.0f}), "
                      f"{row['verdict']} at {forecast['dataset_examples']:,.0f}")
    rows = summary["headline"]  # one row per candidate rank
    if rows:
        print(f"the update's signal rank: {rows[0]['signal_rank']:.0f}; "
              f"k_0.9 (the rank holding 90% of its energy): {rows[0]['energy_rank_0.9']:.1f}")
        print("share of the whole update's energy an all-linear LoRA (attention and MLP matrices) captures at best:")
        for row in rows:
            print(f"  rank {row['rank']:>2}: {row['captured_energy_share']:.1%}")
    for noise in summary["noise_scale"]:
        total = noise["groups"]["all"]
        low, high = total["interval"]
        print(f"gradient noise scale B_simple: {total['b_simple']:.0f} examples ({low:.0f}..{high:.0f}); "
              f"batch size {noise['batch_big']:.0f}")
    for note in summary["notes"]:
        print(f"note: {note}")
    paths = " ".join(run["path"] for run in summary["runs"])
    print(f"the full report: lorascope analyze {paths} -o report")
