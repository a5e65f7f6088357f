"""``lorascope analyze`` on what training produces when it goes wrong (issue 15): runs recorded in a plain loop
that diverge each way (a NaN loss, an Inf gradient the optimizer applies, a NaN weight), one with lr = 0, one
with a module frozen from the start and one with a trainable module that never gets a gradient. Every one exits 0
and writes a strict-JSON summary, a NetCDF file, the plots and the page; a diverged run says where it diverged."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from click.testing import CliRunner

import lorascope
from lorascope.analysis.divergence import find_divergence
from lorascope_cli.main import cli

pytestmark = pytest.mark.usefixtures("torch_single_thread")

STEPS, BAD_STEP = 12, 6  # BAD_STEP: the 1-based optimizer step at which the run is broken


def _train(model: torch.nn.Module, path: Path, how: str) -> None:
    """Train ``model`` for STEPS steps, recorded, breaking it at BAD_STEP the way ``how`` says."""
    lr = 0.0 if how == "lr0" else 3e-3
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    data = torch.Generator().manual_seed(1)
    with lorascope.record(model, path, optimizer=opt, total_steps=STEPS,
                          extra_config={"dataset": {"examples": 8 * STEPS}}) as rec:  # for the forecast
        for step in range(1, STEPS + 1):
            ids = torch.randint(0, model.vocab, (8, 12), generator=data)
            loss = model.loss(ids)
            if how == "nan_loss" and step >= BAD_STEP:
                loss = loss * float("nan")
            loss.backward()
            if how == "inf_grad" and step == BAD_STEP:
                model.mlp[2].weight.grad[0, 0] = float("inf")  # applied by the optimizer below
            rec.log(loss=loss, examples=len(ids), tokens=ids[:, 1:].numel())
            opt.step()
            opt.zero_grad()
            if how == "nan_weight" and step == BAD_STEP:
                with torch.no_grad():
                    model.out.weight[0, 0] = float("nan")  # after step BAD_STEP: the next step is the first NaN
            if how == "frozen_midway" and step == BAD_STEP:
                model.mlp[0].weight.requires_grad_(False)  # no gradient from the next step on


CASES = ("nan_loss", "inf_grad", "nan_weight", "lr0", "frozen", "unused", "frozen_midway")


def _strict(text: str) -> dict:
    def refuse(token: str) -> None:
        raise AssertionError(f"summary.json holds the non-JSON token {token}")

    return json.loads(text, parse_constant=refuse)


class _Reports(dict):
    """Per case, built on first use (so that each test worker records only the cases its tests need): the
    CliRunner result of ``lorascope analyze`` and its report folder."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = folder

    def __missing__(self, how: str):
        from conftest import TinyTokenModel

        class WithSpare(TinyTokenModel):
            """A trainable matrix the forward pass never uses: no gradient, a zero update."""

            def __init__(self) -> None:
                super().__init__()
                self.spare = torch.nn.Linear(24, 24)

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            torch.manual_seed(0)
            model = WithSpare() if how == "unused" else TinyTokenModel()
            if how == "frozen":
                model.mlp[0].weight.requires_grad_(False)
            path = self.folder / f"{how}.h5"
            _train(model, path, how)
            report = self.folder / f"report-{how}"
            self[how] = (CliRunner().invoke(cli, ["analyze", str(path), "-o", str(report)]), report)
        finally:
            torch.set_num_threads(threads)
        return self[how]


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    return _Reports(tmp_path_factory.mktemp("diverge"))


@pytest.mark.parametrize("how", CASES)
def test_analyze_exits_0_and_writes_every_file_in_strict_form(reports, how):
    result, report = reports[how]
    assert result.exit_code == 0, (result.output, result.exception)
    summary = _strict((report / "summary.json").read_text())
    assert summary["format"] == "lorascope-summary"
    for curve in summary["curves"].values():  # a point is a number or null, and a null point says why
        missing = {p["x"] for p in curve["missing_points"]}
        assert all(y is None or math.isfinite(y) for _, y in curve["points"])
        assert {x for x, y in curve["points"] if y is None} == missing
        assert all(p["reason"] for p in curve["missing_points"])
    with xr.open_dataset(report / "metrics.nc", engine="h5netcdf") as ds:
        assert "energy_rank" in ds and ds.sizes["snapshot"] == STEPS
    for name in ("spectra", "energy_rank", "residual", "energy_share", "loss"):
        assert (report / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert "</html>" in (report / "report.html").read_text()


@pytest.mark.parametrize(("how", "step", "loss_step", "first_modules"), [
    ("nan_loss", BAD_STEP, BAD_STEP, {"embed", "mlp.0", "mlp.2", "out"}),
    ("inf_grad", BAD_STEP, BAD_STEP + 1, {"mlp.2"}),
    ("nan_weight", BAD_STEP + 1, BAD_STEP + 1, {"embed", "mlp.0", "mlp.2", "out"}),
])
def test_a_diverged_run_says_where_it_diverged(reports, how, step, loss_step, first_modules):
    result, report = reports[how]
    summary = _strict((report / "summary.json").read_text())
    run = summary["runs"][0]
    div = run["divergence"]
    assert div["step"] == step and div["first_nonfinite_loss_step"] == loss_step
    assert div["examples_seen"] == 8 * step
    first = {m["module"] for m in div["modules"] if m["first_nonfinite_update_step"] == step}
    assert first == first_modules
    # every recorded gradient norm is finite before the divergence: its per-module gradient step is where it broke
    assert {m["module"] for m in div["modules"] if m["first_nonfinite_gradient_step"] == step} == first_modules
    assert run["final_loss"] is None  # never the last finite loss, which would read as the run's result
    assert f"DIVERGED at step {step}" in result.output
    assert any(f"diverged at step {step}" in note for note in summary["notes"])
    assert "non-finite" in summary["final"]["missing"]  # the final snapshot's numbers are n/a, with the reason
    assert f"diverged at step {step}" in (report / "report.html").read_text()
    # the forecast's bits come from the losses before the divergence, and it says so
    assert any(f"diverged at step {step}" in note for note in summary["forecast"]["notes"]), summary["forecast"]
    with xr.open_dataset(report / "metrics.nc", engine="h5netcdf") as ds:  # NaN where undefined, and where it began
        assert ds.attrs["diverged_at_step"] == step
        assert np.isnan(ds["energy_rank"].isel(snapshot=-1).values).all()
        assert np.isfinite(ds["energy_rank"].isel(snapshot=0).values).all()


def test_a_run_with_lr_0_reports_zero_updates_not_a_divergence(reports):
    result, report = reports["lr0"]
    summary = _strict((report / "summary.json").read_text())
    run = summary["runs"][0]
    assert run["divergence"] is None and math.isfinite(run["final_loss"])
    assert "zero" in summary["final"]["missing"]
    assert any("no recorded matrix moved" in note for note in summary["notes"])
    assert all(p["reason"].startswith("the group's update is exactly zero") for p in
               summary["curves"]["all"]["missing_points"])
    assert summary["curves"]["all"]["fit"]["status"] != "ok"
    assert "n/a: every finite update is exactly zero" in result.output


def test_a_module_frozen_from_the_start_is_not_recorded_and_changes_nothing(reports):
    _, report = reports["frozen"]
    summary = _strict((report / "summary.json").read_text())
    assert summary["runs"][0]["divergence"] is None and summary["final"]["missing"] is None
    assert "mlp.0" not in {m["module"] for m in summary["final"]["rank_hungry_modules"]}
    assert summary["curves"]["all"]["missing_points"] == []


def test_a_module_without_gradient_is_no_gradient_not_a_non_finite_one(reports, tmp_path):
    _, report = reports["unused"]
    summary = _strict((report / "summary.json").read_text())
    run = summary["runs"][0]
    assert run["divergence"] is None and run["nonfinite_gradient_steps"] == 0
    assert run["no_gradient_steps"] == {"spare": STEPS}
    assert any("never moved" in note and "spare" in note for note in summary["notes"])
    assert any("no gradient" in note and f"spare ({STEPS} of {STEPS} steps)" in note for note in summary["notes"])
    with lorascope.open_run(Path(str(report).replace("report-unused", "unused.h5"))) as recorded:
        spare = list(recorded.modules["name"]).index("spare")
        grad = recorded.steps["grad_sq_norm"].values
        assert np.all(np.isnan(grad[:, spare]))  # NaN: no gradient; a non-finite gradient is stored as +Inf
        assert np.all(np.isfinite(np.delete(grad, spare, axis=1)))
        assert np.all(recorded.steps["grad_nonfinite_modules"].values == 0)


def test_find_divergence_tells_an_unreported_loss_from_a_diverged_one():
    steps = xr.Dataset(
        {"loss": ("step", [2.0, np.nan, 1.9, np.nan, np.nan]),
         "grad_nonfinite_modules": ("step", [0, 0, 0, 1, 1]),
         "grad_sq_norm": (("step", "module"), [[1.0, np.nan], [1.0, np.nan], [1.0, np.nan], [np.inf, np.nan],
                                               [np.inf, np.inf]])},
        coords={"step": [1, 2, 3, 4, 5], "module": ["a", "b"], "examples_seen": ("step", [4, 8, 12, 16, 20])})
    div = find_divergence(steps)
    assert (div.step, div.loss_step, div.gradient_step, div.update_step, div.examples_seen) == (4, 4, 4, None, 16)
    assert [(m.module, m.gradient_step) for m in div.modules] == [("a", 4), ("b", 5)]
    assert find_divergence(steps.isel(step=[0, 1, 2])) is None  # NaN loss with finite gradients: not reported
    unreported = find_divergence(steps.assign(loss=("step", np.full(5, np.nan))))  # a run that never logs a loss
    assert (unreported.step, unreported.loss_step, unreported.gradient_step) == (4, None, 4)


def test_a_module_frozen_midway_has_no_gradient_and_no_divergence(reports):
    result, report = reports["frozen_midway"]
    summary = _strict((report / "summary.json").read_text())
    run = summary["runs"][0]
    assert run["divergence"] is None and run["nonfinite_gradient_steps"] == 0
    assert run["no_gradient_steps"] == {"mlp.0": STEPS - BAD_STEP}
    assert math.isfinite(run["final_loss"]) and summary["final"]["missing"] is None
    assert "DIVERGED" not in result.output and "no gradient" in result.output
    with lorascope.open_run(Path(str(report).replace("report-frozen_midway", "frozen_midway.h5"))) as recorded:
        grad = recorded.steps["grad_sq_norm"].sel(module="mlp.0").values
        assert np.all(np.isfinite(grad[:BAD_STEP])) and np.all(np.isnan(grad[BAD_STEP:]))
        assert np.all(recorded.steps["grad_nonfinite_modules"].values == 0)


def test_a_diverged_probe_says_so_in_the_recommendation(tmp_path, tiny_llama_config):
    transformers = pytest.importorskip("transformers")
    from lorascope.workflows.recommend import recommend

    config = tiny_llama_config()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.Generator().manual_seed(0)
    probe = tmp_path / "probe.h5"
    with lorascope.record(model, probe, optimizer=opt, total_steps=STEPS,
                          extra_config={"dataset": {"examples": 8 * STEPS}}) as rec:
        for step in range(1, STEPS + 1):
            ids = torch.randint(0, config.vocab_size, (8, 12), generator=data)
            loss = model(input_ids=ids, labels=ids).loss * (float("nan") if step >= BAD_STEP else 1.0)
            loss.backward()
            rec.log(loss=loss, examples=len(ids), tokens=ids[:, 1:].numel())
            opt.step()
            opt.zero_grad()
    config.save_pretrained(tmp_path / "model")
    result = recommend(tmp_path / "model", examples=1000, tokens_per_example=10, probes=[probe])
    assert any(f"diverged at step {BAD_STEP}" in note for note in result.notes), result.notes
    json.dumps(result.to_dict(), allow_nan=False)


def test_json_output_of_a_diverged_run_is_strict(reports, tmp_path):
    _, report = reports["inf_grad"]
    path = Path(str(report).replace("report-inf_grad", "inf_grad.h5"))
    result = CliRunner().invoke(cli, ["analyze", str(path), "-o", str(tmp_path / "r"), "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert _strict(result.stdout)["runs"][0]["divergence"]["step"] == BAD_STEP
