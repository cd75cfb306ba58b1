"""The shared argument checks of lsm_train._validation: one home for option constants."""

import numpy as np
import pytest

from lsm_train import _validation as v


@pytest.mark.parametrize("value", [0, 3, np.int64(7), np.int32(2)])
def test_check_int_accepts_integers(value):
    assert v.check_int(value, "n", 0) == int(value)
    assert type(v.check_int(value, "n", 0)) is int


@pytest.mark.parametrize("value", [True, np.bool_(True), 2.0, "3", None, 1.5])
def test_check_int_refuses_non_integers(value):
    with pytest.raises(ValueError, match=r"n: expected an integer >= 0, got"):
        v.check_int(value, "n", 0)


def test_check_int_minimum_and_integral_floats():
    with pytest.raises(ValueError, match=r"k: expected an integer >= 2, got 1"):
        v.check_int(1, "k", 2)
    assert v.check_int(4.0, "k", 1, integral_float=True) == 4
    for bad in (4.5, float("nan"), float("inf"), 0.0):
        with pytest.raises(ValueError, match="k: expected an integer >= 1"):
            v.check_int(bad, "k", 1, integral_float=True)


def test_check_unit_closed_interval():
    assert v.check_unit(0, "s") == 0.0 and v.check_unit(1, "s") == 1.0
    for bad in (-0.01, 1.01, "x", None, float("nan")):
        with pytest.raises(ValueError, match=r"s: expected a number in \[0, 1\]"):
            v.check_unit(bad, "s")


def test_check_choice_and_scheme():
    assert v.check_scheme("ovr") == "ovr"
    with pytest.raises(ValueError, match=r"scheme: expected one of \('pairwise', 'ovr'\)"):
        v.check_scheme("ovo")
    with pytest.raises(ValueError, match=r"mode: expected one of \('a', 'b'\), got 'c'"):
        v.check_choice("c", "mode", ("a", "b"))


def test_one_definition_of_the_schemes():
    from lsm_train import config_check
    from lsm_train.measures import layer, soft

    assert soft.SCHEMES is v.SCHEMES and layer.SCHEMES is v.SCHEMES
    assert config_check.SCHEMES is v.SCHEMES


def test_check_points_large_finite_values_pass_and_non_finite_are_found():
    import torch

    big = torch.full((4, 3), 3e38)  # the float32 sum overflows; every entry is finite
    assert v.check_points(big, "H").shape == (4, 3)
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.ones(4, 3)
        x[2, 1] = bad
        with pytest.raises(ValueError, match=r"H: expected finite values, .* in 1 row"):
            v.check_points(x, "H")
