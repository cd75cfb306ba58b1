"""The hard-pair layer score (mean of the worst k problem values) against references: numpy
sorting of the values, the exact 2-D degree by brute force, every method, edge cases and
bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _references import brute_degree_2d

import lsm_train as lt
from lsm_train.measures.hard_pairs import default_worst_k, worst_k_mean


def blobs(n_per, k, d, spread, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * spread
    y = np.repeat(np.arange(k), n_per)
    return rng.normal(size=(k * n_per, d)) + centers[y], y


def numpy_worst(values, k):
    return float(np.mean(np.sort(np.asarray(values, float))[:k]))


@pytest.mark.parametrize(("n", "k"), [(1, 1), (3, 1), (10, 1), (11, 2), (45, 5), (4950, 495)])
def test_default_k_is_the_worst_decile(n, k):
    assert default_worst_k(n) == k == max(1, math.ceil(n / 10))


@pytest.mark.parametrize("k", [1, 2, 5, 7])
def test_worst_k_is_the_mean_of_the_k_smallest(k):
    rng = np.random.default_rng(k)
    values = rng.uniform(0.5, 1.0, size=7)
    expected = numpy_worst(values, k)
    assert lt.hard_pair_score(values, k) == pytest.approx(expected, abs=1e-15)
    assert lt.hard_pair_score(list(values), k) == pytest.approx(expected, abs=1e-15)
    mapping = {(i, i + 1): float(v) for i, v in enumerate(values)}
    assert lt.hard_pair_score(mapping, k) == pytest.approx(expected, abs=1e-15)
    assert lt.hard_pair_score({"pairs": mapping, "method": "degree"}, k) == pytest.approx(
        expected, abs=1e-15)


def test_k_at_least_the_number_of_problems_is_the_mean_and_k1_the_min():
    values = [0.9, 0.6, 0.99, 0.75]
    assert lt.hard_pair_score(values, 4) == pytest.approx(np.mean(values), abs=1e-15)
    assert lt.hard_pair_score(values, 100) == pytest.approx(np.mean(values), abs=1e-15)
    assert lt.hard_pair_score(values, 1) == 0.6
    assert lt.hard_pair_score([0.8]) == 0.8  # K=2: one pair, the score is that pair


def test_nan_value_gives_nan_and_ties_are_fine():
    assert math.isnan(lt.hard_pair_score([0.9, float("nan"), 0.7], 1))
    assert math.isnan(lt.hard_pair_score([0.9, float("nan"), 0.7], 3))
    assert lt.hard_pair_score([0.7, 0.7, 0.7, 1.0], 2) == 0.7


def test_tensor_rows_stay_on_device_and_match_numpy():
    g = torch.Generator().manual_seed(0)
    T = torch.rand(3, 45, generator=g, dtype=torch.float64)
    T[1, 7] = float("nan")
    out = lt.hard_pair_score(T)
    assert isinstance(out, torch.Tensor) and out.shape == (3,)
    for row in (0, 2):
        assert float(out[row]) == pytest.approx(numpy_worst(T[row].numpy(), 5), abs=1e-15)
    assert math.isnan(float(out[1]))
    assert worst_k_mean(torch.tensor([1, 3, 2]), 2).item() == 1.5  # integer input promoted


@pytest.mark.parametrize("scheme", ["pairwise", "ovr"])
def test_layer_worst_is_bounded_by_the_exact_2d_worst_pairs(scheme):
    """In-sample degree values are exact AUCs of directions: each lies in [exact − 0.03,
    exact], so the mean of the k smallest lies in the same band around the mean of the k
    smallest exact (brute-force) degrees."""
    H, y = blobs(20, 5, 2, 1.5, seed=4)
    _, det = lt.layer_separability(H, y, scheme=scheme, return_details=True)
    exact = []
    for key in det["pairs"]:
        A = H[y == key[0]]
        B = H[y == key[1]] if scheme == "pairwise" else H[y != key[0]]
        exact.append(brute_degree_2d(A, B))
    for k in (None, 1, 3):
        score, d2 = lt.layer_separability(H, y, scheme=scheme, aggregate="worst", worst_k=k,
                                          return_details=True)
        kk = default_worst_k(len(exact)) if k is None else k
        assert d2["worst_k"] == kk and d2["aggregate"] == "worst"
        ref = numpy_worst(exact, kk)
        assert ref - 0.03 <= score <= ref + 1e-12, (k, score, ref)
        assert score == pytest.approx(numpy_worst(list(d2["pairs"].values()), kk), abs=1e-15)
    assert np.mean(exact) > numpy_worst(exact, 2) + 0.02  # the data has hard and easy pairs


@pytest.mark.parametrize(("method", "holdout"), [("degree", 0.5), ("fisher", 0.5),
                                                 ("fisher", None), ("margin", None),
                                                 ("soft", None)])
def test_every_method_aggregates_its_own_problem_values(method, holdout):
    H, y = blobs(15, 4, 5, 1.0, seed=5)
    mean, det = lt.layer_separability(H, y, method=method, holdout=holdout,
                                      return_details=True)
    assert det["aggregate"] == "mean" and det["worst_k"] is None
    values = list(det["pairs"].values())
    worst = lt.layer_separability(H, y, method=method, holdout=holdout, aggregate="worst",
                                  worst_k=2)
    assert worst == pytest.approx(numpy_worst(values, 2), abs=1e-12)
    assert worst == pytest.approx(lt.hard_pair_score(det, 2), abs=1e-15)
    assert worst <= mean + 1e-12 or method == "soft"  # soft's mean is the joint surrogate
    everything = lt.layer_separability(H, y, method=method, holdout=holdout,
                                       aggregate="worst", worst_k=len(values))
    assert everything == pytest.approx(np.mean(values), abs=1e-12)


def test_two_classes_worst_equals_mean_and_skipped_classes_are_left_out():
    H, y = blobs(12, 2, 3, 1.0, seed=6)
    assert lt.layer_separability(H, y, aggregate="worst") == lt.layer_separability(H, y)
    H3, y3 = blobs(10, 4, 3, 1.0, seed=7)
    H3, y3 = np.vstack([H3, np.zeros((1, 3))]), np.r_[y3, 9]  # class 9: one sample
    with pytest.warns(UserWarning, match="fewer than 2"):
        score, det = lt.layer_separability(H3, y3, holdout=0.5, aggregate="worst",
                                           worst_k=2, return_details=True)
    assert det["skipped"] == [9] and len(det["pairs"]) == 6
    assert score == pytest.approx(numpy_worst(list(det["pairs"].values()), 2), abs=1e-15)


@pytest.mark.parametrize(
    ("values", "k", "error", "match"),
    [
        ([], None, ValueError, "at least one problem value"),
        ([0.5, 0.7], 0, ValueError, "k: expected an integer >= 1"),
        ([0.5, 0.7], 1.5, ValueError, "k: expected an integer >= 1"),
        ([0.5, 0.7], True, ValueError, "k: expected an integer >= 1"),
        ("0.5", None, TypeError, "sequence of numbers, got str"),
        (0.5, None, TypeError, "expected layer_separability details"),
        ([0.5, "a"], None, TypeError, "expected numbers"),
        ([[0.5, 0.6]], None, TypeError, "expected numbers"),
        ({"pairs": [0.5]}, None, TypeError, r"values\['pairs'\]: expected a mapping"),
        (torch.empty(2, 0), None, ValueError, "at least one problem value"),
    ],
)
def test_bad_input(values, k, error, match):
    with pytest.raises(error, match=match):
        lt.hard_pair_score(values, k)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"aggregate": "min"}, "aggregate: expected one of"),
        ({"aggregate": "worst", "worst_k": 0}, "k: expected an integer >= 1"),
        ({"worst_k": 3}, "worst_k: only used with aggregate='worst'"),
    ],
)
def test_layer_bad_aggregate(kw, match):
    with pytest.raises(ValueError, match=match):
        lt.layer_separability(np.eye(4), [0, 1, 0, 1], **kw)
