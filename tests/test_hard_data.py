"""The CPU benchmarks of lsm_train.hard_data: determinism, shapes, the teacher's labels,
the label-noise rate, the small-data counts, config errors, and the Hydra wiring."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from lsm_train.data import load_data
from lsm_train.hard_data import flip_labels, teacher_network

SMALL_TEACHER = dict(n_train=600, n_test=400, dim=7, num_classes=5, teacher_depth=3,
                     teacher_width=16)


def numpy_teacher_labels(net: torch.nn.Sequential, x: np.ndarray) -> tuple[np.ndarray, ...]:
    """The teacher's argmax recomputed in float64 numpy from its weights, and the sorted
    logits (to skip near-ties, where float32 and float64 may disagree)."""
    linears = [m for m in net if isinstance(m, torch.nn.Linear)]
    h = x.astype(np.float64)
    for i, lin in enumerate(linears):
        h = h @ lin.weight.double().numpy().T + lin.bias.double().numpy()
        if i < len(linears) - 1:
            h = np.maximum(h, 0.0)
    return h.argmax(1), np.sort(h, axis=1)


@pytest.mark.parametrize("name,kw", [
    ("teacher", SMALL_TEACHER),
    ("teacher", dict(SMALL_TEACHER, label_noise=0.3)),
    ("digits_noisy", dict(label_noise=0.3)),
    ("digits_small", dict(per_class=12)),
])
def test_deterministic_under_seed(name, kw):
    a, b = load_data(name, **kw), load_data(name, **kw)
    for split in ("train", "test"):
        assert torch.equal(getattr(a, split).x, getattr(b, split).x)
        assert torch.equal(getattr(a, split).y, getattr(b, split).y)
    seed_key = {"teacher": "seed", "digits_noisy": "noise_seed", "digits_small": "split_seed"}
    c = load_data(name, **{**kw, seed_key[name]: 1})
    assert not torch.equal(a.train.y, c.train.y) or not torch.equal(a.train.x, c.train.x)


def test_teacher_shapes_and_bundle_facts():
    b = load_data("teacher", **SMALL_TEACHER)
    assert b.name == "teacher" and b.num_classes == 5
    assert (b.in_channels, b.image_size) == (7, 1)
    assert b.train.x.shape == (600, 7) and b.test.x.shape == (400, 7)
    assert b.train.x.dtype == torch.float32 and b.train.y.dtype == torch.int64
    assert int(b.train.y.max()) < 5 and int(b.train.y.min()) >= 0
    # standard normal inputs: mean 0, variance 1 within many standard errors
    x = torch.cat([b.train.x, b.test.x])
    assert float(x.mean().abs()) < 6 / math.sqrt(x.numel())
    assert abs(float(x.var()) - 1.0) < 6 * math.sqrt(2 / x.numel())
    limited = load_data("teacher", limit_train=50, **SMALL_TEACHER)
    assert len(limited.train) == 50


@pytest.mark.parametrize("seed", [0, 3])
def test_teacher_labels_are_the_teachers_argmax(seed):
    kw = dict(SMALL_TEACHER, seed=seed)
    b = load_data("teacher", **kw)
    net = teacher_network(7, 5, depth=3, width=16, seed=seed)
    for split in (b.train, b.test):  # no label noise: both splits are the teacher's labels
        labels, sorted_logits = numpy_teacher_labels(net, split.x.numpy())
        clear = (sorted_logits[:, -1] - sorted_logits[:, -2]) > 1e-4  # ties: float32 vs 64
        assert clear.mean() > 0.99
        np.testing.assert_array_equal(split.y.numpy()[clear], labels[clear])
    # every class occurs: the teacher is not degenerate
    assert torch.bincount(b.test.y, minlength=5).min() > 0


def test_teacher_hidden_layers_are_relu_with_he_scale():
    net = teacher_network(20, 10, depth=2, width=64, seed=0)
    kinds = [type(m).__name__ for m in net]
    assert kinds == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert not any(p.requires_grad for p in net.parameters())
    w0 = net[0].weight
    assert w0.shape == (64, 20)
    assert abs(float(w0.std()) - math.sqrt(2 / 20)) < 0.1 * math.sqrt(2 / 20)


def test_teacher_label_noise_only_on_train():
    clean = load_data("teacher", **SMALL_TEACHER)
    noisy = load_data("teacher", **dict(SMALL_TEACHER, label_noise=0.4))
    assert torch.equal(clean.train.x, noisy.train.x) and torch.equal(clean.test.y, noisy.test.y)
    rate = float((clean.train.y != noisy.train.y).float().mean())
    assert abs(rate - 0.4) < 6 * math.sqrt(0.4 * 0.6 / 600)


@pytest.mark.parametrize("rate,classes", [(0.0, 10), (0.2, 10), (0.5, 3), (0.9, 2)])
def test_flip_rate_is_the_requested_fraction(rate, classes):
    n = 200_000
    y = torch.arange(n) % classes
    noisy = flip_labels(y, rate, classes, seed=7)
    wrong = noisy != y
    se = math.sqrt(max(rate * (1 - rate), 1e-12) / n)
    assert abs(float(wrong.float().mean()) - rate) < 6 * se + 1e-12
    assert int(noisy.min()) >= 0 and int(noisy.max()) < classes
    if rate > 0:  # symmetric: a wrong label is uniform over the other classes
        shifts = ((noisy - y) % classes)[wrong]
        freq = torch.bincount(shifts, minlength=classes)[1:].float() / wrong.sum()
        p = 1 / (classes - 1)
        assert float((freq - p).abs().max()) <= 6 * math.sqrt(p * (1 - p) / int(wrong.sum()))


def test_noisy_digits_change_train_labels_only():
    clean = load_data("digits")
    noisy = load_data("digits_noisy", label_noise=0.3, noise_seed=2)
    assert noisy.name == "digits_noisy"
    assert torch.equal(clean.train.x, noisy.train.x)
    assert torch.equal(clean.test.x, noisy.test.x) and torch.equal(clean.test.y, noisy.test.y)
    rate = float((clean.train.y != noisy.train.y).float().mean())
    n = len(clean.train)
    assert abs(rate - 0.3) < 6 * math.sqrt(0.3 * 0.7 / n)
    assert torch.equal(load_data("digits_noisy", label_noise=0.0).train.y, clean.train.y)


@pytest.mark.parametrize("per_class", [10, 20])
def test_small_digits_counts_and_provenance(per_class):
    full = load_data("digits")
    small = load_data("digits_small", per_class=per_class)
    assert len(small.train) == 10 * per_class
    assert torch.bincount(small.train.y, minlength=10).tolist() == [per_class] * 10
    assert torch.equal(small.test.x, full.test.x) and torch.equal(small.test.y, full.test.y)
    # every kept image is a training image of the full split with the same label
    key = {tuple(np.round(x.flatten().numpy(), 5)): int(y) for x, y in
           zip(full.train.x, full.train.y, strict=True)}
    for x, y in zip(small.train.x, small.train.y, strict=True):
        assert key[tuple(np.round(x.flatten().numpy(), 5))] == int(y)
    # nested: the 10-per-class set is inside the 20-per-class set
    if per_class == 20:
        ten = load_data("digits_small", per_class=10)
        rows = {tuple(x.flatten().tolist()) for x in small.train.x}
        assert all(tuple(x.flatten().tolist()) in rows for x in ten.train.x)
    assert small.train.x.shape[1:] == (1, 8, 8)
    assert len(load_digits().target) == len(full.train) + len(full.test)


@pytest.mark.parametrize("name,kw,match", [
    ("teacher", dict(dim=0), r"data.dim: expected an integer >= 1, got 0"),
    ("teacher", dict(num_classes=1), r"data.num_classes: expected an integer >= 2"),
    ("teacher", dict(teacher_depth=0), r"data.teacher_depth"),
    ("teacher", dict(teacher_width=2.5), r"data.teacher_width"),
    ("teacher", dict(label_noise=1.0), r"data.label_noise: expected a fraction in \[0, 1\)"),
    ("teacher", dict(label_noise=-0.1), r"data.label_noise"),
    ("teacher", dict(n_train=0), r"data.n_train"),
    ("teacher", dict(seed=True), r"data.seed"),
    ("teacher", dict(widht=3), r"data=teacher: unknown option\(s\) \['widht'\]; accepted"),
    ("digits_noisy", dict(label_noise="0.2"), r"data.label_noise"),
    ("digits_noisy", dict(per_class=3), r"unknown option\(s\) \['per_class'\]"),
    ("digits_small", dict(per_class=0), r"data.per_class: expected an integer >= 1"),
    ("digits_small", dict(per_class=500), r"expected at most \d+ \(the smallest class"),
    ("digits_small", dict(label_noise=0.1), r"unknown option"),
])
def test_bad_config_raises_a_clear_value_error(name, kw, match):
    with pytest.raises(ValueError, match=match):
        load_data(name, **kw)


@pytest.mark.parametrize("recipe,data", [
    ("bench/teacher-mlp", "teacher"),
    ("bench/digits-noisy-mlp", "digits_noisy"),
    ("bench/digits-small-mlp", "digits_small"),
])
def test_recipes_compose_and_train_a_few_steps(recipe, data, tmp_path):
    from lsm_train.app import compose, train_from_config

    cfg = compose([f"recipe={recipe}", "logger=none", "trainer.max_steps=3",
                   "trainer.progress=false", "trainer.plots=false", "trainer.checkpoint=false"])
    assert cfg.data.name == data and cfg.lsm.mode == "off"
    if data == "teacher":
        cfg.data.n_train, cfg.data.n_test = 300, 200
    result = train_from_config(cfg, tmp_path, recipe=recipe)
    assert result.status == "completed" and result.step == 3
    assert 0.0 <= result.final["val/acc"] <= 1.0
