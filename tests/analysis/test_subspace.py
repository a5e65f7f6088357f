"""Principal angles, subspace similarity, settling and intruder counts (lorascope.analysis.subspace, .intruders)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from lorascope.analysis.intruders import (
    EPS_SWEEP,
    IntruderSummary,
    intruder_counts,
    near_chance,
    random_max_cos,
)
from lorascope.analysis.subspace import (
    module_subspace,
    numerical_rank,
    principal_angles,
    settle_index,
    subspace_dynamics,
    subspace_similarity,
)
from lorascope.errors import InvalidOptionError


def _basis(rng: np.random.Generator, n: int, r: int) -> np.ndarray:
    return np.linalg.qr(rng.standard_normal((n, r)))[0]


def test_principal_angles_match_scipy(seed):
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((30, 4)), rng.standard_normal((30, 6))
    ours = np.sort(principal_angles(a, b))
    np.testing.assert_allclose(ours, np.sort(scipy.linalg.subspace_angles(a, b)), atol=1e-7)


def test_phi_is_one_for_a_contained_span_and_zero_for_orthogonal_ones(seed):
    rng = np.random.default_rng(seed)
    q = _basis(rng, 20, 6)
    mixed = q[:, :3] @ rng.standard_normal((3, 3))  # same span as q[:, :3], not orthonormal
    assert subspace_similarity(q, mixed) == pytest.approx(1.0, abs=1e-9)
    assert subspace_similarity(q[:, :3], q[:, 3:]) == pytest.approx(0.0, abs=1e-9)
    # sign flips and rotations within the span change nothing
    assert subspace_similarity(-q[:, :2], q[:, :2] @ np.array([[0.6, -0.8], [0.8, 0.6]])) == pytest.approx(1.0)


def test_phi_of_random_subspaces_is_about_r_over_n(seed):
    rng = np.random.default_rng(seed)
    n, r = 200, 8
    phis = [subspace_similarity(_basis(rng, n, r), _basis(rng, n, r)) for _ in range(200)]
    assert np.mean(phis) == pytest.approx(r / n, rel=0.15)


def test_nan_columns_are_dropped():
    a = np.array([[1.0, np.nan], [0.0, np.nan], [0.0, np.nan]])
    assert principal_angles(a, np.eye(3)[:, :2]).shape == (1,)
    assert np.isnan(subspace_similarity(np.full((3, 2), np.nan), np.eye(3)))


def test_bad_shapes_are_refused():
    with pytest.raises(InvalidOptionError, match="same space"):
        principal_angles(np.eye(3), np.eye(4))
    with pytest.raises(InvalidOptionError, match="2-d"):
        principal_angles(np.ones(3), np.eye(3))


@pytest.mark.parametrize(("phi", "expected"), [
    ([0.1, 0.95, 0.5, 0.92, 1.0], 3),
    ([0.95, 0.96, 1.0], 0),
    ([0.2, 0.3, 1.0], 2),
    ([0.2, 0.95, np.nan], None),
    ([], None),
])
def test_settle_index(phi, expected):
    assert settle_index(phi, 0.9) == expected


def test_numerical_rank_drops_float32_noise():
    assert numerical_rank([5.0, 2.0, 3e-5, 1e-9]) == 2
    assert numerical_rank([0.0, 0.0]) == 0
    assert numerical_rank([np.nan]) == 0


def _rotating(rng: np.random.Generator, n_snap: int, switch: int, out: int = 24, inp: int = 16, r: int = 4,
              k: int = 6) -> list[tuple[np.ndarray, np.ndarray]]:
    """Factors of an update whose top-r subspace is span A before snapshot ``switch`` and span B from it on
    (A orthogonal to B on both sides), with small wobbles inside each span."""
    left, right = _basis(rng, out, 2 * r + k), _basis(rng, inp, 2 * r + k)
    factors = []
    for t in range(n_snap):
        first = slice(0, r) if t < switch else slice(r, 2 * r)
        wobble = np.linalg.qr(np.eye(r) + 0.05 * rng.standard_normal((r, r)))[0]
        u = np.concatenate([left[:, first] @ wobble, left[:, 2 * r:2 * r + k - r]], axis=1)
        v = np.concatenate([right[:, first] @ wobble, right[:, 2 * r:2 * r + k - r]], axis=1)
        factors.append((u, v))
    return factors


def test_planted_rotation_settles_at_the_switch(seed):
    rng = np.random.default_rng(seed)
    factors = _rotating(rng, n_snap=8, switch=5)
    track = module_subspace(factors, [6] * 8, rank=4)
    assert track.settle == 5
    np.testing.assert_allclose(track.phi_final[:5], 0.0, atol=1e-9)  # orthogonal before the switch
    np.testing.assert_allclose(track.phi_final[5:], 1.0, atol=1e-9)
    np.testing.assert_allclose(track.angles_final[:5], 90.0, atol=1e-4)
    np.testing.assert_allclose(track.angles_final[5:], 0.0, atol=1e-4)
    np.testing.assert_allclose(track.phi_previous[5], 0.0, atol=1e-9)  # the jump, seen from the previous snapshot
    np.testing.assert_allclose(track.phi_previous[[1, 2, 3, 4, 6, 7]], 1.0, atol=1e-9)
    assert np.isnan(track.phi_previous[0]).all()


def test_half_rotated_subspace_has_the_planted_angles(seed):
    rng = np.random.default_rng(seed)
    q = _basis(rng, 10, 4)
    theta = np.radians([10.0, 50.0])
    rotated = q[:, :2] * np.cos(theta) + q[:, 2:] * np.sin(theta)
    track = module_subspace([(rotated, rotated), (q[:, :2], q[:, :2])], [2, 2], rank=2)
    np.testing.assert_allclose(track.angles_final[0, 0], [10.0, 50.0], atol=1e-6)
    assert track.phi_final[0, 0] == pytest.approx(np.mean(np.cos(theta) ** 2))
    assert track.settle == 1  # phi 0.71 < 0.9 at the first snapshot


def test_vectors_past_the_numerical_rank_are_left_out(seed):
    """A rank-1 LoRA's update: its direction is fixed, the 2nd..kth vectors are arbitrary and must not count."""
    rng = np.random.default_rng(seed)
    u, v = _basis(rng, 12, 1), _basis(rng, 8, 1)
    factors = [(np.concatenate([u, _basis(rng, 12, 3)], 1), np.concatenate([v, _basis(rng, 8, 3)], 1))
               for _ in range(4)]
    track = module_subspace(factors, [1, 1, 1, 1], rank=4)
    np.testing.assert_allclose(track.phi_final, 1.0, atol=1e-9)
    assert track.used_rank.tolist() == [1, 1, 1, 1] and track.settle == 0


def test_gradient_overlap(seed):
    rng = np.random.default_rng(seed)
    factors = _rotating(rng, n_snap=4, switch=2)
    final_left, final_right = factors[-1]
    grads = [(final_left, final_right)] * 2 + [None, (np.roll(final_left, 1, axis=0), final_right)]
    track = module_subspace(factors, [6] * 4, rank=4, grad_factors=grads)
    assert track.grad_phi_final is not None and track.grad_phi_update is not None
    np.testing.assert_allclose(track.grad_phi_final[:2], 1.0, atol=1e-9)
    np.testing.assert_allclose(track.grad_phi_update[:2], 0.0, atol=1e-9)  # the early update is elsewhere
    assert np.isnan(track.grad_phi_final[2]).all()


def test_dynamics_aggregate_per_kind(seed):
    rng = np.random.default_rng(seed)
    factors = [_rotating(rng, 6, 2), _rotating(rng, 6, 4), _rotating(rng, 6, 3)]
    dyn = subspace_dynamics(["a.q", "a.k", "m.up"], ["attention", "attention", "mlp"], step=np.arange(1, 7) * 10,
                            x=np.arange(1, 7) * 320.0, factors=factors, numerical_ranks=np.full((3, 6), 6),
                            ranks=[2, 4])
    assert dyn.rank == 4
    attention = dyn.group("attention")
    assert attention.modules == 2 and attention.settled_early == 2
    assert attention.settle_step == pytest.approx(np.median([30, 50]))
    assert dyn.group("mlp").settle_x == pytest.approx(4 * 320.0)
    np.testing.assert_allclose(dyn.group(None).phi_final, [0, 0, 0, 0.0, 1, 1][:2] + [0.0, 1.0, 1.0, 1.0], atol=1e-9)
    out = dyn.to_dict()
    assert out["by_kind"]["mlp"]["settle_step"] == 40 and out["modules"][1]["settle_step"] == 50
    assert set(out["by_rank"]) == {"2", "4"}


def test_intruder_counts_and_sweep():
    cos = np.array([[[0.99, 0.3, np.nan], [0.2, 0.1, 0.7]], [[0.45, 0.3, 0.05], [0.9, 0.95, 0.99]]])
    assert intruder_counts(cos, 0.5).tolist() == [[1, 2], [3, 0]]
    assert intruder_counts(cos, 0.1).tolist() == [[0, 0], [1, 0]]
    summary = IntruderSummary(modules=["a", "b"], kinds=["attention", "mlp"], rows=np.array([64, 4096]),
                              basis=np.array([64, 4096]), step=np.array([1, 2]), x=np.array([8.0, 16.0]), cos=cos)
    out = summary.to_dict()
    assert out["all"]["counts"] == [3, 3]
    assert out["by_kind"]["attention"]["final_sweep"]["0.5"] == 3
    assert out["by_kind"]["mlp"]["final_sweep"]["0.9"] == 0
    assert len(out["all"]["final_sweep"]) == len(EPS_SWEEP)
    assert out["near_chance_modules"] == ["a"]  # 64 rows: a random direction scores ~0.3, within reach of 0.5
    with pytest.raises(InvalidOptionError, match="eps"):
        intruder_counts(cos, 0.0)


@pytest.mark.parametrize("n", [64, 256, 1024])
def test_random_max_cos_follows_the_gaussian_maximum(n):
    # sqrt(2 ln n / n) is the leading term; the median sits a little under it at these sizes
    approx = np.sqrt(2 * np.log(n) / n)
    assert 0.75 * approx < random_max_cos(n) < 1.05 * approx
    assert random_max_cos(n, q=0.05) < random_max_cos(n) < random_max_cos(n, q=0.95)
    assert random_max_cos(n) >= 1 / np.sqrt(n)  # a unit vector has a coordinate of at least 1/sqrt(n)


def test_near_chance_flags_narrow_matrices_only():
    assert near_chance(64) and near_chance(96)
    assert not near_chance(256) and not near_chance(1024) and not near_chance(20_000)
    assert not near_chance(64, eps=0.9)
