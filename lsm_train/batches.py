"""The training batches (docs: ``docs/app.md``).

:class:`TrainBatches`: batch ``b`` of epoch ``e`` is rows ``b·B .. (b+1)·B`` of
``epoch_order(n, seed, e)`` (under DDP, of this rank's ``shard_indices``), a pure function
of (seed, epoch, batch), so a resumed run sees exactly the batches of an uninterrupted one.
With ``data.augment`` the batch goes through :func:`augment_batch`, the usual CIFAR
augmentation (a random horizontal flip and a random ``pad``-pixel translation), drawn from
:func:`batch_generator`, seeded per (seed, epoch, batch, rank).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lsm_train import distributed as dist_utils
from lsm_train.data import ArrayDataset, epoch_order

__all__ = ["TrainBatches", "augment_batch", "batch_generator"]


def augment_batch(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random horizontal flip and random ``pad``-pixel translation (zero-padded crop) of a
    batch of images ``(B, C, H, W)``, drawn from ``gen``; other shapes are returned as is."""
    if x.ndim != 4:
        return x
    b, c, h, w = x.shape
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    xp = F.pad(x, (pad, pad, pad, pad))
    dy, dx = torch.randint(0, 2 * pad + 1, (2, b), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    bi = torch.arange(b)[:, None, None, None]
    ci = torch.arange(c)[None, :, None, None]
    return xp[bi, ci, rows, cols]


def batch_generator(seed: int, epoch: int, batch: int, rank: int = 0,
                    world_size: int = 1) -> torch.Generator:
    """The generator of the augmentation of batch ``batch`` of ``epoch`` on ``rank``."""
    return torch.Generator().manual_seed(
        ((seed * 1_000_003 + epoch) * 100_003 + batch) * world_size + rank)


class TrainBatches:
    """This rank's training batches (module doc)."""

    def __init__(self, data: ArrayDataset, batch_size: int, seed: int, *,
                 augment: bool = False, rank: int = 0, world_size: int = 1) -> None:
        self.data, self.batch_size, self.seed, self.augment = data, batch_size, seed, augment
        self.rank, self.world_size = rank, world_size
        self._order: tuple[int, torch.Tensor] | None = None  # (epoch, its sample order)

    def order(self, epoch: int) -> torch.Tensor:
        """Sample order of ``epoch``; under DDP this rank's shard of it."""
        order = epoch_order(len(self.data), self.seed, epoch)
        if self.world_size > 1:
            order = dist_utils.shard_indices(order, self.rank, self.world_size)
        return order

    def batch(self, epoch: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``b`` of ``epoch`` (on the host), augmented when configured."""
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, self.order(epoch))
        x, y = self.data.batch(self._order[1][b * self.batch_size:(b + 1) * self.batch_size])
        if self.augment:
            x = augment_batch(x, batch_generator(self.seed, epoch, b, self.rank, self.world_size))
        return x, y
