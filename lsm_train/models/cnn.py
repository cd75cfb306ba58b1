"""Plain CNN: [conv -> (batchnorm) -> activation -> (pool)] per entry of ``channels``,
then global average pooling, an optional hidden fully connected layer and a linear head.

Pooling (``"max"``, ``"avg"`` or ``"none"``, 2x2 stride 2) is applied after a block only
while the feature map is at least 2x2, so any input size works (8x8 digits included).
Hidden layers: ``blocks.<i>.act`` for every conv block and ``fc.act`` when ``fc_width``
is set.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn

from lsm_train._validation import check_choice
from lsm_train.models.mlp import make_activation
from lsm_train.models.registry import int_list, positive_int, register_model

__all__ = ["conv_block", "make_pool", "CNN", "cnn"]

POOLS = ("max", "avg", "none")


def conv_block(
    cin: int, cout: int, kernel_size: int = 3, stride: int = 1, *,
    batchnorm: bool = True, activation: str = "relu", padding: int | None = None,
) -> nn.Sequential:
    """conv -> (batchnorm) -> activation, with modules named ``conv``, ``bn``, ``act``."""
    pad = kernel_size // 2 if padding is None else padding
    layers: list[tuple[str, nn.Module]] = [
        ("conv", nn.Conv2d(cin, cout, kernel_size, stride, pad, bias=not batchnorm))
    ]
    if batchnorm:
        layers.append(("bn", nn.BatchNorm2d(cout)))
    layers.append(("act", make_activation(activation)))
    return nn.Sequential(OrderedDict(layers))


def make_pool(kind: str, kernel_size: int = 2, stride: int = 2) -> nn.Module:
    return nn.MaxPool2d(kernel_size, stride) if kind == "max" else nn.AvgPool2d(kernel_size, stride)


class CNN(nn.Module):
    def __init__(
        self, in_channels: int, num_classes: int, image_size: tuple[int, int],
        channels: list[int], kernel_size: int, batchnorm: bool, pool: str,
        activation: str, fc_width: int | None,
    ):
        super().__init__()
        h, w = image_size
        blocks, cin = [], in_channels
        for cout in channels:
            block = conv_block(cin, cout, kernel_size, batchnorm=batchnorm, activation=activation)
            if pool != "none" and min(h, w) >= 2:
                block.add_module("pool", make_pool(pool))
                h, w = h // 2, w // 2
            blocks.append(block)
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.hidden_layers = [f"blocks.{i}.act" for i in range(len(channels))]
        if fc_width:
            self.fc = nn.Sequential(
                OrderedDict(linear=nn.Linear(cin, fc_width), act=make_activation(activation))
            )
            self.hidden_layers.append("fc.act")
            cin = fc_width
        else:
            self.fc = nn.Identity()
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(self.flatten(self.pool(self.blocks(x)))))


@register_model
def cnn(
    *,
    num_classes: int,
    in_channels: int,
    image_size: tuple[int, int],
    channels: list[int] = (16, 32),
    kernel_size: int = 3,
    batchnorm: bool = True,
    pool: str = "max",
    activation: str = "relu",
    fc_width: int | None = 64,
) -> CNN:
    """CNN with one conv block per entry of ``channels`` (GPU scale: ``channels=[64, 128, 256,
    512], fc_width=512``). ``fc_width=None`` (or 0) drops the hidden fully connected layer."""
    if not isinstance(batchnorm, bool):
        raise ValueError(f"batchnorm: expected True or False, got {batchnorm!r}")
    ks = positive_int(kernel_size, "kernel_size")
    if ks % 2 == 0:
        raise ValueError(f"kernel_size: expected an odd size (same padding), got {ks}")
    fc = positive_int(fc_width, "fc_width") if fc_width else None
    return CNN(
        in_channels, num_classes, image_size, int_list(channels, "channels"), ks, batchnorm,
        check_choice(pool, "pool", POOLS), activation, fc,
    )
