"""The shared spectrum kernel: every route against a float64 scipy reference, invariants, batching, fuzzing."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorascope import spectrum
from lorascope.spectrum import singular_values, singular_values_many, top_singular_triplets

ROUTES = ("auto", "gram", "svd")
CONTRACT = 1e-6  # max |s_i - s_i^ref| / s_1^ref


def reference(matrix: np.ndarray | torch.Tensor) -> np.ndarray:
    """Float64 LAPACK singular values of the matrix's values, converted exactly to float64."""
    if isinstance(matrix, torch.Tensor):
        matrix = matrix.double().numpy()
    return scipy.linalg.svdvals(np.asarray(matrix, dtype=np.float64))


def assert_matches_reference(s: np.ndarray, matrix: np.ndarray | torch.Tensor) -> None:
    ref = reference(matrix)
    assert s.dtype == np.float64
    assert s.shape == ref.shape
    scale = ref[0] if ref.size and ref[0] > 0 else 1.0
    if ref.size:
        assert np.max(np.abs(s - ref)) <= CONTRACT * scale


def assert_invariants(s: np.ndarray, matrix: np.ndarray | torch.Tensor) -> None:
    m = np.asarray(matrix.double().numpy() if isinstance(matrix, torch.Tensor) else matrix, dtype=np.float64)
    assert s.shape == (min(m.shape),)
    assert np.all(s >= 0)
    assert np.all(np.diff(s) <= 0)
    unit = float(np.abs(m).max()) if m.size and np.abs(m).max() > 0 else 1.0  # no overflow for huge entries
    np.testing.assert_allclose(np.sum((s / unit) ** 2), np.sum((m / unit) ** 2), rtol=1e-6, atol=1e-300)


def planted(rng: np.random.Generator, rows: int, cols: int, rank: int, noise: float) -> np.ndarray:
    """A rank-``rank`` matrix with decaying singular values 10 ... 10 * 0.5^(rank-1), plus Gaussian noise."""
    u, _ = np.linalg.qr(rng.standard_normal((rows, rank)))
    v, _ = np.linalg.qr(rng.standard_normal((cols, rank)))
    sigma = 10.0 * 0.5 ** np.arange(rank)
    return (u * sigma) @ v.T + noise * rng.standard_normal((rows, cols))


def case(name: str, rng: np.random.Generator) -> np.ndarray:
    if name == "square":
        return rng.standard_normal((40, 40))
    if name == "tall":
        return rng.standard_normal((150, 30))
    if name == "wide":
        return rng.standard_normal((30, 150))
    if name == "rank_deficient":
        return rng.standard_normal((60, 5)) @ rng.standard_normal((5, 45))
    if name == "zero":
        return np.zeros((20, 12))
    if name == "row":
        return rng.standard_normal((1, 50))
    if name == "column":
        return rng.standard_normal((50, 1))
    if name == "planted":
        return planted(rng, 200, 80, 8, 1e-3)
    if name == "scaled":
        return 1e-7 * rng.standard_normal((35, 70))
    if name == "huge":  # squares overflow float64 (float64 input only: beyond float32's range)
        return 1e200 * rng.standard_normal((30, 20))
    if name == "tiny":  # squares underflow float64
        return 1e-200 * rng.standard_normal((20, 30))
    raise AssertionError(name)


CASES = ("square", "tall", "wide", "rank_deficient", "zero", "row", "column", "planted", "scaled", "huge", "tiny")


@pytest.mark.parametrize(("name", "dtype"), [(name, dtype) for name in CASES for dtype in (np.float32, np.float64)
                                             if dtype is np.float64 or name not in ("huge", "tiny")])
@pytest.mark.parametrize("method", ROUTES)
def test_every_route_matches_float64_lapack(method: str, name: str, dtype: type, seed: int) -> None:
    matrix = case(name, np.random.default_rng(seed)).astype(dtype)
    (s,) = singular_values_many([matrix], method=method)
    assert_matches_reference(s, matrix)
    assert_invariants(s, matrix)


@pytest.mark.parametrize("method", ROUTES)
def test_torch_inputs_of_any_float_dtype(method: str, seed: int) -> None:
    matrices = [torch.randn(30, 20), torch.randn(20, 30, dtype=torch.float64), torch.randn(16, 16).bfloat16(),
                torch.randn(12, 9).half(), torch.randn(8, 8, requires_grad=True)]
    for s, m in zip(singular_values_many(matrices, method=method), matrices, strict=True):
        assert_matches_reference(s, m.detach())


def test_realistic_float32_shapes_meet_the_contract(seed: int) -> None:
    """Tall and wide matrices with SmolLM2-like aspect ratios (MLP 8:3, k/v 1:3), float32 with a planted
    spectrum, through the Gram route."""
    rng = np.random.default_rng(seed)
    tall = planted(rng, 640, 240, 16, 1e-2).astype(np.float32)
    wide = np.ascontiguousarray(planted(rng, 480, 120, 4, 1e-4).astype(np.float32).T)
    for s, m in zip(singular_values_many([tall, wide], method="gram"), [tall, wide], strict=True):
        assert_matches_reference(s, m)
        assert_invariants(s, m)


def test_ill_conditioned_gram_error_stays_relative_to_s1(seed: int) -> None:
    """Exactly rank 20 in float64: the Gram route's tiny singular values are ~sqrt(eps) s_1, within contract."""
    rng = np.random.default_rng(seed)
    matrix = rng.standard_normal((300, 20)) @ rng.standard_normal((20, 200))
    (s,) = singular_values_many([matrix], method="gram")
    assert_matches_reference(s, matrix)
    assert s[20:].max() < 1e-7 * s[0]


def test_batched_equals_one_by_one(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shapes = [(8, 5)] * 40 + [(5, 8)] * 7 + [(6, 6)] * 3 + [(9, 2)]
    matrices = [rng.standard_normal(shape) for shape in shapes]
    for method in ROUTES:
        together = singular_values_many(matrices, method=method)
        alone = [singular_values_many([m], method=method)[0] for m in matrices]
        for a, b, m in zip(together, alone, matrices, strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-12 * b[0])
            assert_matches_reference(a, m)


@pytest.fixture
def torch_threads():
    """Set torch's thread count for one test and restore it afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def test_thread_pool_equals_single_thread(seed: int, torch_threads, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(seed)
    matrices = [rng.standard_normal((160, 90)).astype(np.float32) for _ in range(5)] + \
               [rng.standard_normal((90, 160)) for _ in range(3)] + [rng.standard_normal((4, 4)) for _ in range(20)]
    monkeypatch.setattr(spectrum, "_POOL_MIN_WORK", 0)
    pools = []

    class CountingPool(spectrum.ThreadPoolExecutor):
        def __init__(self, *args, **kwargs):
            pools.append(kwargs.get("max_workers"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(spectrum, "ThreadPoolExecutor", CountingPool)
    torch_threads(2)
    pooled = singular_values_many(matrices)
    assert pools == [2]
    torch_threads(1)
    serial = singular_values_many(matrices)
    assert pools == [2]
    for a, b, m in zip(pooled, serial, matrices, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12 * b[0])
        assert_matches_reference(a, m)


@pytest.mark.parametrize("method", ("gram", "svd"))
def test_accelerator_path_on_cpu_tensors(method: str, seed: int) -> None:
    """The torch code path used on accelerators (batched float64 on the device), exercised on CPU tensors."""
    gen = torch.Generator().manual_seed(seed)
    matrices = [torch.randn(12, 7, generator=gen) for _ in range(4)] + [torch.randn(7, 12, generator=gen),
                                                                       torch.zeros(3, 5), torch.zeros(0, 4)]
    items = [spectrum._Item(i, m, m.shape[0], m.shape[1], method) for i, m in enumerate(matrices)]
    got: dict[int, np.ndarray] = {}
    for chunk, values in spectrum._torch_spectra(items):
        got.update({it.index: s for it, s in zip(chunk, values, strict=True)})
    for i, m in enumerate(matrices):
        assert_matches_reference(got[i], m)
    extreme = [1e200 * matrices[0].double(), 1e-200 * matrices[4].double()]
    items = [spectrum._Item(i, m, m.shape[0], m.shape[1], method) for i, m in enumerate(extreme)]
    for chunk, values in spectrum._torch_spectra(items):
        for it, s in zip(chunk, values, strict=True):
            assert_matches_reference(s, extreme[it.index])
    bad = spectrum._Item(0, torch.tensor([[1.0, float("nan")]]), 1, 2, method)
    with pytest.raises(ValueError, match="index 0 has NaN or Inf"):
        list(spectrum._torch_spectra([bad]))


def test_order_and_mixed_inputs_are_kept() -> None:
    matrices = [np.diag([1.0, 4.0]), torch.diag(torch.tensor([9.0, 2.0, 3.0])), np.array([[0.0, 5.0]]),
                np.arange(6, dtype=np.int64).reshape(2, 3)]
    out = singular_values_many(matrices, device="cpu")
    np.testing.assert_allclose(out[0], [4.0, 1.0])
    np.testing.assert_allclose(out[1], [9.0, 3.0, 2.0])
    np.testing.assert_allclose(out[2], [5.0])
    assert_matches_reference(out[3], matrices[3])
    assert singular_values_many([]) == []


@pytest.mark.parametrize(("matrix", "message"), [
    (np.ones(3), r"2-D matrices\. Got shape \(3,\) at index 0"),
    (np.ones((2, 2, 2)), r"2-D matrices\. Got shape \(2, 2, 2\) at index 0"),
    (np.ones((2, 2), dtype=complex), "real matrices"),
    (torch.ones(2, 2, dtype=torch.complex64), "real matrices"),
    (np.array([[1.0, np.inf]]), "index 0 has NaN or Inf"),
    (torch.tensor([[np.nan, 1.0], [0.0, 1.0]]), "index 0 has NaN or Inf"),
])
def test_bad_matrices_raise_naming_the_index(matrix, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        singular_values_many([matrix])


def test_nonfinite_matrix_is_named_among_many(torch_threads, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spectrum, "_POOL_MIN_WORK", 0)  # through the thread pool
    matrices = [np.ones((120, 100)) for _ in range(6)]
    matrices[4] = matrices[4].copy()
    matrices[4][3, 3] = np.nan
    torch_threads(2)
    with pytest.raises(ValueError, match="index 4 has NaN"):
        singular_values_many(matrices)


@pytest.mark.parametrize("method", ROUTES)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_entry_in_a_batch_is_named(method: str, bad: float) -> None:
    matrices = [np.ones((6, 4), dtype=np.float32) for _ in range(10)]
    matrices[7][5, 2] = bad
    with pytest.raises(ValueError, match="index 7 has NaN or Inf"):
        singular_values_many(matrices, method=method)


def test_bad_method_raises() -> None:
    with pytest.raises(ValueError, match="The 'method' parameter of singular_values_many must be one of"):
        singular_values_many([np.eye(2)], method="lanczos")  # type: ignore[arg-type]


def test_auto_takes_the_gram_route() -> None:
    for shape in [(1536, 576), (576, 1536), (576, 576), (49152, 576), (1, 7), (3, 3)]:
        assert spectrum._auto_route(*shape, "cpu") == "gram"
        assert spectrum._auto_route(*shape, "cuda") == "gram"


# -- the single-matrix functions the recorder uses ------------------------------------------------------------

def decaying(seed: int, rows: int = 160, cols: int = 100) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, cols, generator=gen, dtype=torch.float64))
    sigma = 0.7 ** torch.arange(cols, dtype=torch.float64)
    return ((u * sigma) @ v.T).float()


def test_randomized_top_k_matches_exact_on_decaying_spectrum(seed: int) -> None:
    matrix = decaying(seed)
    exact = singular_values(matrix)
    top = singular_values(matrix, top_k=10)
    assert top.shape == (10,)
    torch.testing.assert_close(top, exact[:10], rtol=0, atol=1e-5 * float(exact[0]))
    u, s, v = top_singular_triplets(matrix, 5, exact=False)
    ue, se, ve = top_singular_triplets(matrix, 5, exact=True)
    torch.testing.assert_close(s, se, rtol=0, atol=1e-5 * float(se[0]))
    # singular vectors up to a joint sign flip
    torch.testing.assert_close((u * ue).sum(0).abs(), torch.ones(5), rtol=0, atol=1e-3)
    torch.testing.assert_close((v * ve).sum(0).abs(), torch.ones(5), rtol=0, atol=1e-3)
    torch.testing.assert_close((u * ue).sum(0).sign(), (v * ve).sum(0).sign())


def test_single_matrix_full_spectrum_matches_many(seed: int) -> None:
    matrix = decaying(seed, 120, 80)
    (many,) = singular_values_many([matrix])
    np.testing.assert_allclose(singular_values(matrix).double().numpy(), many, rtol=0, atol=1e-5 * many[0])


# -- fuzzing ---------------------------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.integers(0, 48), cols=st.integers(0, 48), rank=st.integers(0, 48), dtype=st.sampled_from(["f4", "f8"]),
       log_scale=st.floats(-6, 6), method=st.sampled_from(ROUTES), seed=st.integers(0, 2**32 - 1))
def test_fuzzed_shapes_meet_the_contract(rows: int, cols: int, rank: int, dtype: str, log_scale: float, method: str,
                                         seed: int) -> None:
    rng = np.random.default_rng(seed)
    rank = min(rank, rows, cols)
    matrix = (10.0 ** log_scale * rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, cols)))
    matrix = matrix.astype(dtype)
    (s,) = singular_values_many([matrix], method=method)
    assert_matches_reference(s, matrix)
    if matrix.size:
        assert_invariants(s, matrix)
    else:
        assert s.shape == (0,)
