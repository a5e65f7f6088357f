"""Report rendering: PNG figures and the self-contained HTML page, built from real recordings.

Recordings are made the way users make them (a tiny Llama and a tiny Mixtral trained in a plain loop under
``lorascope.record``), plus files written with :class:`~lorascope.store.writer.RunWriter` for the cases a recorder
never produces on purpose: a run with steps but no snapshots, and a killed run with one snapshot and a non-finite
update. A headless Chromium, when available, checks that every embedded image really decodes in a browser.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

import lorascope
from lorascope.report.curves import crossings_sentence
from lorascope.report.folder import write_report
from lorascope.report.format import approx_count, count, number, percent
from lorascope.report.html import headline_sentence, render_html
from lorascope.report.plots import PLOT_NAMES, make_plots
from lorascope.report.terminal import format_summary
from lorascope.store.payloads import Snapshot
from lorascope.store.writer import RunWriter
from lorascope.workflows.analyze import Analysis, analyze

PIL_Image = pytest.importorskip("PIL.Image")

SPECTRAL = {"energy_rank", "residual", "spectra", "energy_share", "loss"}
RANKS = (4, 8, 16)
FIGURE_WIDTH_PX = 1000


# -- recordings ------------------------------------------------------------------------------------------------


def _train(model: torch.nn.Module, path: Path, steps: int, vocab: int = 64) -> Path:
    """Train on a few fixed sequences (learnable, so the loss falls) under ``lorascope.record``."""
    data = torch.randint(0, vocab, (8, 16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    with lorascope.record(model, path, optimizer=optimizer, total_steps=steps):
        for step in range(steps):
            ids = data[(step % 2) * 4:(step % 2) * 4 + 4]
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return path


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread: tiny models gain nothing from more (see tests/conftest.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _llama(seed: int):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=48, vocab_size=64,
                                      max_position_embeddings=64, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def llama_runs(tmp_path_factory: pytest.TempPathFactory, single_thread) -> tuple[Path, Path]:
    """Two recordings of the same tiny Llama: 24 steps (many snapshots) and 8 steps (a smaller dataset)."""
    folder = tmp_path_factory.mktemp("llama")
    return _train(_llama(0), folder / "long.h5", 24), _train(_llama(0), folder / "short.h5", 8)


@pytest.fixture(scope="module")
def mixtral_run(tmp_path_factory: pytest.TempPathFactory, single_thread) -> Path:
    """A tiny Mixtral (fused MoE experts, 4 per layer) recorded over 16 steps."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.MixtralConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=24, vocab_size=64,
                                        max_position_embeddings=64, tie_word_embeddings=False,
                                        num_local_experts=4, num_experts_per_tok=2)
    return _train(transformers.MixtralForCausalLM(config), tmp_path_factory.mktemp("mixtral") / "moe.h5", 16)


def _modules() -> list[dict]:
    return [dict(name=f"layers.{layer}.{role}", module=f"layers.{layer}.{role}", parameter="weight", kind=kind,
                 role=role, layer=layer, expert=-1, out_features=24, in_features=16)
            for layer in range(2) for kind, role in (("attention", "q"), ("attention", "o"), ("mlp", "up"))]


@pytest.fixture(scope="module")
def steps_only_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Steps, no snapshot (a recorder always snapshots at the end, so written directly). The file name holds
    HTML metacharacters, which the page must escape."""
    path = tmp_path_factory.mktemp("steps") / "a<b>&'q\".h5"
    steps = np.arange(1, 41)
    with RunWriter(path, _modules()) as writer:
        writer.append_steps({"step": steps, "examples_seen": 4 * steps, "tokens_seen": 64 * steps,
                             "loss": 3.0 + 1.0 / np.sqrt(steps), "batch_examples": np.full(40, 4)})
    return path


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run killed after one snapshot (status left "recording"), with a NaN loss and one non-finite update."""
    path = tmp_path_factory.mktemp("killed") / "killed.h5"
    rng = np.random.default_rng(0)
    modules = _modules()
    writer = RunWriter(path, modules).open()
    steps = np.arange(1, 11)
    loss = 3.0 + 1.0 / steps
    loss[3] = np.nan
    writer.append_steps({"step": steps, "examples_seen": 4 * steps, "tokens_seen": 64 * steps, "loss": loss})
    sv = [np.sort(rng.random(16))[::-1].astype(np.float32) for _ in modules]
    energy = [float(np.sum(s.astype(np.float64) ** 2)) for s in sv]
    sv[2], energy[2] = None, float("nan")
    writer.append_snapshot(Snapshot(step=10, examples_seen=40, tokens_seen=640, energy=energy, sv=sv,
                                    delta_nonfinite=[0, 0, 7, 0, 0, 0]))
    writer.abandon()
    return path


# -- rendered reports ------------------------------------------------------------------------------------------


@dataclass
class Report:
    analysis: Analysis
    images: dict[str, Path]
    html: str
    expected: set[str]
    titles: dict[str, list[str]]  # figure name -> its suptitle, or else its axes' titles


SCENARIOS = ("llama", "two_runs_tokens", "mixtral", "steps_only", "killed")


def _plots_with_titles(analysis: Analysis, folder: Path) -> tuple[dict[str, Path], dict[str, list[str]]]:
    """make_plots, noting each figure's titles as it is saved (the real savefig still writes the file)."""
    from matplotlib.figure import Figure

    titles: dict[str, list[str]] = {}
    save = Figure.savefig

    def savefig(fig: Figure, path: Path, *args, **kwargs) -> None:
        suptitle = fig.get_suptitle()
        titles[Path(path).stem] = [suptitle] if suptitle else [ax.get_title() for ax in fig.axes if ax.get_title()]
        save(fig, path, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Figure, "savefig", savefig)
        images = make_plots(analysis, folder)
    return images, titles


@pytest.fixture(scope="module")
def reports(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """``reports(name)``: analysis, figures and page of one scenario (built once per module)."""
    built: dict[str, Report] = {}

    def build(name: str) -> Report:
        if name in built:
            return built[name]
        if name == "llama":
            analysis, expected = analyze(request.getfixturevalue("llama_runs")[0], ranks=RANKS), SPECTRAL
        elif name == "two_runs_tokens":  # one curve point per run: too few for a fit, drawn as points only
            long, short = request.getfixturevalue("llama_runs")
            analysis, expected = analyze([short, long], ranks=RANKS, x="tokens_seen"), SPECTRAL
        elif name == "mixtral":
            analysis = analyze(request.getfixturevalue("mixtral_run"), ranks=RANKS)
            expected = SPECTRAL | {"experts"}
        elif name == "steps_only":
            analysis, expected = analyze(request.getfixturevalue("steps_only_run"), ranks=RANKS), {"loss"}
        else:
            analysis, expected = analyze(request.getfixturevalue("killed_run"), ranks=RANKS), SPECTRAL
        images, titles = _plots_with_titles(analysis, tmp_path_factory.mktemp(f"report_{name}"))
        built[name] = Report(analysis, images, render_html(analysis.summary, images), set(expected), titles)
        return built[name]

    return build


@pytest.fixture(params=SCENARIOS)
def report(request: pytest.FixtureRequest, reports) -> Report:
    """Each scenario's report in turn."""
    return reports(request.param)


class _Page(HTMLParser):
    """Collects what the tests look at: tags, image sources, attributes that load things, and visible text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.images: list[str] = []
        self.loads: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        for key, value in attrs:
            if key in ("src", "href", "srcset", "poster", "data", "action") and value is not None:
                self.loads.append(value)
        if tag == "img":
            self.images.append(dict(attrs).get("src") or "")

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _parse(page: str) -> _Page:
    parser = _Page()
    parser.feed(page)
    parser.close()
    return parser


def _text(page: _Page) -> str:
    """Visible text, one space between text nodes (so table cells read "attention 8 21.8%")."""
    return re.sub(r"\s+", " ", " ".join(page.text))


def test_make_plots_writes_the_expected_valid_pngs(report: Report) -> None:
    assert set(report.images) == report.expected
    assert list(report.images) == [n for n in PLOT_NAMES if n in report.expected]  # report order
    for name, path in report.images.items():
        assert path.name == f"{name}.png" and path.stat().st_size > 0
        with PIL_Image.open(path) as image:
            image.verify()  # checks the PNG structure and CRCs
        with PIL_Image.open(path) as image:
            assert image.format == "PNG"
            assert image.width == FIGURE_WIDTH_PX and 250 <= image.height <= 4000, (name, image.size)
            pixels = np.asarray(image.convert("L"))
            assert pixels.std() > 5, f"{name}.png looks blank"


def test_html_has_a_banner_exactly_when_a_run_is_incomplete(report: Report) -> None:
    text = _text(_parse(report.html))
    assert ('class="banner"' in report.html) == report.analysis.incomplete
    assert ("Incomplete run" in text) == report.analysis.incomplete
    assert ("(incomplete)" in text) == report.analysis.incomplete  # the runs table marks the run too


def test_figure_titles_say_incomplete_exactly_when_a_run_is(report: Report) -> None:
    assert set(report.titles) == set(report.images)
    for name, titles in report.titles.items():
        assert titles, f"{name}.png has no title"
        assert titles[0].endswith("(incomplete)") == report.analysis.incomplete, (name, titles)


def test_make_plots_leaves_matplotlib_global_state_alone(reports, tmp_path: Path) -> None:
    import matplotlib as mpl
    import matplotlib.pyplot as plt

    analysis = reports("killed").analysis
    figures, rc = plt.get_fignums(), dict(mpl.rcParams)
    make_plots(analysis, tmp_path / "nested" / "folder")  # missing folders are created
    assert plt.get_fignums() == figures, "make_plots left pyplot figures open"
    assert dict(mpl.rcParams) == rc, "make_plots changed rcParams"
    assert {p.name for p in (tmp_path / "nested" / "folder").iterdir()} == {f"{n}.png" for n in SPECTRAL}


def test_html_is_self_contained_and_embeds_every_image(report: Report) -> None:
    assert report.html.startswith("<!DOCTYPE html>")
    page = _parse(report.html)
    assert page.tags[:1] == ["html"] and "body" in page.tags
    assert not {"script", "link", "iframe", "object", "embed"} & set(page.tags)
    without_data = re.sub(r"data:[a-z/+]+;base64,[A-Za-z0-9+/=]*", "data:", report.html)  # base64 holds "//"
    assert not re.search(r"https?:|ftp:|//[a-z0-9]|url\(|@import", without_data, flags=re.IGNORECASE)
    assert all(src.startswith("data:") for src in page.loads)
    assert len(page.images) == len(report.images)
    for src, path in zip(page.images, report.images.values()):
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)
        assert base64.b64decode(src[len(prefix):], validate=True) == path.read_bytes()


def test_html_states_the_summary_numbers(report: Report) -> None:
    summary = report.analysis.summary
    text = _text(_parse(report.html))
    unit = {"examples_seen": "examples", "tokens_seen": "tokens"}[summary["x"]]
    for run in summary["runs"]:
        assert run["path"] in text
    for note in summary["notes"]:
        assert note in text
    if not summary["headline"]:
        assert summary["final"] is None and "No snapshots" in text
        return
    for row in summary["headline"]:
        assert headline_sentence(row) in text
        assert f"rank-{row['rank']} LoRA" in text and f"{100 * row['captured_energy_share']:.1f}%" in text
        if row["signal_rank"] is not None:
            assert f"signal rank is {row['signal_rank']:.1f}" in text
    final = summary["final"]
    for kind, group in final["by_kind"].items():
        assert f"{kind} {group['modules']} {100 * group['energy_share']:.1f}%" in text
    for target, row in final["lora_capture"].items():
        cells = " ".join(f"{100 * row[str(r)]:.1f}%" for r in summary["ranks"])
        assert f"{target} {cells}" in text
    for module in final["rank_hungry_modules"]:
        assert module["module"] in text
    for module in final["excluded_nonfinite_modules"]:
        assert module in text
    for group, curve in summary["curves"].items():
        assert curve["fit"]["reason"] in text
        if curve["crossings"]:
            assert crossings_sentence(group, curve, unit) in text


def test_terminal_and_page_write_the_same_numbers(report: Report) -> None:
    summary = report.analysis.summary
    terminal, page = format_summary(summary), _text(_parse(report.html))
    values = [v for run in summary["runs"]
              for v in (count(run["examples_seen"]), count(run["tokens_seen"]), number(run["final_loss"], 4))]
    values += [v for row in summary["headline"]
               for v in (percent(row["captured_energy_share"]), number(row["signal_rank"]))]
    values += [approx_count(c["x"]) for curve in summary["curves"].values() for c in curve["crossings"]
               if c["status"] == "predicted"]
    values += [v for noise in summary["noise_scale"] for group in noise["groups"].values()
               for v in (number(group["b_simple"]), *(number(b) for b in group["interval"]))]
    for value in values:
        assert value in terminal and value in page, value


def test_one_report_computes_the_summary_once(killed_run: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    analysis = analyze(killed_run, ranks=RANKS)
    calls = []
    to_dict = Analysis.to_dict
    monkeypatch.setattr(Analysis, "to_dict", lambda self: calls.append(self) or to_dict(self))
    files = write_report(analysis, tmp_path / "report")
    text = format_summary(analysis.summary)
    assert len(calls) == 1
    assert "At step 10 (40 examples)" in text and files.html.read_text(encoding="utf-8") == render_html(
        analysis.summary, files.images)


def test_html_escapes_strings_from_the_run(steps_only_run: Path) -> None:
    page = render_html(analyze(steps_only_run, ranks=RANKS).summary, {})
    assert "a<b>" not in page and "a&lt;b&gt;&amp;&#x27;q&quot;.h5" in page
    assert steps_only_run.name in _text(_parse(page))


def test_crossing_and_headline_sentences() -> None:
    ok = {"fit": {"status": "ok", "reason": "5 points", "exponent": 0.5}, "points": [[10.0, 3.0], [40.0, 9.0]]}
    predicted = {"level": 16, "status": "predicted", "x": 12345.0, "x_low": 8000.0, "x_high": 20049.0}
    assert crossings_sentence("mlp", {**ok, "crossings": [predicted]}) == \
        "k_0.9 of mlp: crosses rank 16 at ~12,300 examples (8,000..20,000)."
    later = {"level": 8, "status": "observed", "x": 40.0, "x_low": 40.0, "x_high": 40.0}
    start = [{"level": r, "status": "observed", "x": 10.0, "x_low": 10.0, "x_high": 10.0} for r in (1, 2)]
    assert crossings_sentence("mlp", {**ok, "crossings": [*start, later]}, "tokens") == (
        "k_0.9 of mlp: already above rank 1, 2 at the first snapshot (10 tokens); reaches rank 8 at 40 tokens "
        "(observed).")
    flat = {"fit": {"status": "flat", "reason": "no significant growth", "exponent": 0.01}, "points": [],
            "crossings": [{"level": r, "status": "never", "x": None, "x_low": None, "x_high": None} for r in (32, 64)]}
    assert crossings_sentence("all", flat) == "k_0.9 of all: not predicted to reach rank 32, 64: no significant growth."
    shrinking = {**flat, "fit": {"status": "ok", "reason": "", "exponent": -0.02}}
    assert "no growth with data (exponent -0.020)" in crossings_sentence("attention", shrinking)
    assert headline_sentence({"rank": 8, "captured_energy_share": 0.5, "signal_rank": None}) == \
        "A rank-8 LoRA on all linear layers captures 50.0% of this update's energy; its signal rank is n/a."


# -- a real browser ----------------------------------------------------------------------------------------------

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL_ENV = "LORASCOPE_INSTALL_CHROMIUM"
INSTALL_COMMANDS = (["apt-get", "update", "-q"],
                    ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"])
INSTALL_TIMEOUT_S = 600
# Counts, once the page (and so every image) has loaded, the images a browser actually decoded.
PROBE = ("<script>window.addEventListener('load', function () {var all = Array.from(document.images);"
         "document.body.setAttribute('data-images-total', all.length);"
         "document.body.setAttribute('data-images-loaded', all.filter(function (i) "
         "{return i.complete && i.naturalWidth > 0;}).length);});</script>")


def _find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


@pytest.fixture(scope="session")
def chromium() -> str:
    """Path of a Chromium binary. Installed with apt only on explicit request (``LORASCOPE_INSTALL_CHROMIUM=1``,
    running as root): a test suite should not change the system behind a developer's back."""
    found = _find_chromium()
    if found:
        return found
    if os.environ.get(INSTALL_ENV) != "1":
        pytest.skip(f"chromium not found; install it (Debian/Ubuntu: apt-get install -y --no-install-recommends "
                    f"chromium) or set {INSTALL_ENV}=1 to let the tests install it (needs root)")
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip(f"chromium not found and {INSTALL_ENV}=1 needs root to run apt-get")
    if shutil.which("apt-get") is None:
        pytest.skip(f"chromium not found and {INSTALL_ENV}=1 needs apt-get, which this system lacks")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in INSTALL_COMMANDS:
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{' '.join(command)} did not finish within {INSTALL_TIMEOUT_S} s")
        if done.returncode != 0:
            pytest.fail(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    found = _find_chromium()
    if not found:
        pytest.fail("apt-get installed chromium but no chromium binary is on PATH")
    return found


def _images_loaded(chromium: str, page: str, folder: Path) -> tuple[int, int]:
    """(decoded, total) images of ``page`` in headless Chromium, with the network unreachable."""
    probe = folder / "probe.html"
    probe.write_text(page.replace("</body>", PROBE + "</body>", 1), encoding="utf-8")
    command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={folder / 'profile'}",
               "--dump-dom", probe.as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    body = re.search(r"<body[^>]*>", done.stdout)
    assert done.returncode == 0 and body, f"chromium failed ({done.returncode}): {done.stderr[-1000:]}"
    loaded = re.search(r'data-images-loaded="(\d+)"', body.group(0))
    total = re.search(r'data-images-total="(\d+)"', body.group(0))
    assert loaded and total, f"the load probe did not run: {body.group(0)}"
    return int(loaded.group(1)), int(total.group(1))


@pytest.fixture(scope="module")
def mixtral_report(reports) -> tuple[str, dict[str, Path]]:
    """The richest page: every figure, experts included."""
    built = reports("mixtral")
    return built.html, built.images


def test_every_image_loads_in_headless_chromium(chromium: str, mixtral_report: tuple[str, dict[str, Path]],
                                                tmp_path: Path) -> None:
    page, images = mixtral_report
    assert _images_loaded(chromium, page, tmp_path) == (len(images), len(images))


def test_headless_check_detects_a_broken_image(chromium: str, mixtral_report: tuple[str, dict[str, Path]],
                                               tmp_path: Path) -> None:
    page, images = mixtral_report
    # Keep the PNG signature and the first chunk header but cut the rest: a truncated, undecodable image.
    broken = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAA",
                    page, count=1)
    assert broken != page
    assert _images_loaded(chromium, broken, tmp_path) == (len(images) - 1, len(images))
