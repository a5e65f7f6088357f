"""The example scripts of examples/ run end to end (in-process, each its main() on a temporary output folder): each
writes run files lorascope reads back complete, and prints a result that makes sense."""

from __future__ import annotations

import runpy
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

import lorascope

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
pytestmark = [
    pytest.mark.usefixtures("torch_single_thread"),
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning"),  # raised inside peft
    pytest.mark.filterwarnings("ignore:.*LeafSpec"),  # lightning 2.6 on a newer torch
    pytest.mark.filterwarnings("ignore:.*does not have many workers"),  # lightning: the tiny DataLoader
]


@pytest.fixture
def run_example(monkeypatch, capsys):
    """Run ``examples/<name>.py``'s ``main(argv)``; returns what it returned and what it printed."""
    monkeypatch.syspath_prepend(str(EXAMPLES))  # as `python examples/<name>.py` does: its folder first on the path

    def run(name: str, argv: list[str]):
        main = runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name=f"example_{name}")["main"]
        result = main(argv)
        return result, capsys.readouterr().out

    yield run
    sys.modules.pop("_common", None)


def check_run(path: Path, framework: str, steps: int, output: str) -> None:
    assert path.is_file()
    assert f"{path}: complete recording of {steps} steps" in output
    with lorascope.open_run(path) as run:
        assert run.complete and run.attrs["framework"] == framework
        np.testing.assert_array_equal(run.step_index, np.arange(1, steps + 1))
        assert run.snapshot_index.size >= 2 and run.snapshot_index[-1] == steps
        assert np.isfinite(run.steps["loss"]).all()


def check_headline(analysis: lorascope.Analysis, output: str, *, noise_scale: bool) -> None:
    headline = analysis.to_dict()["headline"]
    assert [row["rank"] for row in headline] == [1, 4, 16]
    shares = [row["captured_energy_share"] for row in headline]
    assert 0 < shares[0] < shares[1] < shares[2] <= 1  # a larger rank captures more of the same update
    assert 1 <= headline[0]["energy_rank_0.9"] <= 64
    for row in headline:
        assert f"rank {row['rank']:>2}: {row['captured_energy_share']:.1%}" in output
    assert ("gradient noise scale B_simple:" in output) == noise_scale
    assert ("no gradient noise scale" in output) != noise_scale


def test_plain_loop(run_example, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # no folder given: a new temporary folder
    analysis, output = run_example("plain_loop", [])
    (folder,) = tmp_path.glob("lorascope-plain-*")
    check_run(folder / "run.h5", "plain", 60, output)
    check_headline(analysis, output, noise_scale=False)


def test_hf_trainer(run_example, tmp_path):
    pytest.importorskip("transformers")
    analysis, output = run_example("hf_trainer", [str(tmp_path)])
    check_run(tmp_path / "run.h5", "transformers", 40, output)
    check_headline(analysis, output, noise_scale=True)  # two micro-batches per step: the noise scale is measured


def test_lightning_trainer(run_example, tmp_path):
    pytest.importorskip("lightning")
    analysis, output = run_example("lightning_trainer", [str(tmp_path / "out")])
    check_run(tmp_path / "out" / "run.h5", "lightning", 40, output)
    check_headline(analysis, output, noise_scale=True)


def test_peft_compare(run_example, tmp_path):
    pytest.importorskip("peft")
    comparison, output = run_example("peft_compare", [str(tmp_path)])
    for name in ("full", "lora_r1", "lora_r4"):
        check_run(tmp_path / f"{name}.h5", "plain", 150, output)
    with lorascope.open_run(tmp_path / "lora_r4.h5") as run:
        assert run.modules["lora"].all() and run.config["lora"]["default"]["r"] == 4
    assert [(lora.rank, lora.rank_source) for lora in comparison.loras] == [(1, "config"), (4, "config")]
    for lora in comparison.loras:
        assert lora.status in ("falloff", "tentative", "none")
        where = "-" if lora.status == "none" else f"{int(lora.run.examples_seen[lora.falloff_index]):,}"
        assert f"{lora.rank:>4}  {lora.status:<9}  {where:>16}" in output
    # What the example shows: rank 1 leaves the full fine-tuning curve, and rank 4 holds on to it for longer.
    r1, r4 = comparison.loras
    assert r1.status == "falloff" and r1.falloff_x < 150 * 8
    assert r4.status == "none" or r4.falloff_x > r1.falloff_x
