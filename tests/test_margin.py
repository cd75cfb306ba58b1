"""md_lsm_margin against scikit-learn's hard-margin SVC and a 2-D brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.svm import SVC

import lsm_train as lt
from lsm_train.measures.margin import MarginResult, md_lsm_margin


def brute_force_gap_2d(A: np.ndarray, B: np.ndarray) -> float:
    """max over unit u of min_a u·a − max_b u·b (= the hull distance when > 0), swept over
    the directions where that maximum can sit: normals to pairwise differences and a − b."""
    pts = np.vstack([A, B])
    diffs = (pts[:, None] - pts[None]).reshape(-1, 2)
    normals = diffs @ np.array([[0.0, 1.0], [-1.0, 0.0]])
    cands = np.vstack([normals, (A[:, None] - B[None]).reshape(-1, 2)])
    cands = cands[np.linalg.norm(cands, axis=1) > 0]
    cands /= np.linalg.norm(cands, axis=1, keepdims=True)
    return float(((A @ cands.T).min(0) - (B @ cands.T).max(0)).max())


def svc_margin(A: np.ndarray, B: np.ndarray) -> float:
    """Hull distance from a hard-margin linear SVM: 2 / ||w||."""
    X = np.vstack([A, B])
    y = np.r_[np.ones(len(A)), -np.ones(len(B))]
    svc = SVC(kernel="linear", C=1e10, tol=1e-9).fit(X, y)
    return 2.0 / float(np.linalg.norm(svc.coef_[0]))


def separable_pair(seed: int, n: int = 80, d: int = 10, gap: float = 0.2):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(d)
    w /= np.linalg.norm(w)
    X = rng.standard_normal((8 * n, d)) * rng.uniform(0.5, 3.0, size=d)
    s = X @ w
    return X[s > gap][:n], X[s < -gap][:n]


@pytest.mark.parametrize(
    ("seed", "n", "d", "gap"),
    [(0, 60, 2, 0.1), (1, 100, 5, 0.3), (2, 150, 20, 0.05), (3, 200, 40, 0.5), (4, 30, 60, 0.0)],
)
def test_matches_hard_margin_svc(seed, n, d, gap):
    A, B = separable_pair(seed, n, d, gap)
    ref = svc_margin(A, B)
    res = md_lsm_margin(A, B, return_bounds=True)
    assert res.value == pytest.approx(ref, rel=1e-3)
    assert res.lower <= res.value <= res.upper
    assert res.upper - res.lower <= 1e-4 * res.upper * (1 + 1e-9)
    # SVC's own solution is accurate to ~1e-6 relative only
    assert res.lower <= ref * (1 + 1e-5) and ref <= res.upper * (1 + 1e-5)


@pytest.mark.parametrize("seed", range(8))
def test_matches_brute_force_hull_distance_in_2d(seed):
    rng = np.random.default_rng(100 + seed)
    A = rng.standard_normal((rng.integers(1, 7), 2))
    B = rng.standard_normal((rng.integers(1, 7), 2)) + rng.standard_normal(2) * 3
    gap = brute_force_gap_2d(A, B)  # = hull distance when > 0
    if abs(gap) < 1e-9:
        pytest.skip("degenerate draw")
    res = md_lsm_margin(A, B, return_bounds=True)
    if gap > 0:
        assert res.value == pytest.approx(gap, rel=1e-4)
        assert res.lower <= gap * (1 + 1e-9) and gap <= res.upper * (1 + 1e-9)
    else:
        assert res.value == 0.0 and res.lower == 0.0 and res.upper == 0.0 and res.w is None


def test_direction_certifies_the_lower_bound():
    A, B = separable_pair(5, 120, 8, 0.2)
    res = md_lsm_margin(A, B, return_bounds=True)
    assert isinstance(res, MarginResult)
    assert np.linalg.norm(res.w) == pytest.approx(1.0)
    assert (A @ res.w).min() - (B @ res.w).max() >= res.lower * (1 - 1e-9)
    assert res.iterations >= 1
    with pytest.raises(AttributeError):  # frozen
        res.value = 1.0


@pytest.mark.parametrize(
    ("A", "B"),
    [
        (np.array([[0.0, 0.0], [1.0, 1.0]]), np.array([[0.0, 1.0], [1.0, 0.0]])),  # XOR
        (np.array([[0.0, 0.0], [2.0, 0.0]]), np.array([[1.0, 0.0], [1.0, 1.0]])),  # touching
        (np.array([[1.0, 2.0, 3.0]]), np.array([[1.0, 2.0, 3.0]])),  # same point
        (np.array([[0.0], [2.0]]), np.array([[1.0]])),  # 1-D, inside
        (  # a shared point: separate BLAS calls may round its two scores differently
            np.array([[2.0, -3.0]]),
            np.array([[-1.0, 1.0], [2.0, -3.0], [-3.0, 4.0], [-3.0, 4.0]]),
        ),
    ],
)
def test_exactly_zero_when_not_strictly_separable(A, B):
    assert md_lsm_margin(A, B) == 0.0
    res = md_lsm_margin(A, B, return_bounds=True)
    assert (res.value, res.lower, res.upper, res.w) == (0.0, 0.0, 0.0, None)


def test_exactly_zero_on_overlapping_clouds():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((300, 20))
    B = rng.standard_normal((300, 20)) + 0.2  # 600 points in 20-D: heavily overlapping
    assert md_lsm_margin(A, B) == 0.0
    assert not lt.separability_test(A, B).separable


@pytest.mark.parametrize("seed", range(4))
def test_exactly_zero_when_far_apart_sets_share_one_point(seed):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((40, 30)) * rng.uniform(0.1, 100)
    B = rng.standard_normal((40, 30)) * 3 + 50.0
    assert md_lsm_margin(A, B) > 0
    B[int(rng.integers(40))] = A[int(rng.integers(40))]
    assert md_lsm_margin(A, B) == 0.0
    assert md_lsm_margin(B, A) == 0.0


def test_zero_iff_separability_test_says_not_separable():
    rng = np.random.default_rng(7)
    for _ in range(25):
        d = int(rng.integers(1, 4))
        A = rng.standard_normal((rng.integers(1, 8), d))
        B = rng.standard_normal((rng.integers(1, 8), d)) + rng.standard_normal(d) * 2
        sep = lt.separability_test(A, B).separable
        assert (md_lsm_margin(A, B) > 0) == sep


def test_all_points_equal_and_tiny_positive_margin():
    assert md_lsm_margin(np.ones((3, 2)), np.ones((2, 2))) == 0.0
    A = np.array([[0.0, 0.0], [0.0, 1.0]])
    B = np.array([[1e-6, 0.0], [1e-6, 1.0]])
    assert md_lsm_margin(A, B) == pytest.approx(1e-6, rel=1e-6)


def test_few_iterations_still_give_valid_bounds():
    A, B = separable_pair(9, 150, 30, 0.05)
    ref = svc_margin(A, B)
    res = md_lsm_margin(A, B, max_iter=1, return_bounds=True)
    assert 0.0 < res.lower <= ref * (1 + 1e-5) and ref <= res.upper * (1 + 1e-5)
    loose = md_lsm_margin(A, B, tol=0.5, return_bounds=True)
    assert loose.upper - loose.lower <= 0.5 * loose.upper
    assert loose.lower <= ref * (1 + 1e-5) and ref <= loose.upper * (1 + 1e-5)


def test_torch_numpy_float32_agree():
    A, B = separable_pair(11, 60, 6, 0.3)
    ref = md_lsm_margin(A, B)
    ta, tb = torch.from_numpy(A), torch.from_numpy(B)
    assert md_lsm_margin(ta, tb) == pytest.approx(ref, rel=1e-9)
    assert md_lsm_margin(ta.float(), tb.float()) == pytest.approx(ref, rel=1e-5)
    res = md_lsm_margin(ta, tb, return_bounds=True)
    assert isinstance(res.w, torch.Tensor) and res.w.dtype == torch.float64
    assert lt.md_lsm_margin(A.tolist(), B.tolist()) == pytest.approx(ref, rel=1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors():
    A, B = separable_pair(12, 60, 6, 0.3)
    res = md_lsm_margin(torch.from_numpy(A).cuda(), torch.from_numpy(B).cuda(), return_bounds=True)
    assert res.value == pytest.approx(md_lsm_margin(A, B), rel=1e-9)
    assert res.w.device.type == "cuda"


@pytest.mark.parametrize(
    ("A", "B", "kw", "match"),
    [
        (np.zeros((0, 3)), np.ones((2, 3)), {}, "empty"),
        (np.ones((2, 3)), np.ones((2, 4)), {}, "same dimension"),
        (np.array([[np.nan, 1.0]]), np.ones((2, 2)), {}, "finite"),
        (np.ones(3), np.ones((2, 3)), {}, "2-D"),
        (np.ones((2, 2)), np.ones((2, 2)), {"tol": 0.0}, "tol"),
        (np.ones((2, 2)), np.ones((2, 2)), {"tol": float("nan")}, "tol"),
        (np.ones((2, 2)), np.ones((2, 2)), {"max_iter": 0}, "max_iter"),
        (np.ones((2, 2)), np.ones((2, 2)), {"max_iter": 2.5}, "max_iter"),
    ],
)
def test_bad_inputs_raise_value_error(A, B, kw, match):
    with pytest.raises(ValueError, match=match):
        md_lsm_margin(A, B, **kw)


# ----- properties: symmetry, translation invariance, positive homogeneity
spec = st.tuples(st.integers(1, 8), st.integers(1, 8), st.integers(1, 6), st.integers(0, 10**6))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec, st.floats(0.01, 100.0))
def test_symmetry_translation_and_scaling(s, c):
    n_a, n_b, d, seed = s
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n_a, d))
    B = rng.standard_normal((n_b, d)) + rng.uniform(0, 4) * rng.standard_normal(d)
    m = md_lsm_margin(A, B)
    if 0 < m < 1e-6:
        return  # too close to touching for a relative comparison
    t = rng.standard_normal(d) * 5
    rel = 1e-3
    assert md_lsm_margin(B, A) == pytest.approx(m, rel=rel, abs=1e-9)
    assert md_lsm_margin(A + t, B + t) == pytest.approx(m, rel=rel, abs=1e-9)
    assert md_lsm_margin(c * A, c * B) == pytest.approx(c * m, rel=rel, abs=1e-9)


def test_random_sets_with_ties_offsets_and_shared_points():
    rng = np.random.default_rng(5)
    for _ in range(40):
        d = int(rng.integers(1, 25))
        A = rng.standard_normal((rng.integers(1, 40), d))
        shift = rng.uniform(0, 3) * rng.standard_normal(d)
        B = rng.standard_normal((rng.integers(1, 40), d)) + shift
        if rng.random() < 0.3:
            A, B = np.round(A), np.round(B)  # duplicates and ties
        if rng.random() < 0.15:
            B = np.vstack([B, A[:1]])
        if rng.random() < 0.3:
            A, B = A * 1e3 + 1e4, B * 1e3 + 1e4
        res = md_lsm_margin(A, B, return_bounds=True)
        assert (res.value > 0) == lt.separability_test(A, B).separable
        assert res.lower <= res.value <= res.upper
        if res.value > 0:
            assert (A @ res.w).min() - (B @ res.w).max() >= res.lower * (1 - 1e-9)


@pytest.mark.parametrize("batch", [4, 16])
def test_small_working_set_grows_by_column_generation(monkeypatch, batch):
    """Sets larger than the working set (2,048 rows per side by default): the rows outside
    it join only through the full checks; results must not change."""
    import functools

    import lsm_train.measures.margin as margin

    monkeypatch.setattr(margin, "_wolfe", functools.partial(margin._wolfe, batch=batch))
    A, B = separable_pair(13, 150, 12, 0.1)
    ref = svc_margin(A, B)
    res = margin.md_lsm_margin(torch.from_numpy(A), torch.from_numpy(B), return_bounds=True)
    assert res.value == pytest.approx(ref, rel=1e-3)
    assert res.lower <= ref * (1 + 1e-5) and ref <= res.upper * (1 + 1e-5)
    assert (A @ res.w.numpy()).min() - (B @ res.w.numpy()).max() >= res.lower * (1 - 1e-9)
    rng = np.random.default_rng(3)
    assert margin.md_lsm_margin(rng.standard_normal((100, 8)), rng.standard_normal((90, 8))) == 0.0
