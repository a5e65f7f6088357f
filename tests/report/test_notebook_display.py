"""Jupyter display: the HTML ``_repr_html_`` of Run, Analysis, Comparison and Recommendation (real values, real
files), every string escaped, and the report's figures as matplotlib figures through ``.plot``."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import write_loss_run
from matplotlib.figure import Figure

import lorascope
from lorascope.errors import InvalidOptionError, LorascopeError
from lorascope.report.plots import PLOT_NAMES, draw_figure

TINY_RUN = Path(__file__).resolve().parents[2] / "fixtures" / "tiny_run.h5"


@pytest.fixture(scope="module")
def analysis():
    return lorascope.analyze(TINY_RUN, ranks=(1, 4))


def test_run_shows_its_summary_and_escapes_its_path(tmp_path):
    path = tmp_path / "<b>odd&.h5"
    shutil.copy(TINY_RUN, path)
    with lorascope.open_run(path) as run:
        html = run._repr_html_()
        assert "&lt;b&gt;odd&amp;.h5" in html and "<b>" not in html
        assert f"{len(run.modules)} matrices" in html and f"{run.n_snapshots} at steps 1, 2, 4" in html
    assert run._repr_html_() is None  # closed: Jupyter falls back to repr


def test_analysis_shows_the_report_sections_without_page_markup(analysis):
    html = analysis._repr_html_()
    assert html.startswith('<div class="lorascope"') and html.endswith("</div>")
    assert "lorascope analysis: tiny_run.h5" in html and "Headline" in html and "<table>" in html
    assert "<style" not in html and "<script" not in html and "<html" not in html
    for row in analysis.summary["headline"]:
        assert f"A rank-{row['rank']} LoRA" in html


def test_every_report_figure_is_a_figure_to_restyle(analysis):
    for name in PLOT_NAMES:
        draw = getattr(analysis.plot, name)
        if draw_figure(analysis, name) is None:  # tiny_run has no MoE experts
            with pytest.raises(LorascopeError, match=f"no {name} figure"):
                draw()
            continue
        fig = draw()
        assert isinstance(fig, Figure) and fig.axes
        assert draw() is not fig  # drawn afresh: restyling one leaves the next untouched
    fig = analysis.plot.loss()
    fig.axes[0].set_title("mine")
    assert analysis.plot.loss().axes[0].get_title() != "mine"


def test_unknown_figure_name_is_refused(analysis):
    with pytest.raises(InvalidOptionError, match="The 'name' parameter of draw_figure must be one of"):
        draw_figure(analysis, "nope")


def test_comparison_shows_each_falloff_and_draws_its_figure(tmp_path):
    steps = np.arange(1, 301)
    full = 3.0 - 0.35 * np.log(steps)
    lora = full + np.where(steps >= 100, 0.3, 0.0)
    comparison = lorascope.compare(write_loss_run(tmp_path / "full.h5", full, None),
                                   [write_loss_run(tmp_path / "r1.h5", lora, 1)])
    html = comparison._repr_html_()
    assert "lorascope comparison" in html and "LoRA r=1" in html and "falloff at" in html
    assert "<details>" in html and "Falloff: the gap" in html  # the terminal text, escaped, beneath
    fig = comparison.plot.loss()
    assert isinstance(fig, Figure) and len(fig.axes) == 2


def test_recommendation_shows_the_rank_and_the_full_text():
    pytest.importorskip("transformers")
    config = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64}
    result = lorascope.recommend(config, examples=2000, tokens_per_example=32)
    html = result._repr_html_()
    assert f"<td style=\"text-align:left\">{result.rank} (" in html and "recommended rank" in html
    assert "bits to learn" in html and "<details>" in html
