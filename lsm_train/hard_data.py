"""Benchmarks that are not saturated on a CPU: ``data=teacher``, ``digits_noisy``, ``digits_small``.

Each loader returns a :class:`~lsm_train.data.DataBundle` and is a pure function of its
config (same config, same tensors). Label noise touches the training labels only; the test
labels stay clean, so test accuracy measures the true task. See docs/models-training.md.

* ``teacher``: x ~ N(0, I_d); labels are the argmax of a frozen random ReLU network
  (:func:`teacher_network`: ``teacher_depth`` hidden layers of ``teacher_width`` units,
  He-normal weights, output biases centred so that the classes are roughly balanced).
  Vectors ``(n, d)`` (``in_channels = d``, ``image_size = 1``).
* ``digits_noisy``: :func:`~lsm_train.data.load_digits_data` with symmetric label noise:
  each training label is, with probability ``label_noise``, replaced by one of the other
  K - 1 classes drawn uniformly (so the expected fraction of wrong labels is
  ``label_noise``).
* ``digits_small``: the first ``per_class`` training images of every class in the digits
  split's seeded order (``10 * per_class`` images); the test split is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from lsm_train._validation import check_int

__all__ = [
    "teacher_network",
    "teacher_inputs",
    "flip_labels",
    "load_teacher",
    "load_noisy_digits",
    "load_small_digits",
    "HARD_DATASETS",
]

_CALIBRATION_SAMPLES = 20_000


def _int(value: Any, key: str, low: int) -> int:
    return check_int(value, f"data.{key}", low)


def _fraction(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"data.{key}: expected a fraction in [0, 1), got {value!r}")
    return float(value)


def _no_unknown(name: str, extra: dict[str, Any], accepted: list[str]) -> None:
    if extra:
        raise ValueError(
            f"data={name}: unknown option(s) {sorted(extra)}; accepted: {', '.join(accepted)} "
            "(plus batch_size, eval_batch_size, limit_train, limit_test)"
        )


def teacher_inputs(n: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` standard normal inputs of dimension ``dim``."""
    return torch.randn(n, dim, generator=generator)


@torch.no_grad()
def teacher_network(
    dim: int, num_classes: int, depth: int, width: int, seed: int
) -> nn.Sequential:
    """The frozen teacher: ``depth`` x (Linear -> ReLU) of ``width`` units, then Linear.

    Weights are He-normal (std sqrt(2 / fan_in); the output layer sqrt(1 / fan_in)), hidden
    biases zero. The output bias is minus the mean logit over a calibration sample of
    N(0, I) inputs, so no class starts out dominant. Parameters do not require grad.
    """
    g = torch.Generator().manual_seed(int(seed))
    layers: list[nn.Module] = []
    fan_in = dim
    for _ in range(depth):
        lin = nn.Linear(fan_in, width)
        lin.weight.copy_(torch.randn(width, fan_in, generator=g) * (2.0 / fan_in) ** 0.5)
        lin.bias.zero_()
        layers += [lin, nn.ReLU()]
        fan_in = width
    head = nn.Linear(fan_in, num_classes)
    head.weight.copy_(torch.randn(num_classes, fan_in, generator=g) * (1.0 / fan_in) ** 0.5)
    head.bias.zero_()
    layers.append(head)
    net = nn.Sequential(*layers).requires_grad_(False)
    calibration = teacher_inputs(_CALIBRATION_SAMPLES, dim, g)
    head.bias.copy_(-net(calibration).mean(0))
    return net


def flip_labels(y: torch.Tensor, rate: float, num_classes: int, seed: int) -> torch.Tensor:
    """Symmetric label noise: each label, with probability ``rate``, becomes one of the
    other ``num_classes - 1`` classes (uniformly). Returns a new tensor."""
    g = torch.Generator().manual_seed(int(seed))
    flip = torch.rand(y.shape[0], generator=g) < rate
    shift = torch.randint(1, num_classes, (y.shape[0],), generator=g)
    return torch.where(flip, (y + shift) % num_classes, y)


def load_teacher(
    *,
    n_train: int = 5000,
    n_test: int = 5000,
    dim: int = 20,
    num_classes: int = 10,
    teacher_depth: int = 2,
    teacher_width: int = 64,
    label_noise: float = 0.0,
    seed: int = 0,
    **extra: Any,
) -> Any:
    """The teacher task (module docstring); ``seed`` fixes the teacher, inputs and noise."""
    from lsm_train.data import ArrayDataset, DataBundle

    _no_unknown("teacher", extra, ["n_train", "n_test", "dim", "num_classes", "teacher_depth",
                                   "teacher_width", "label_noise", "seed"])
    n_train, n_test = _int(n_train, "n_train", 1), _int(n_test, "n_test", 1)
    dim, num_classes = _int(dim, "dim", 1), _int(num_classes, "num_classes", 2)
    depth = _int(teacher_depth, "teacher_depth", 1)
    width = _int(teacher_width, "teacher_width", 1)
    rate = _fraction(label_noise, "label_noise")
    seed = _int(seed, "seed", 0)
    net = teacher_network(dim, num_classes, depth, width, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x_tr, x_te = teacher_inputs(n_train, dim, g), teacher_inputs(n_test, dim, g)
    with torch.no_grad():
        y_tr, y_te = net(x_tr).argmax(1), net(x_te).argmax(1)
    y_tr = flip_labels(y_tr, rate, num_classes, seed + 2)
    return DataBundle("teacher", ArrayDataset(x_tr, y_tr), ArrayDataset(x_te, y_te),
                      num_classes=num_classes, in_channels=dim, image_size=1)


def load_noisy_digits(
    *, label_noise: float = 0.2, noise_seed: int = 0, test_fraction: float = 0.2,
    split_seed: int = 0, **extra: Any,
) -> Any:
    """Digits with symmetric noise on the training labels (module docstring)."""
    from lsm_train.data import ArrayDataset, load_digits_data

    _no_unknown("digits_noisy", extra,
                ["label_noise", "noise_seed", "test_fraction", "split_seed"])
    rate = _fraction(label_noise, "label_noise")
    bundle = load_digits_data(test_fraction=test_fraction, split_seed=split_seed)
    noisy = flip_labels(bundle.train.y, rate, bundle.num_classes, _int(noise_seed, "noise_seed", 0))
    bundle.train = ArrayDataset(bundle.train.x, noisy)
    bundle.name = "digits_noisy"
    return bundle


def load_small_digits(
    *, per_class: int = 10, test_fraction: float = 0.2, split_seed: int = 0, **extra: Any
) -> Any:
    """``per_class`` training images per digit (module docstring)."""
    from lsm_train.data import ArrayDataset, load_digits_data

    _no_unknown("digits_small", extra, ["per_class", "test_fraction", "split_seed"])
    k = _int(per_class, "per_class", 1)
    bundle = load_digits_data(test_fraction=test_fraction, split_seed=split_seed)
    y = bundle.train.y
    counts = torch.bincount(y, minlength=bundle.num_classes)
    if k > int(counts.min()):
        raise ValueError(
            f"data.per_class: expected at most {int(counts.min())} (the smallest class in the "
            f"digits training split), got {k}"
        )
    keep = torch.cat([torch.nonzero(y == c).flatten()[:k] for c in range(bundle.num_classes)])
    keep = keep.sort().values  # keep the split's interleaved order
    bundle.train = ArrayDataset(bundle.train.x[keep], y[keep])
    bundle.name = "digits_small"
    return bundle


HARD_DATASETS: dict[str, Callable[..., Any]] = {
    "teacher": load_teacher,
    "digits_noisy": load_noisy_digits,
    "digits_small": load_small_digits,
}
