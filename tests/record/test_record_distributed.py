"""Recording under torch.distributed with two CPU processes (gloo): DDP, FSDP2, the HF Trainer and Lightning.

Each multi-process run is tests/_distributed_script.py in child processes; the test replays the same global
batches in this process without torch.distributed and checks that the two files agree module by module: step
counts, examples and tokens seen (the global batch), loss, gradient norms, snapshot energies and spectra, and
(under DDP) the noise-scale inputs and estimate. Every child runs under a timeout: a hang fails the test.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import _distributed_script as script
import numpy as np
import pytest
import torch

import lorascope
from lorascope.analysis.noise import noise_scale

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

SCRIPT = Path(script.__file__)
TIMEOUT = 300  # seconds per multi-process run (about 10 on an idle machine); a hang fails, never blocks


def _run(command: list[str], tmp_path: Path, env: dict[str, str] | None = None) -> str:
    """Run a child process group to completion (killed whole on timeout); returns its output."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                             cwd=tmp_path, start_new_session=True)
    try:
        output, _ = child.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        _kill_tree(child.pid)  # torchrun starts its workers in sessions of their own
        output, _ = child.communicate()
        pytest.fail(f"{' '.join(command[-2:])} did not finish within {TIMEOUT} s:\n{output[-4000:]}")
    assert child.returncode == 0, f"{' '.join(command[-2:])} failed (exit {child.returncode}):\n{output[-6000:]}"
    return output


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (found through /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo, tree = [pid], []
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], []))
    for member in tree:
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _torchrun(mode: str, tmp_path: Path) -> str:
    return _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                 str(SCRIPT), mode, str(tmp_path)], tmp_path)


def _assert_same_run(distributed: lorascope.Run, single: lorascope.Run, *, rtol: float, prefix: str = "") -> None:
    """The two recordings agree: modules, step and snapshot counts, global counts, loss, gradient norms,
    energies and spectra (to ``rtol``; spectra to ``rtol`` of the largest singular value)."""
    assert distributed.status == single.status == "complete"
    assert list(distributed.modules["name"]) == [prefix + name for name in single.modules["name"]]
    np.testing.assert_array_equal(distributed.step_index, single.step_index)
    np.testing.assert_array_equal(distributed.snapshot_index, single.snapshot_index)
    a, b = distributed.steps, single.steps
    for column in ("examples_seen", "tokens_seen", "batch_examples", "batch_tokens"):
        np.testing.assert_array_equal(a[column].values, b[column].values, err_msg=column)
    np.testing.assert_allclose(a["loss"].values, b["loss"].values, rtol=rtol)
    np.testing.assert_allclose(a["grad_sq_norm"].values, b["grad_sq_norm"].values, rtol=rtol)
    np.testing.assert_allclose(a["grad_sq_norm_other"].values, b["grad_sq_norm_other"].values, rtol=rtol)
    sa, sb = distributed.snapshots, single.snapshots
    np.testing.assert_array_equal(sa["examples_seen"].values, sb["examples_seen"].values)
    np.testing.assert_allclose(sa["energy"].values, sb["energy"].values, rtol=rtol)
    np.testing.assert_array_equal(sa["sv_count"].values, sb["sv_count"].values)
    sv_a, sv_b = sa["sv"].values, sb["sv"].values
    np.testing.assert_array_equal(np.isnan(sv_a), np.isnan(sv_b))
    scale = np.nanmax(sv_b, axis=-1, keepdims=True)
    np.testing.assert_allclose(np.nan_to_num(sv_a), np.nan_to_num(sv_b), rtol=0, atol=rtol * float(np.max(scale)))


def _assert_same_noise_scale(distributed: lorascope.Run, single: lorascope.Run, *, rtol: float) -> None:
    a, b = distributed.steps, single.steps
    for column in ("gns_batch_small", "gns_batch_big"):
        np.testing.assert_array_equal(a[column].values, b[column].values, err_msg=column)
    for column in ("gns_sq_norm_small", "gns_sq_norm_big"):
        np.testing.assert_allclose(a[column].values, b[column].values, rtol=rtol, err_msg=column)
    ours, theirs = noise_scale(a), noise_scale(b)
    np.testing.assert_allclose(ours.series["b_simple"].values, theirs.series["b_simple"].values, rtol=10 * rtol,
                               equal_nan=True)
    for group, expected in theirs.final.items():
        value = ours.final[group]["b_simple"]
        assert (value is None) == (expected["b_simple"] is None), group
        assert value is None or value == pytest.approx(expected["b_simple"], rel=10 * rtol), group


def _single_process_ddp_twin(path: Path, steps: int = script.STEPS, gns: str = "auto") -> None:
    """The DDP run in one process: the same global batches as four accumulated passes, the same clipping."""
    model = script.tiny_lm()
    optimizer = torch.optim.AdamW(model.parameters(), lr=script.LR)
    with lorascope.record(model, path, optimizer=optimizer, snapshots=script.SNAPSHOTS, total_steps=steps,
                          gns=gns) as recorder:
        for step in range(1, steps + 1):
            for ids in script.micro_batches(step):
                loss = script.lm_loss(model, ids)
                (loss / (script.PASSES * script.WORLD)).backward()
                recorder.log(loss=loss)
            torch.nn.utils.clip_grad_norm_(model.parameters(), script.CLIP)
            optimizer.step()
            optimizer.zero_grad()


def test_ddp_run_matches_the_single_process_run_and_its_accumulation_noise_scale(tmp_path, torch_single_thread):
    output = _torchrun("ddp", tmp_path)
    # A path error seen by rank 0 is raised on rank 1 as well (and nobody hangs).
    assert "rank 1: RunFileExistsError" in output and "(on rank 0)" in output
    assert sorted(p.name for p in tmp_path.glob("*.h5")) == ["ddp.h5", "ddp_per_example.h5", "exists.h5"]
    _single_process_ddp_twin(tmp_path / "single.h5")
    with lorascope.open_run(tmp_path / "ddp.h5") as ddp, lorascope.open_run(tmp_path / "single.h5") as single:
        _assert_same_run(ddp, single, rtol=1e-4)
        steps = ddp.steps
        np.testing.assert_array_equal(steps["batch_examples"].values, script.GLOBAL_BATCH)
        # B_small: one backward pass on one rank; B_big: the global batch; the big norm is taken before clipping.
        np.testing.assert_array_equal(steps["gns_batch_small"].values, script.GLOBAL_BATCH // 4)
        np.testing.assert_array_equal(steps["gns_batch_big"].values, script.GLOBAL_BATCH)
        clipped = steps["grad_sq_norm"].values.sum(1) + steps["grad_sq_norm_other"].values
        assert np.all(clipped <= script.CLIP**2 * 1.001)
        assert np.all(steps["gns_sq_norm_big"].values.sum(1) > clipped)
        _assert_same_noise_scale(ddp, single, rtol=1e-4)
        assert noise_scale(ddp.steps).final["all"]["b_simple"] > 0
        assert ddp.config["distributed"]["mode"] == "ddp" and ddp.config["distributed"]["world_size"] == 2
    # Exact per-example norms on each rank: B_small = 1 against the global batch.
    _single_process_ddp_twin(tmp_path / "single_per_example.h5", script.PER_EXAMPLE_STEPS, "per_example")
    with lorascope.open_run(tmp_path / "ddp_per_example.h5") as ddp, \
            lorascope.open_run(tmp_path / "single_per_example.h5") as single:
        _assert_same_run(ddp, single, rtol=1e-4)
        np.testing.assert_array_equal(ddp.steps["gns_batch_small"].values, 1)
        _assert_same_noise_scale(ddp, single, rtol=1e-4)


def test_a_recorder_error_on_one_rank_stops_every_rank_together_and_training_goes_on(tmp_path):
    """Rank 1's recorder fails at step 2: its contributions are unknown from then on, every rank stops at the
    snapshot step 4 (before any snapshot work), both ranks train to the end, rank 0's file is marked failed."""
    output = _torchrun("ddp_fail", tmp_path)
    assert f"rank 0: trained {script.STEPS} steps; recording warnings: []" in output
    assert f"rank 1: trained {script.STEPS} steps; recording warnings: ['lorascope stopped recording" in output
    assert "injected failure" in output
    with lorascope.open_run(tmp_path / "ddp_fail.h5") as run:
        assert run.status == "failed"
        np.testing.assert_array_equal(run.step_index, np.arange(1, script.FAIL_SNAPSHOT + 1))
        assert run.n_snapshots == 0
        expected = [script.GLOBAL_BATCH] + [-1] * (script.FAIL_SNAPSHOT - script.FAIL_AT + 1)
        np.testing.assert_array_equal(run.steps["batch_examples"].values, expected)
        assert np.isfinite(run.steps["loss"].values[0]) and np.all(np.isnan(run.steps["loss"].values[1:]))


def test_fsdp2_run_matches_the_single_process_run(tmp_path, torch_single_thread):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    output = _torchrun("fsdp", tmp_path)
    assert output.count("InvalidOptionError: The 'gns' option") == 2
    assert sorted(p.name for p in tmp_path.glob("*.h5")) == ["fsdp.h5", "fsdp_lora.h5"]
    model = script.tiny_mixtral()
    optimizer = torch.optim.AdamW(model.parameters(), lr=script.LR)
    with lorascope.record(model, tmp_path / "single.h5", optimizer=optimizer, snapshots=script.FSDP_SNAPSHOTS,
                          total_steps=script.FSDP_STEPS, store_delta="float32"):
        for step in range(1, script.FSDP_STEPS + 1):
            ids = script.global_batch(step, vocab=63)
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    with lorascope.open_run(tmp_path / "fsdp.h5") as fsdp, lorascope.open_run(tmp_path / "single.h5") as single:
        _assert_same_run(fsdp, single, rtol=2e-4)
        kinds = set(fsdp.modules["kind"])
        assert {"attention", "moe_expert", "router", "embedding"} <= kinds  # uneven shards, experts on one rank
        for module in range(len(single.modules)):  # the full updates, gathered to rank 0
            np.testing.assert_allclose(fsdp.delta(module, -1), single.delta(module, -1), rtol=0,
                                       atol=2e-3 * float(np.abs(single.delta(module, -1)).max()))
        assert np.all(np.isnan(fsdp.steps["gns_batch_small"].values))  # no noise scale under FSDP2
        assert fsdp.config["distributed"]["mode"] == "fsdp2"
    # A PEFT LoRA model under FSDP2: the merged update from factors gathered to rank 0, against its W_0.
    lora = script.tiny_lora_llama()
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=script.LR)
    with lorascope.record(lora, tmp_path / "single_lora.h5", optimizer=optimizer, snapshots=[1],
                          total_steps=script.LORA_STEPS):
        for step in range(1, script.LORA_STEPS + 1):
            ids = script.global_batch(step, vocab=64)
            lora(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    with lorascope.open_run(tmp_path / "fsdp_lora.h5") as fsdp, \
            lorascope.open_run(tmp_path / "single_lora.h5") as single:
        assert np.all(fsdp.modules["lora"]) and len(fsdp.modules) == 6
        _assert_same_run(fsdp, single, rtol=2e-4)


def test_hf_trainer_under_torchrun_matches_one_process(tmp_path, torch_single_thread):
    pytest.importorskip("transformers")
    _torchrun("hf", tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.h5")) == ["hf.h5"]
    # One process accumulating the two ranks' passes sees the same examples in every optimizer step.
    trainer = script.hf_trainer(script.tiny_llama(), tmp_path, micro=script.HF_MICRO,
                                accumulation=script.HF_ACCUMULATION * script.WORLD)
    lorascope.record(trainer, tmp_path / "single.h5")
    trainer.train()
    with lorascope.open_run(tmp_path / "hf.h5") as hf, lorascope.open_run(tmp_path / "single.h5") as single:
        _assert_same_run(hf, single, rtol=2e-4)
        np.testing.assert_array_equal(hf.steps["batch_loss_tokens"].values, single.steps["batch_loss_tokens"].values)
        _assert_same_noise_scale(hf, single, rtol=2e-4)
        assert hf.attrs["framework"] == "transformers"


def test_lightning_ddp_strategy_matches_one_process(tmp_path, torch_single_thread):
    pytest.importorskip("lightning")
    _run([sys.executable, str(SCRIPT), "lightning", str(tmp_path)], tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.h5")) == ["lightning.h5"]
    # Lightning's DistributedSampler gives rank r the examples r, r + 2, ...: one process takes each rank's
    # batch as one backward pass.
    ids = script.Tokens(vocab=script.VOCAB).ids
    model = script.tiny_lm()
    optimizer = torch.optim.AdamW(model.parameters(), lr=script.LR)
    batch = script.LIGHTNING_BATCH
    with lorascope.record(model, tmp_path / "single.h5", optimizer=optimizer,
                          total_steps=script.LIGHTNING_STEPS) as recorder:
        for step in range(script.LIGHTNING_STEPS):
            for rank in range(script.WORLD):
                mine = ids[rank::script.WORLD][step * batch: (step + 1) * batch]
                loss = script.lm_loss(model, mine)
                (loss / script.WORLD).backward()
                recorder.log(loss=loss)
            optimizer.step()
            optimizer.zero_grad()
    with lorascope.open_run(tmp_path / "lightning.h5") as pl, lorascope.open_run(tmp_path / "single.h5") as single:
        _assert_same_run(pl, single, rtol=1e-4, prefix="model.")
        _assert_same_noise_scale(pl, single, rtol=1e-4)
        assert pl.attrs["framework"] == "lightning"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_rank_killed_mid_run_leaves_rank_0s_file_readable(tmp_path):
    port = str(_free_port())
    ranks = []
    for rank in range(2):
        env = dict(os.environ, OMP_NUM_THREADS="1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        log = (tmp_path / f"rank{rank}.log").open("w")
        ranks.append((subprocess.Popen([sys.executable, str(SCRIPT), "kill", str(tmp_path)], env=env, text=True,
                                       stdout=subprocess.PIPE if rank == 0 else log, stderr=log), log))
    (rank0, log0), (rank1, log1) = ranks
    try:
        last = 0
        while last < 5:
            line = rank0.stdout.readline()
            if not line:
                pytest.fail(f"rank 0 ended before step 5:\n{(tmp_path / 'rank0.log').read_text()[-4000:]}")
            if line.startswith("STEP "):
                last = int(line.split()[1])
        rank1.send_signal(signal.SIGKILL)
        rank1.wait(timeout=30)
        try:  # rank 0 fails in its next collective (gloo sees the closed connection) or waits: then it is killed
            rank0.wait(timeout=60)
        except subprocess.TimeoutExpired:
            rank0.kill()
            rank0.wait(timeout=30)
    finally:
        for child, log in ranks:
            if child.poll() is None:
                child.kill()
                child.wait()
            log.close()
        rank0.stdout.close()
    with lorascope.open_run(tmp_path / "kill.h5") as run:
        assert run.status in ("failed", "recording") and not run.complete
        n = run.n_steps
        assert n >= last - 3  # the writer may lag by its queue (4 items: a row and a snapshot per step)
        np.testing.assert_array_equal(run.step_index, np.arange(1, n + 1))
        np.testing.assert_array_equal(run.snapshot_index, np.arange(1, run.n_snapshots + 1))
        steps = run.steps
        np.testing.assert_array_equal(steps["examples_seen"].values, script.GLOBAL_BATCH * np.arange(1, n + 1))
        assert np.all(np.isfinite(steps["loss"].values)) and np.all(np.isfinite(steps["grad_sq_norm"].values))
        assert np.all(np.isfinite(run.snapshots["energy"].values))


# -- in one process -----------------------------------------------------------------------------------------
def test_distributed_true_needs_an_initialized_process_group(run_path, tiny_token_model):
    model = tiny_token_model()
    with pytest.raises(lorascope.InvalidOptionError, match="torch.distributed is not initialized"):
        lorascope.record(model, run_path, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), distributed=True)
    assert not run_path.exists()


def test_distributed_option_is_checked(run_path, tiny_token_model):
    model = tiny_token_model()
    with pytest.raises(lorascope.InvalidOptionError, match="'distributed' option .* None, True or False"):
        lorascope.record(model, run_path, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), distributed="yes")


def test_a_process_group_of_one_records_like_a_single_process(tmp_path, tiny_token_model):
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = tiny_token_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        with lorascope.record(model, tmp_path / "run.h5", optimizer=optimizer) as recorder:
            assert recorder.distributed is None
            model.loss(torch.randint(0, model.vocab, (2, 5))).backward()
            optimizer.step()
    finally:
        torch.distributed.destroy_process_group()
    with lorascope.open_run(tmp_path / "run.h5") as run:
        assert run.n_steps == 1 and "distributed" not in run.config


@pytest.mark.parametrize(("env", "writes"), [
    ({}, True), ({"RANK": "0"}, True), ({"RANK": "3"}, False), ({"SLURM_PROCID": "2"}, False),
    ({"LOCAL_RANK": "1"}, False), ({"NODE_RANK": "1", "LOCAL_RANK": "0"}, False), ({"LOCAL_RANK": "0"}, True),
])
def test_only_the_writing_rank_checks_the_path_when_a_trainer_is_attached(monkeypatch, tmp_path, env, writes):
    from lorascope.record.distributed import will_write
    from lorascope.record.lightning import LorascopeLightningCallback

    for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert will_write(None) is writes
    assert will_write(False) is True  # distributed=False: every process writes its own file
    elsewhere = tmp_path / "only-on-node-0" / "run.h5"  # a folder this process's node does not have
    if writes:
        with pytest.raises(lorascope.LorascopeError, match="does not exist"):
            LorascopeLightningCallback(elsewhere, lorascope.RecordOptions())
    else:
        assert LorascopeLightningCallback(elsewhere, lorascope.RecordOptions()).path == elsewhere
