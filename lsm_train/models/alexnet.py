"""AlexNet (Krizhevsky et al. 2012): five conv layers, three max pools, two hidden fully
connected layers and a linear head.

Channels are ``(1, 3, 6, 4, 4) * width`` (64-192-384-256-256 at width 64, as in
torchvision). The first conv is chosen from the image size: 11x11 stride 4 from 64 pixels
up (ImageNet), 5x5 stride 1 from 16 pixels (28x28 / 32x32), 3x3 stride 1 below (8x8).
The 3x3 stride-2 max pools (padding 1) are skipped once the map is 1 pixel wide; an
adaptive average pool to at most 2x2 feeds the classifier.
Hidden layers: ``features.conv<i>.act`` (i = 1..5), ``classifier.act1``, ``classifier.act2``.

Weights use He (fan-in, ReLU) initialisation, biases start at zero.

GPU scale: ``width=64, fc_width=4096, dropout=0.5`` (the original sizes).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn

from lsm_train.models.cnn import conv_block
from lsm_train.models.registry import positive_int, register_model

__all__ = ["AlexNet", "alexnet"]

_MULT = (1, 3, 6, 4, 4)
_POOL_AFTER = (1, 2, 5)


def _first_conv(side: int) -> tuple[int, int, int]:
    """(kernel, stride, padding) of the first conv for images whose short side is ``side``."""
    if side >= 64:
        return 11, 4, 2
    return (5, 1, 2) if side >= 16 else (3, 1, 1)


class AlexNet(nn.Module):
    def __init__(
        self, in_channels: int, num_classes: int, image_size: tuple[int, int],
        width: int, fc_width: int, dropout: float, batchnorm: bool,
    ):
        super().__init__()
        h, w = image_size
        k, s, p = _first_conv(min(h, w))
        feats: list[tuple[str, nn.Module]] = []
        cin = in_channels
        for i, m in enumerate(_MULT, start=1):
            cout = m * width
            ks, st, pd = (k, s, p) if i == 1 else (5 if i == 2 else 3, 1, 2 if i == 2 else 1)
            feats.append((f"conv{i}", conv_block(cin, cout, ks, st, padding=pd,
                                                 batchnorm=batchnorm)))
            h, w = (h + 2 * pd - ks) // st + 1, (w + 2 * pd - ks) // st + 1
            if i in _POOL_AFTER and min(h, w) >= 2:
                feats.append((f"pool{i}", nn.MaxPool2d(3, 2, 1)))
                h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
            cin = cout
        self.features = nn.Sequential(OrderedDict(feats))
        self.pool = nn.AdaptiveAvgPool2d((min(h, 2), min(w, 2)))
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(OrderedDict(
            drop1=nn.Dropout(dropout), fc1=nn.Linear(cin * min(h, 2) * min(w, 2), fc_width),
            act1=nn.ReLU(), drop2=nn.Dropout(dropout), fc2=nn.Linear(fc_width, fc_width),
            act2=nn.ReLU(), head=nn.Linear(fc_width, num_classes),
        ))
        self.hidden_layers = [f"features.conv{i}.act" for i in range(1, 6)]
        self.hidden_layers += ["classifier.act1", "classifier.act2"]
        self._init_weights()

    def _init_weights(self) -> None:
        # He (fan-in, ReLU) init: PyTorch's default shrinks the signal by about 1/3 per
        # layer, so without batchnorm the seven ReLU layers start near zero and barely learn.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.pool(self.features(x))))


@register_model
def alexnet(
    *, num_classes: int, in_channels: int, image_size: tuple[int, int],
    width: int = 16, fc_width: int = 128, dropout: float = 0.0, batchnorm: bool = False,
) -> AlexNet:
    """AlexNet with conv channels ``(1, 3, 6, 4, 4) * width`` and ``fc_width`` hidden units."""
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
    if not isinstance(batchnorm, bool):
        raise ValueError(f"batchnorm: expected True or False, got {batchnorm!r}")
    return AlexNet(in_channels, num_classes, image_size, positive_int(width, "width"),
                   positive_int(fc_width, "fc_width"), float(dropout), batchnorm)
