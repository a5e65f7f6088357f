"""analyze reads the held-batch losses of a real recording: a tiny Llama whose MLP carries all the learning
(attention recorded with learning rate 0) gets an MLP share of 1 and an attention share of 0, the MLP runs out
first, and the report shows the section; a recording without contributions says in one line why there are none."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lorascope  # noqa: E402
from lorascope.report.html import render_html  # noqa: E402
from lorascope.report.terminal import format_summary  # noqa: E402
from lorascope.workflows.contributions import MISSING  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_single_thread")

VOCAB, LENGTH, BATCH, STEPS, DATASET = 64, 12, 4, 16, 32


def _record(path, config, seed, *, contributions):
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    for name, p in model.named_parameters():
        p.requires_grad_(".mlp." in name or ".self_attn." in name)
    attention = [p for n, p in model.named_parameters() if ".self_attn." in n]
    mlp = [p for n, p in model.named_parameters() if ".mlp." in n]
    optimizer = torch.optim.Adam([{"params": mlp, "lr": 1e-2}, {"params": attention, "lr": 0.0}])
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (DATASET, 1), generator=g)
    ids = (start + torch.arange(LENGTH)) % VOCAB  # next token = this one + 1
    held = {"input_ids": ids[:BATCH], "labels": ids[:BATCH]}
    extra = {"contributions": "layers", "held_batch": held} if contributions else {}
    with lorascope.record(model, path, optimizer=optimizer, total_steps=STEPS, snapshots=[4, STEPS],
                          extra_config={"dataset": {"examples": DATASET}}, **extra):
        for step in range(STEPS):
            rows = ids[(step * BATCH) % DATASET:][:BATCH]
            model(input_ids=rows, labels=rows).loss.backward()
            optimizer.step()
            optimizer.zero_grad()


def test_planted_mlp_share_and_first_out(seed, tmp_path, tiny_llama_config):
    path = tmp_path / "run.h5"
    _record(path, tiny_llama_config(), seed, contributions=True)
    analysis = lorascope.analyze(path, ranks=(1, 4))
    c = analysis.contributions
    assert c is not None and analysis.contributions_missing is None
    assert c.step == STEPS and c.reduction > 0.05
    shares = {k.name: k.share for k in c.kinds}
    assert set(shares) == {"attention", "mlp"}
    assert shares["attention"] == 0.0  # its weights never moved: the loss without it is bit-identical
    assert shares["mlp"] == pytest.approx(1.0, abs=1e-5)
    assert abs(c.interaction) < 1e-5
    assert [p.name for p in c.layers] == ["0", "1"]
    assert all(0 < p.share < 1 for p in c.layers)
    summary = analysis.summary
    json.dumps(summary)  # plain JSON
    assert summary["contributions"]["kinds"][1]["name"] == "mlp"
    if analysis.forecast is not None:
        assert c.bits_to_learn == pytest.approx(summary["forecast"]["bits_to_learn"])
        assert set(c.first_to_run_out.values()) == {"mlp"}
        mlp = next(k for k in c.kinds if k.name == "mlp")
        assert mlp.bits == pytest.approx(c.bits_to_learn, rel=1e-5)
    text = format_summary(summary)
    assert "Contributions" in text and "mlp" in text
    assert text.index("Contributions") > text.index("Forecast")
    page = render_html(summary)
    assert page.index('id="contributions"') > page.index('id="forecast"')
    assert "<td class=l>mlp</td><td>100.0%</td>" in page


def test_recording_without_contributions_says_why(tmp_path, tiny_llama_config):
    path = tmp_path / "run.h5"
    _record(path, tiny_llama_config(), 0, contributions=False)
    analysis = lorascope.analyze(path)
    assert analysis.contributions is None
    assert MISSING in analysis.summary["contributions"]["missing"]
    assert f"No contributions: {analysis.contributions_missing}" in format_summary(analysis.summary)
