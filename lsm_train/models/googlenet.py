"""GoogLeNet / Inception-v1 (Szegedy et al. 2015), CIFAR layout (3x3 stem, no auxiliary heads).

An inception module concatenates four branches, each ending in batchnorm + ReLU:
1x1; 1x1 -> 3x3; 1x1 -> 3x3 -> 3x3 (the "5x5" branch); 3x3 max pool -> 1x1.
The full network is stem, 3a, 3b, pool, 4a..4e, pool, 5a, 5b, global average pool, head;
``depth`` keeps the first ``depth`` of those 9 modules and ``width`` scales every branch
(channels ``max(1, round(c * width))``). 2x2 max pools are skipped once the map is 1 pixel;
inputs of 64 pixels or more get a stride-2 stem and pool.
Hidden layers: ``inception.<name>`` (e.g. ``inception.3a``), each module's concatenated
output (all branches are post-ReLU).

Defaults (``width=0.25, depth=3``) are the CPU size; GPU scale is ``width=1.0, depth=9``
(the usual CIFAR-10 GoogLeNet, 6.2M parameters).
"""

from __future__ import annotations

import math
import numbers
from collections import OrderedDict

import torch
import torch.nn as nn

from lsm_train.models.cnn import conv_block
from lsm_train.models.registry import positive_int, register_model

__all__ = ["Inception", "GoogLeNet", "googlenet"]

# name: (1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj); a pool precedes 4a and 5a.
CONFIG = OrderedDict([
    ("3a", (64, 96, 128, 16, 32, 32)),
    ("3b", (128, 128, 192, 32, 96, 64)),
    ("4a", (192, 96, 208, 16, 48, 64)),
    ("4b", (160, 112, 224, 24, 64, 64)),
    ("4c", (128, 128, 256, 24, 64, 64)),
    ("4d", (112, 144, 288, 32, 64, 64)),
    ("4e", (256, 160, 320, 32, 128, 128)),
    ("5a", (256, 160, 320, 32, 128, 128)),
    ("5b", (384, 192, 384, 48, 128, 128)),
])
STEM = 192


class Inception(nn.Module):
    def __init__(self, cin: int, n1: int, r3: int, n3: int, r5: int, n5: int, pp: int):
        super().__init__()
        self.b1 = conv_block(cin, n1, 1)
        self.b2 = nn.Sequential(conv_block(cin, r3, 1), conv_block(r3, n3, 3))
        self.b3 = nn.Sequential(conv_block(cin, r5, 1), conv_block(r5, n5, 3),
                                conv_block(n5, n5, 3))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_block(cin, pp, 1))
        self.out_channels = n1 + n3 + n5 + pp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], dim=1)


class GoogLeNet(nn.Module):
    def __init__(
        self, in_channels: int, num_classes: int, image_size: tuple[int, int],
        width: float, depth: int, dropout: float,
    ):
        super().__init__()
        h, w = image_size

        def ch(c: int) -> int:
            return max(1, round(c * width))

        if min(h, w) >= 64:
            self.stem = nn.Sequential(conv_block(in_channels, ch(STEM), 7, 2, padding=3),
                                      nn.MaxPool2d(3, 2, 1))
            h, w = (h + 3) // 4, (w + 3) // 4
        else:
            self.stem = conv_block(in_channels, ch(STEM), 3)
        mods: list[tuple[str, nn.Module]] = []
        self.hidden_layers: list[str] = []
        cin = ch(STEM)
        for name, cfg in list(CONFIG.items())[:depth]:
            if name in ("4a", "5a") and min(h, w) >= 2:
                mods.append((f"pool{name[0]}", nn.MaxPool2d(2, 2)))
                h, w = h // 2, w // 2
            block = Inception(cin, *(ch(c) for c in cfg))
            mods.append((name, block))
            self.hidden_layers.append(f"inception.{name}")
            cin = block.out_channels
        self.inception = nn.Sequential(OrderedDict(mods))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.flatten(self.pool(self.inception(self.stem(x))))))


@register_model
def googlenet(
    *, num_classes: int, in_channels: int, image_size: tuple[int, int],
    width: float = 0.25, depth: int = 3, dropout: float = 0.0,
) -> GoogLeNet:
    """GoogLeNet with the first ``depth`` (2..9) inception modules, branches scaled by ``width``."""
    depth = positive_int(depth, "depth")
    if not 2 <= depth <= len(CONFIG):
        raise ValueError(f"depth: expected 2..{len(CONFIG)} inception modules, got {depth}")
    if isinstance(width, bool) or not isinstance(width, numbers.Real) or not 0 < width < math.inf:
        raise ValueError(f"width: expected a positive number (branch scale), got {width!r}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
    return GoogLeNet(in_channels, num_classes, image_size, float(width), depth, float(dropout))
