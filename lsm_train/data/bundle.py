"""In-memory datasets of the trainer (user guide: docs/app.md#data).

:class:`ArrayDataset` holds features and int64 labels (uint8 images are normalised per
batch); :class:`DataBundle` is what every loader returns: train and test sets plus the
shape facts a model needs. :func:`epoch_order` makes batch order a pure function of
``(seed, epoch)``, so a resumed run sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["ArrayDataset", "DataBundle", "epoch_order", "stratified_order"]


@dataclass
class ArrayDataset:
    """Features ``x`` (float or uint8) and int64 labels ``y``.

    ``uint8`` images are converted per batch: ``(x / 255 - mean) / std`` per channel, so a
    60k-image set stays small in memory.
    """

    x: torch.Tensor
    y: torch.Tensor
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
            if self.mean is not None:
                shape = (1, -1) + (1,) * (x.ndim - 2)
                mean = torch.tensor(self.mean, dtype=x.dtype).view(shape)
                std = torch.tensor(self.std, dtype=x.dtype).view(shape)
                x = (x - mean) / std
        return x

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.prepare(self.x[idx]), self.y[idx]

    def subset(self, n: int | None) -> ArrayDataset:
        if n is None or n >= len(self):
            return self
        return ArrayDataset(self.x[:n], self.y[:n], self.mean, self.std)


@dataclass
class DataBundle:
    name: str
    train: ArrayDataset
    test: ArrayDataset
    num_classes: int
    in_channels: int
    image_size: int


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of ``range(n)`` used in ``epoch`` (a pure function of seed, epoch)."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n, generator=g)


def stratified_order(y: np.ndarray, seed: int) -> np.ndarray:
    """Interleave classes so that any prefix (``limit_train``) keeps every class."""
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(y == c)) for c in np.unique(y)]
    order = []
    for i in range(max(len(p) for p in per_class)):
        order.extend(int(p[i]) for p in per_class if i < len(p))
    return np.asarray(order)
