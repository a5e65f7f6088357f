"""``lorascope analyze`` leads with the forecast: on a task of known information the bits are the truth's within
1.5x (the demo, as the issue asks), several recordings give one forecast, and a recording that cannot give one
still gets every other part of the report with one line saying why."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import lorascope
from lorascope.demo import REPRODUCED_BITS_PER_PARAMETER, DemoConfig, run_demo
from lorascope.inputs.synthetic import FactsTask
from lorascope.report.folder import write_report
from lorascope.report.terminal import format_summary

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo as ``lorascope demo`` runs it (its default sizes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield run_demo(tmp_path_factory.mktemp("demo"), log=lambda _: None)
    finally:
        torch.set_num_threads(threads)


def test_the_demos_forecast_holds_the_truth_within_the_issues_tolerances(demo):
    _, analysis, _ = demo
    forecast = analysis.forecast
    truth = FactsTask(facts=DemoConfig.facts, vocab_size=DemoConfig.vocab, values=DemoConfig.vocab // 2).bits_per_fact
    assert forecast.truth_bits_per_example == truth
    assert 1 / 1.5 <= forecast.bits.bits_per_example / truth <= 1.5
    low, high = REPRODUCED_BITS_PER_PARAMETER
    rows = [r.prediction for r in forecast.rows if r.target == "all-linear"]
    assert [r.rank for r in rows] == [4, 8, 16]
    for row in rows:
        measured = math.sqrt(low * high) * row.lora_parameters / truth  # the middle of the measured range
        assert 0.5 <= row.runway_examples / measured <= 2.0, row


def test_terminal_json_and_page_lead_with_the_forecast(demo):
    _, analysis, files = demo
    summary = analysis.summary
    assert list(summary)[:4] == ["format", "version", "incomplete", "forecast"]
    text = format_summary(summary)
    assert text.index("Forecast:") < text.index("At step")
    assert "Truth, known for this task: 7.00 bits per example" in text
    page = files.html.read_text(encoding="utf-8")
    assert page.index('id="forecast"') < page.index("<h2>Headline</h2>")
    for row in summary["forecast"]["rows"]:
        assert f"{row['lora_parameters']:,}" in text and f"{row['lora_parameters']:,}" in page


def _facts_run(path: Path, facts: int, *, steps: int, batch: int = 16, dataset: bool = True, seed: int = 0) -> Path:
    """Full fine-tuning of a tiny Llama on random facts (several epochs), recorded."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
        vocab_size=64, max_position_embeddings=16, tie_word_embeddings=False))
    task = FactsTask(facts=facts, vocab_size=64, values=16, key_tokens=3, seed=seed)
    ids, labels = task.tensors()
    extra = {"dataset": {"examples": facts, "bits_per_example": task.bits_per_fact}} if dataset else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    order = torch.Generator().manual_seed(seed)
    with lorascope.record(model, path, optimizer=optimizer, total_steps=steps, extra_config=extra):
        for _ in range(steps):
            batch_ids = torch.randint(0, facts, (batch,), generator=order)
            model(input_ids=ids[batch_ids], labels=labels[batch_ids]).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return path


def test_several_recordings_give_one_forecast_with_a_growth_law(tmp_path):
    paths = [_facts_run(tmp_path / f"n{n}.h5", n, steps=40) for n in (64, 128)]
    analysis = lorascope.analyze(paths, ranks=(2, 4))
    forecast = analysis.forecast
    assert forecast is not None and forecast.dataset_examples == 128
    growth = analysis.summary["forecast"]["growth"]
    assert len(growth["points"]) == 2 and growth["source"].startswith("fitted on 2 probes")
    assert forecast.bits.exponent > 0


@pytest.mark.parametrize("case, reason", [
    ("no dataset size", "does not record its dataset size"),
    ("too short", "step(s) in the second half of its first epoch"),
])
def test_a_recording_without_a_forecast_still_gets_its_report_and_one_line_why(tmp_path, case, reason):
    if case == "no dataset size":
        path = _facts_run(tmp_path / "run.h5", 64, steps=12, dataset=False)
    else:  # the whole dataset in two batches: no second half of a first epoch to read
        path = _facts_run(tmp_path / "run.h5", 32, steps=12, batch=16)
    analysis = lorascope.analyze(path, ranks=(2,))
    assert analysis.forecast is None and reason in analysis.forecast_missing
    assert analysis.summary["forecast"] == {"missing": analysis.forecast_missing}
    assert f"No forecast: {analysis.forecast_missing}" in format_summary(analysis.summary)
    files = write_report(analysis, tmp_path / "report")
    assert files.html.is_file() and analysis.summary["final"] is not None


def test_a_lora_recording_is_not_a_probe(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
        vocab_size=64, max_position_embeddings=16, tie_word_embeddings=False))
    model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules="all-linear"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 64, (8, 8))
    path = tmp_path / "lora.h5"
    with lorascope.record(model, path, optimizer=optimizer, total_steps=8,
                          extra_config={"dataset": {"examples": 16}}):
        for step in range(8):
            model(input_ids=ids[step % 2 * 4:][:4], labels=ids[step % 2 * 4:][:4]).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    analysis = lorascope.analyze(path, ranks=(2,))
    assert analysis.forecast is None and "LoRA recording" in analysis.forecast_missing


def test_a_plain_models_linear_layers_are_captured_by_all_linear(tmp_path, tiny_token_model):
    model = tiny_token_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.Generator().manual_seed(0)
    path = tmp_path / "plain.h5"
    with lorascope.record(model, path, optimizer=optimizer, total_steps=6):
        for _ in range(6):
            model.loss(torch.randint(0, model.vocab, (4, 10), generator=data)).backward()
            optimizer.step()
            optimizer.zero_grad()
    summary = lorascope.analyze(path, ranks=(2,)).summary
    capture = summary["final"]["lora_capture"]
    # mlp.0, mlp.2 (mlp) and out (other, a plain Linear) are adapted by PEFT's all-linear; only the embedding is not
    assert capture["all-linear"]["2"] > capture["mlp-only"]["2"] > 0


_VISIBILITY_PROBE = """<script>
const h = document.getElementById("forecast");
const table = h && h.nextElementSibling && h.nextElementSibling.nextElementSibling;
const box = h ? h.getBoundingClientRect() : null;
document.body.setAttribute("data-forecast-visible", String(!!box && box.height > 0 &&
  getComputedStyle(h).display !== "none" && getComputedStyle(h).visibility !== "hidden"));
document.body.setAttribute("data-forecast-rows", String(table ? table.querySelectorAll("tbody tr").length : 0));
</script>"""


def test_the_forecast_section_is_visible_in_headless_chromium(demo, tmp_path):
    import re
    import shutil
    import subprocess

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium not found (.ci/run installs Debian's chromium)")
    _, analysis, files = demo
    page = tmp_path / "page.html"
    page.write_text(files.html.read_text(encoding="utf-8").replace("</body>", _VISIBILITY_PROBE + "</body>", 1),
                    encoding="utf-8")
    done = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--disable-quic", "--no-first-run", "--disable-background-networking",
                           "--disable-component-update", "--disable-sync", "--host-resolver-rules=MAP * ~NOTFOUND",
                           f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", page.as_uri()],
                          capture_output=True, text=True, timeout=120)
    body = re.search(r"<body[^>]*>", done.stdout)
    assert done.returncode == 0 and body, done.stderr[-1000:]
    assert 'data-forecast-visible="true"' in body.group(0)
    assert f'data-forecast-rows="{len(analysis.forecast.rows)}"' in body.group(0)
