"""Gradient noise scale: validated against B_simple = tr(Sigma)/|G|^2 computed exactly from the data at a fixed
parameter vector (linear and logistic regression), and the same per-step inputs from a plain loop, an HF Trainer
and a Lightning Trainer fed the same micro-batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lorascope
from lorascope.analysis.noise import batch_tradeoff, noise_scale, unbiased_estimates
from lorascope.errors import InvalidOptionError
from lorascope.model.taxonomy import classify
from lorascope.record.gns import MicroBatchNorms, local_small_norms, per_example_norms, two_batch_norms

N, D = 512, 12


def _data(seed: int, logistic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    w_true = torch.randn(D, 1, generator=g)
    if logistic:
        y = (torch.rand(N, 1, generator=g) < torch.sigmoid(x @ w_true)).float()
    else:
        y = x @ w_true + 0.5 * torch.randn(N, 1, generator=g)
    return x, y


def _loss(pred: torch.Tensor, y: torch.Tensor, logistic: bool) -> torch.Tensor:
    if logistic:
        return torch.nn.functional.binary_cross_entropy_with_logits(pred, y)
    return ((pred - y) ** 2).mean()


def _exact_b_simple(model: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor, logistic: bool) -> float:
    """tr(Sigma) / |G|^2 over the finite population of examples (what batches drawn with replacement sample)."""
    grads = []
    for i in range(N):
        model.zero_grad()
        _loss(model(x[i : i + 1]), y[i : i + 1], logistic).backward()
        grads.append(model.weight.grad.reshape(-1).clone())
    model.zero_grad()
    g = torch.stack(grads).double()
    mean = g.mean(0)
    trace = ((g - mean) ** 2).sum(1).mean()
    return float(trace / (mean**2).sum())


def _fixed_problem(seed: int, logistic: bool):
    """Data, a linear model held at a fixed point away from the optimum (so |G| is not tiny) by an SGD with
    lr = 0, and the exact noise scale there."""
    x, y = _data(seed, logistic)
    torch.manual_seed(seed)
    model = torch.nn.Linear(D, 1, bias=False)
    with torch.no_grad():
        model.weight.mul_(0.3)
    return x, y, model, torch.optim.SGD(model.parameters(), lr=0.0), _exact_b_simple(model, x, y, logistic)


@pytest.mark.parametrize("measure", [
    lambda: two_batch_norms(torch.ones(2, 3), torch.zeros(2, 3), [1, 1], "median"),
    lambda: per_example_norms(torch.ones(2, 3), torch.zeros(2, 3), torch.ones(4, 3), [2, 2], 3, "median"),
    lambda: local_small_norms(torch.ones(2, 3), [1, 1], "median"),
], ids=["two_batch_norms", "per_example_norms", "local_small_norms"])
def test_an_unknown_loss_convention_is_an_invalid_option(measure):
    with pytest.raises(InvalidOptionError, match=r"The 'convention' parameter of \w+ must be one of"):
        measure()


@pytest.mark.parametrize("logistic", [False, True], ids=["linear", "logistic"])
def test_accumulation_estimate_matches_the_exact_noise_scale(tmp_path, seed, logistic):
    x, y, model, opt, exact = _fixed_problem(seed, logistic)
    rng = torch.Generator().manual_seed(seed + 100)
    micro, passes, steps = 8, 4, 3000
    path = tmp_path / "gns.h5"
    with lorascope.record(model, path, optimizer=opt, snapshots=[steps]):
        for _ in range(steps):
            for _ in range(passes):
                idx = torch.randint(0, N, (micro,), generator=rng)
                (_loss(model(x[idx]), y[idx], logistic) / passes).backward()
            opt.step()
            opt.zero_grad()
    with lorascope.open_run(path) as run:
        steps_view = run.steps
    assert np.all(steps_view.gns_batch_small.values == micro)
    assert np.all(steps_view.gns_batch_big.values == micro * passes)
    ns = noise_scale(steps_view, smoothing=0.999)
    estimate = ns.final["all"]["b_simple"]
    assert estimate == pytest.approx(exact, rel=0.10)
    low, high = ns.final["all"]["interval"]
    assert low < high
    # The ratio of means over all steps is the same estimator without smoothing; it is close too.
    g2, trace = unbiased_estimates(steps_view.gns_sq_norm_small.values.sum(1), steps_view.gns_sq_norm_big.values.sum(1),
                                   micro, micro * passes)
    assert float(np.mean(trace) / np.mean(g2)) == pytest.approx(exact, rel=0.10)


def test_big_batch_norm_is_the_unclipped_accumulated_gradient(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    unclipped = []
    with lorascope.record(model, tmp_path / "run.h5", optimizer=opt):
        for _ in range(3):
            for _ in range(3):
                model(torch.randn(5, 6)).pow(2).mean().div(3).backward()
            unclipped.append([float(model[i].weight.grad.pow(2).sum()) for i in (0, 2)])
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)  # the optimizer sees clipped gradients
            opt.step()
            opt.zero_grad()
    with lorascope.open_run(tmp_path / "run.h5") as run:
        np.testing.assert_allclose(run.steps.gns_sq_norm_big.values, unclipped, rtol=1e-4)
        assert np.all(run.steps.grad_sq_norm.values < 1e-6 + 1e-5)  # clipped norm at optimizer.step
        np.testing.assert_array_equal(run.steps.gns_batch_small.values, 5)
        np.testing.assert_array_equal(run.steps.gns_batch_big.values, 15)


def test_single_pass_steps_record_no_noise_scale(tmp_path):
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with lorascope.record(model, tmp_path / "run.h5", optimizer=opt):
        for _ in range(3):
            model(torch.randn(8, 4)).sum().backward()
            opt.step()
            opt.zero_grad()
    with lorascope.open_run(tmp_path / "run.h5") as run:
        assert np.all(np.isnan(run.steps.gns_batch_small.values))
        assert noise_scale(run.steps) is None


@pytest.mark.parametrize("passes", [1, 2, 3])
def test_deferring_the_first_pass_gives_the_same_norms_and_skips_a_lone_pass(passes):
    """``defer_first`` measures a tensor's first pass from the running sum when a second pass comes: the same
    per-pass norms and cross terms as measuring it at once; a step of one pass measures nothing."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3))
    refs = classify(model).matrices
    tensors = [{"weight": model.get_submodule(ref.module).weight} for ref in refs]
    at_once, deferred = MicroBatchNorms(refs, tensors), MicroBatchNorms(refs, tensors, defer_first=True)
    at_once.attach()
    deferred.attach()
    for step_passes in (passes, 1, 2):  # a lone pass must not leak into the next step
        for _ in range(step_passes):
            model(torch.randn(5, 6)).pow(2).mean().backward()
        expected, got = at_once.pop(), deferred.pop()
        model.zero_grad()
        assert expected is not None and expected[0].shape == (step_passes, len(refs))
        if step_passes == 1:
            assert got is None
        else:
            torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=0)
            torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-12)
    assert deferred.take_seconds() > 0 and deferred.take_seconds() == 0.0  # the hooks ran; taken once


def test_batch_tradeoff_and_warnings():
    advice = batch_tradeoff(100.0, 800.0)
    i = advice.candidates.index(800.0)
    assert advice.steps_factor[i] == pytest.approx(1.125) and advice.examples_factor[i] == pytest.approx(9.0)
    assert advice.warning is not None and "8.0x" in advice.warning
    assert batch_tradeoff(100.0, 200.0).warning is None  # full fine-tuning tolerates 2x
    lora = batch_tradeoff(100.0, 200.0, lora=True)
    assert lora.warning is not None and "LoRA Without Regret" in lora.warning
    with pytest.raises(ValueError):
        batch_tradeoff(0.0, 10.0)


@pytest.mark.parametrize("logistic", [False, True], ids=["linear", "logistic"])
def test_per_example_estimate_matches_the_exact_noise_scale(tmp_path, seed, logistic):
    """B_small = 1 from exact per-example norms, one backward pass per step."""
    x, y, model, opt, exact = _fixed_problem(seed, logistic)
    rng = torch.Generator().manual_seed(seed + 200)
    batch, steps = 16, 1500
    path = tmp_path / "gns.h5"
    with lorascope.record(model, path, optimizer=opt, gns="per_example", snapshots=[steps]):
        for _ in range(steps):
            idx = torch.randint(0, N, (batch,), generator=rng)
            _loss(model(x[idx]), y[idx], logistic).backward()
            opt.step()
            opt.zero_grad()
    with lorascope.open_run(path) as run:
        steps_view = run.steps
    np.testing.assert_array_equal(steps_view.gns_batch_small.values, 1)
    np.testing.assert_array_equal(steps_view.gns_batch_big.values, batch)
    ns = noise_scale(steps_view, smoothing=0.999)
    assert ns.final["all"]["b_simple"] == pytest.approx(exact, rel=0.10)
