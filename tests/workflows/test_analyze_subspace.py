"""analyze's subspace section on planted run files: updates built to rotate from one subspace to another at a known
snapshot are reported settling there, with the planted angles; planted intruder cosines are counted; a recording
without the vectors gets every other section and one line naming the options."""

from __future__ import annotations

import json

import numpy as np
import pytest

import lorascope
from lorascope import RunWriter
from lorascope.report.html import render_html
from lorascope.report.plots import make_plots
from lorascope.report.terminal import format_summary
from lorascope.store import Snapshot

OUT, IN, K, SNAPS, BATCH = 24, 16, 4, 6, 8
SWITCH = {"layers.0.self_attn.q_proj": 2, "layers.0.self_attn.v_proj": 4, "layers.0.mlp.up_proj": 3}
KINDS = {"self_attn": "attention", "mlp": "mlp"}


def modules(prefix: str = "", lora: bool = False) -> list[dict]:
    return [dict(name=prefix + name, module=prefix + name, parameter="weight", kind=KINDS[name.split(".")[2]],
                 role=name.rsplit(".", 1)[1], layer=0, expert=-1, out_features=OUT, in_features=IN, lora=lora)
            for name in SWITCH]


def planted_update(t: int, switch: int, bases: tuple[np.ndarray, np.ndarray], rank: int = 2) -> np.ndarray:
    """A rank-``rank`` update in span A (the first ``rank`` basis vectors) before ``switch``, span B after,
    growing over training."""
    left, right = bases
    first = slice(0, rank) if t < switch else slice(rank, 2 * rank)
    return (t + 1) * left[:, first] @ np.diag([3.0, 2.0][:rank]) @ right[:, first].T


def write_planted(path, *, factors: bool = True, intruders: bool = True, seed: int = 0, prefix: str = "",
                  lora: bool = False, steps_per_snapshot: int = 5, cos=None, grads: bool = False):
    """A run of three planted modules (see :func:`planted_update`); with ``grads``, the gradient's vectors at each
    snapshot are the final update's (so the gradient points where the update ends up from the start)."""
    rng = np.random.default_rng(seed)
    bases = {name: (np.linalg.qr(rng.standard_normal((OUT, 4)))[0], np.linalg.qr(rng.standard_normal((IN, 4)))[0])
             for name in SWITCH}
    config = {"dataset": {"examples": 400}}
    if lora:
        config["lora"] = {"default": {"r": 2, "lora_alpha": 4, "use_rslora": False, "scaling_rule": "alpha/r",
                                      "rank_pattern": {}, "alpha_pattern": {}}}
    n_steps = SNAPS * steps_per_snapshot
    steps = np.arange(1, n_steps + 1)
    finals = {}
    for i, (name, switch) in enumerate(SWITCH.items()):
        u, _, vt = np.linalg.svd(planted_update(SNAPS - 1, switch, bases[name]))
        finals[i] = (u[:, :2], vt[:2].T)
    with RunWriter(path, modules(prefix, lora), config=config, factors_k=K if factors else 0,
                   intruder_k=3 if intruders else 0, grad_sv=grads, overwrite=True) as writer:
        writer.append_steps({"step": steps, "examples_seen": BATCH * steps, "tokens_seen": 16 * BATCH * steps,
                             "loss": 3.0 / np.sqrt(steps), "batch_examples": np.full(n_steps, BATCH)})
        for t in range(SNAPS):
            sv, pairs = [], {}
            for i, (name, switch) in enumerate(SWITCH.items()):
                u, s, vt = np.linalg.svd(planted_update(t, switch, bases[name]))
                sv.append(s)
                pairs[i] = (u[:, :K], vt[:K].T)
            extra = {}
            if intruders:
                planted = cos if cos is not None else np.array([0.95, 0.4, 0.2])
                extra = {"intruder_cos": [planted * (t >= 3) + 0.99 * (t < 3)] * 3, "weight_sv": [np.ones(3)] * 3}
            if grads:
                extra["grad_factors"] = finals
                extra["grad_sv"] = [np.array([2.0, 1.0])] * 3
            step = (t + 1) * steps_per_snapshot
            writer.append_snapshot(Snapshot(step=step, examples_seen=BATCH * step, tokens_seen=16 * BATCH * step,
                                            energy=[float(np.sum(v**2)) for v in sv], sv=sv,
                                            factors=pairs if factors else None, **extra))
    return path


def test_planted_rotation_settles_where_built(tmp_path):
    analysis = lorascope.analyze(write_planted(tmp_path / "run.h5"), ranks=(2, 16))
    sub = analysis.subspace
    assert sub is not None and sub.missing is None
    dyn = sub.dynamics
    assert dyn is not None and dyn.ranks == (2, 4)  # the candidate ranks <= factors_k, and factors_k
    snap_steps = [5 * (t + 1) for t in range(SNAPS)]
    for i, switch in enumerate(SWITCH.values()):
        track = dyn.tracks[2][i]
        assert track.settle == switch
        np.testing.assert_allclose(track.angles_final[:switch], 90.0, atol=1e-3)
        np.testing.assert_allclose(track.angles_final[switch:], 0.0, atol=0.5)  # float32 vectors
        assert dyn.tracks[4][i].used_rank.tolist() == [2] * SNAPS  # a rank-2 update: 2 directions compared
    summary = analysis.summary["subspace"]
    json.dumps(summary)
    attention = summary["dynamics"]["by_kind"]["attention"]
    assert attention["settle_step"] == pytest.approx(np.median([snap_steps[2], snap_steps[4]]))
    assert attention["settle_x"] == pytest.approx(BATCH * attention["settle_step"])
    assert summary["dynamics"]["by_kind"]["mlp"]["settle_step"] == snap_steps[3]
    assert summary["dynamics"]["all"]["settled_before_final"] == 3
    module = summary["dynamics"]["modules"][0]
    assert module["phi_to_final"]["left"][:2] == [0.0, 0.0] and module["phi_to_final"]["right"][2] == 1.0
    assert module["phi_to_previous"]["left"][2] == 0.0  # the jump


def test_gradient_overlap_with_the_update(tmp_path):
    analysis = lorascope.analyze(write_planted(tmp_path / "run.h5", grads=True))
    dyn = analysis.summary["subspace"]["dynamics"]
    module = dyn["modules"][0]  # q_proj switches at snapshot 2
    assert module["grad_phi_to_final"]["left"] == pytest.approx([1.0] * SNAPS, abs=1e-4)
    assert module["grad_phi_to_update"]["right"] == pytest.approx([0, 0, 1, 1, 1, 1], abs=1e-4)
    assert dyn["all"]["grad_phi_to_final"] == pytest.approx([1.0] * SNAPS, abs=1e-4)
    assert "gradient phi to final" in format_summary(analysis.summary)


def test_planted_intruders_are_counted_and_narrow_matrices_flagged(tmp_path):
    analysis = lorascope.analyze(write_planted(tmp_path / "run.h5"))
    intr = analysis.summary["subspace"]["intruders"]
    assert intr["k"] == 3 and intr["eps"] == 0.5
    assert intr["all"]["counts"] == [0, 0, 0, 6, 6, 6]  # 0.4 and 0.2 below 0.5, from snapshot 3 on, 3 modules
    assert intr["by_kind"]["attention"]["counts"][-1] == 4
    assert intr["by_kind"]["mlp"]["final_sweep"] == {"0.1": 0, "0.2": 0, "0.3": 1, "0.4": 1, "0.5": 2, "0.6": 2,
                                                     "0.7": 2, "0.8": 2, "0.9": 2}
    assert intr["near_chance_modules"] == list(SWITCH)  # 24 rows: a random direction scores ~0.4
    assert intr["modules"][2]["counts"] == [0, 0, 0, 2, 2, 2]
    (shape,) = intr["baselines"]
    assert (shape["rows"], shape["basis"], shape["modules"], shape["near_chance"]) == (OUT, IN, 3, True)
    assert 0.3 < shape["random_max_cos"] < 0.5
    text = format_summary(analysis.summary)
    assert "Intruder dimensions" in text and "near chance" in text
    assert 'id="subspace"' in render_html(analysis.summary)


def test_the_figure_draws_both_panels(tmp_path):
    analysis = lorascope.analyze(write_planted(tmp_path / "run.h5"))
    images = make_plots(analysis, tmp_path / "figures")
    assert "subspace" in images and images["subspace"].stat().st_size > 1000
    fig = analysis.plot.subspace()
    phi, intruders = fig.axes
    lines = {line.get_label(): line for line in phi.get_lines()}
    np.testing.assert_allclose(lines["all (3)"].get_ydata(), [0, 0, 0, 1, 1, 1][:2] + [0, 1, 1, 1], atol=1e-3)
    counts = {line.get_label(): line.get_ydata().tolist() for line in intruders.get_lines()}
    assert counts["all"] == [0, 0, 0, 6, 6, 6]
    bare = lorascope.analyze(write_planted(tmp_path / "bare.h5", factors=False, intruders=False))
    assert "subspace" not in make_plots(bare, tmp_path / "bare")


def test_recording_without_vectors_gets_one_line(tmp_path):
    analysis = lorascope.analyze(write_planted(tmp_path / "run.h5", factors=False, intruders=False))
    sub = analysis.subspace
    assert sub is not None and sub.dynamics is None and sub.intruders is None
    assert sub.missing is not None and "factors_k=8" in sub.missing and "intruder_k=10" in sub.missing
    text = format_summary(analysis.summary)
    lines = [line for line in text.splitlines() if "factors_k=8" in line]
    assert len(lines) == 1
    assert "Per kind" in text and "Rank vs data" in text  # the rest of the report is there
    page = render_html(analysis.summary)
    assert page.count("factors_k=8") == 1 and "LoRA target capture" in page


def test_only_intruders_missing(tmp_path):
    analysis = lorascope.analyze(write_planted(tmp_path / "run.h5", intruders=False))
    assert analysis.subspace is not None and analysis.subspace.dynamics is not None
    assert analysis.subspace.missing is not None and "intruder_k=10" in analysis.subspace.missing
    assert "factors_k" not in analysis.subspace.missing


def _record_llama(path, config, *, lora_rank: int = 0, steps: int = 12):
    """A real recording: a tiny Llama (full fine-tuning, or an all-linear PEFT LoRA) trained on a shifted-token
    task, with factors_k=4 and intruder_k=10."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    if lora_rank:
        peft = pytest.importorskip("peft")
        from lorascope.model.peft_config import make_lora_config, to_peft

        for p in model.parameters():
            p.requires_grad_(False)
        model = peft.get_peft_model(model, to_peft(make_lora_config(model, target="all-linear", rank=lora_rank,
                                                                    alpha=2 * lora_rank, task_type=None)))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    g = torch.Generator().manual_seed(0)
    ids = (torch.randint(0, 64, (32, 1), generator=g) + torch.arange(12)) % 64
    with lorascope.record(model, path, optimizer=optimizer, total_steps=steps, snapshots=[2, 4, 8, steps],
                          factors_k=4, intruder_k=10, extra_config={"dataset": {"examples": 32}}):
        for step in range(steps):
            rows = ids[(step * 8) % 32:][:8]
            model(input_ids=rows, labels=rows).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return path


@pytest.mark.usefixtures("torch_single_thread")
def test_a_real_recording_through_the_cli(tmp_path, tiny_llama_config):
    from click.testing import CliRunner

    from lorascope_cli.main import cli

    full = _record_llama(tmp_path / "full.h5", tiny_llama_config())
    lora = _record_llama(tmp_path / "lora.h5", tiny_llama_config(), lora_rank=2)
    result = CliRunner().invoke(cli, ["analyze", str(full), "-o", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    assert "Subspaces: when the update's directions settle" in result.output
    assert (tmp_path / "report" / "subspace.png").stat().st_size > 1000
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())["subspace"]
    dyn, intr = summary["dynamics"], summary["intruders"]
    assert dyn["rank"] == 4 and dyn["step"] == [2, 4, 8, 12]
    for module in dyn["modules"]:
        assert module["phi_to_final"]["left"][-1] == pytest.approx(1.0, abs=1e-4)  # the final against itself
        assert all(0.0 <= v <= 1.0 + 1e-6 for v in module["phi_to_final"]["right"] if v is not None)
    assert intr["k"] == 10 and len(intr["all"]["counts"]) == 4
    assert all(0 <= c <= 10 * intr["all"]["modules"] for c in intr["all"]["counts"])
    assert intr["near_chance_modules"]  # 32 rows: a random direction scores ~0.4, within reach of 0.5
    result = CliRunner().invoke(cli, ["compare", str(full), str(lora), "-o", str(tmp_path / "cmp"), "--json"])
    assert result.exit_code == 0, result.output
    compared = json.loads((tmp_path / "cmp" / "compare.json").read_text())["subspace"]
    lora_row = compared["runs"][1]
    assert lora_row["rank"] == 2 and lora_row["dataset_examples"] == 32
    phi = lora_row["overlap_with_full"]["all"]["phi"]
    assert 0.0 <= phi["left"] <= 1.0 and lora_row["overlap_with_full"]["all"]["modules"] == 14


def _mutate(path, how: str) -> None:
    import h5py

    with h5py.File(path, "r+") as f:
        u = f["snapshots/factors/u/000000"]
        if how == "factors_inf":
            u[...] = np.inf
        elif how == "factors_zero":
            u[...] = 0.0
        elif how == "factors_huge":
            u[...] = 1e30
        elif how == "factors_group_deleted":
            del f["snapshots/factors"]
        elif how == "factors_one_module_deleted":
            del f["snapshots/factors/v/000001"]
        elif how == "intruder_nan":
            f["snapshots/intruder_cos"][...] = np.nan
        elif how == "intruder_out_of_range":
            f["snapshots/intruder_cos"][...] = 7.0


@pytest.mark.parametrize("how", ["factors_inf", "factors_zero", "factors_huge", "factors_group_deleted",
                                 "factors_one_module_deleted", "intruder_nan", "intruder_out_of_range"])
def test_damaged_vectors_give_a_report_or_one_line(tmp_path, how):
    from click.testing import CliRunner

    from lorascope_cli.main import cli

    path = write_planted(tmp_path / "run.h5")
    _mutate(path, how)
    result = CliRunner().invoke(cli, ["analyze", str(path), "-o", str(tmp_path / "out"), "--quiet"])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    if result.exit_code:
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    else:
        def refuse(constant):
            raise AssertionError(f"{constant} in summary.json")

        json.loads((tmp_path / "out" / "summary.json").read_text(), parse_constant=refuse)  # strict JSON
