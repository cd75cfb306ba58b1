"""Vision Transformer (Dosovitskiy et al. 2021): patch embedding, class token, learned
position embeddings, pre-norm transformer blocks, linear head on the final class token.

The patch size is chosen from the image: ``patch_size = max(1, min(h, w) // grid)`` (a
``grid x grid`` token grid on square images: 2x2 patches at 8x8, 7x7 at 28x28, 8x8 at
32x32 with the default ``grid=4``), unless ``patch_size`` is given. Images whose sides are
not multiples of the patch size are zero-padded on the bottom/right.
Hidden layers: ``blocks.<i>``, each block's output token sequence (N, tokens, dim).

Variants: ``vit`` (dim 64, depth 3, 4 heads: CPU size) and ``vit_small`` (ViT-S: dim 384,
depth 12, 6 heads, an 8x8 token grid: 4x4 patches on CIFAR-10).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from lsm_train.models.registry import positive_int, register_model

__all__ = ["Block", "ViT", "vit", "vit_small"]


class Block(nn.Module):
    """x + MHSA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        hidden = max(1, int(dim * mlp_ratio))
        self.mlp = nn.Sequential(OrderedDict(
            fc1=nn.Linear(dim, hidden), act=nn.GELU(), drop=nn.Dropout(dropout),
            fc2=nn.Linear(hidden, dim),
        ))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(
        self, in_channels: int, num_classes: int, image_size: tuple[int, int],
        patch_size: int, dim: int, depth: int, heads: int, mlp_ratio: float, dropout: float,
    ):
        super().__init__()
        h, w = image_size
        self.patch_size = patch_size
        self.grid = (math.ceil(h / patch_size), math.ceil(w / patch_size))
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid[0] * self.grid[1], dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio, dropout) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.hidden_layers = [f"blocks.{i}" for i in range(depth)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        pad_h, pad_w = (-x.shape[-2]) % p, (-x.shape[-1]) % p
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (N, T, dim)
        if tokens.shape[1] + 1 != self.pos_embed.shape[1]:
            raise ValueError(
                f"ViT built for {self.grid[0]}x{self.grid[1]} patches of {p}px, got an input "
                f"of spatial size {tuple(x.shape[-2:])}"
            )
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        x = self.drop(torch.cat([cls, tokens], dim=1) + self.pos_embed)
        x = self.blocks(x)
        return self.head(self.norm(x[:, 0]))


def _build(num_classes, in_channels, image_size, patch_size, grid, dim, depth, heads,
           mlp_ratio, dropout) -> ViT:
    dim, heads = positive_int(dim, "dim"), positive_int(heads, "heads")
    if dim % heads:
        raise ValueError(f"dim={dim} must be divisible by heads={heads}")
    if patch_size is None:
        patch_size = max(1, min(image_size) // positive_int(grid, "grid"))
    patch_size = positive_int(patch_size, "patch_size")
    if patch_size > min(image_size):
        raise ValueError(f"patch_size={patch_size} exceeds the image size {image_size}")
    if not float(mlp_ratio) > 0:
        raise ValueError(f"mlp_ratio: expected a positive number, got {mlp_ratio!r}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
    return ViT(in_channels, num_classes, image_size, patch_size, dim,
               positive_int(depth, "depth"), heads, float(mlp_ratio), float(dropout))


@register_model
def vit(
    *, num_classes: int, in_channels: int, image_size: tuple[int, int],
    patch_size: int | None = None, grid: int = 4, dim: int = 64, depth: int = 3,
    heads: int = 4, mlp_ratio: float = 2.0, dropout: float = 0.0,
) -> ViT:
    """Small ViT; ``patch_size=None`` picks ``min(h, w) // grid``."""
    return _build(num_classes, in_channels, image_size, patch_size, grid, dim, depth, heads,
                  mlp_ratio, dropout)


@register_model
def vit_small(
    *, num_classes: int, in_channels: int, image_size: tuple[int, int],
    patch_size: int | None = None, grid: int = 8, dim: int = 384, depth: int = 12,
    heads: int = 6, mlp_ratio: float = 4.0, dropout: float = 0.0,
) -> ViT:
    """ViT-S/4-style model for 32x32 images (8x8 token grid)."""
    return _build(num_classes, in_channels, image_size, patch_size, grid, dim, depth, heads,
                  mlp_ratio, dropout)
