"""VGGNet (Simonyan & Zisserman 2015): 3x3 conv blocks with batchnorm and 2x2 max pools,
global average pooling, then two hidden fully connected layers and a linear head.

``layout`` is VGG-11 or VGG-16 (channels in multiples of ``width``: 64-128-256-512 at
width 64); a max pool is skipped once the feature map is smaller than 2x2, so any input
size works.
Hidden layers: ``features.block<i>.act`` for every conv block, then ``classifier.act1``
and ``classifier.act2``.

Variants: ``vgg`` (VGG-11 layout at width 16, for CPU), ``vgg11`` and ``vgg16`` (width 64,
fc 512, dropout 0.5: the usual CIFAR-10 VGGs).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn

from lsm_train._validation import check_choice
from lsm_train.models.cnn import conv_block
from lsm_train.models.registry import positive_int, register_model

__all__ = ["LAYOUTS", "VGG", "vgg", "vgg11", "vgg16"]

LAYOUTS = {
    "vgg11": [1, "M", 2, "M", 4, 4, "M", 8, 8, "M", 8, 8, "M"],
    "vgg16": [1, 1, "M", 2, 2, "M", 4, 4, 4, "M", 8, 8, 8, "M", 8, 8, 8, "M"],
}


class VGG(nn.Module):
    def __init__(
        self, in_channels: int, num_classes: int, image_size: tuple[int, int],
        layout: list, fc_width: int, dropout: float,
    ):
        super().__init__()
        h, w = image_size
        feats: list[tuple[str, nn.Module]] = []
        self.hidden_layers: list[str] = []
        cin = in_channels
        for item in layout:
            if item == "M":
                if min(h, w) >= 2:
                    feats.append((f"pool{len(feats)}", nn.MaxPool2d(2, 2)))
                    h, w = h // 2, w // 2
                continue
            name = f"block{len(self.hidden_layers)}"
            cout = item
            feats.append((name, conv_block(cin, cout, 3)))
            self.hidden_layers.append(f"features.{name}.act")
            cin = cout
        self.features = nn.Sequential(OrderedDict(feats))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(OrderedDict(
            fc1=nn.Linear(cin, fc_width), act1=nn.ReLU(), drop1=nn.Dropout(dropout),
            fc2=nn.Linear(fc_width, fc_width), act2=nn.ReLU(), drop2=nn.Dropout(dropout),
            head=nn.Linear(fc_width, num_classes),
        ))
        self.hidden_layers += ["classifier.act1", "classifier.act2"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.pool(self.features(x))))


def _build(num_classes, in_channels, image_size, layout, width, fc_width, dropout) -> VGG:
    width = positive_int(width, "width")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
    layout = LAYOUTS[check_choice(layout, "layout", tuple(LAYOUTS))]
    units = [c if c == "M" else max(1, c * width) for c in layout]  # layout in units of width
    return VGG(in_channels, num_classes, image_size, units,
               positive_int(fc_width, "fc_width"), float(dropout))


@register_model
def vgg(
    *, num_classes: int, in_channels: int, image_size: tuple[int, int],
    layout: str = "vgg11", width: int = 16, fc_width: int = 64, dropout: float = 0.0,
) -> VGG:
    """Small VGG (VGG-11 layout, first block ``width`` channels)."""
    return _build(num_classes, in_channels, image_size, layout, width, fc_width, dropout)


@register_model
def vgg11(
    *, num_classes: int, in_channels: int, image_size: tuple[int, int],
    width: int = 64, fc_width: int = 512, dropout: float = 0.5,
) -> VGG:
    """VGG-11 with batchnorm (CIFAR-10 scale)."""
    return _build(num_classes, in_channels, image_size, "vgg11", width, fc_width, dropout)


@register_model
def vgg16(
    *, num_classes: int, in_channels: int, image_size: tuple[int, int],
    width: int = 64, fc_width: int = 512, dropout: float = 0.5,
) -> VGG:
    """VGG-16 with batchnorm (CIFAR-10 scale)."""
    return _build(num_classes, in_channels, image_size, "vgg16", width, fc_width, dropout)
