"""ResNet with basic blocks (He et al. 2016), CIFAR-style stem, any input size.

Stage ``i`` has ``blocks[i]`` basic blocks of ``width * 2**i`` channels. The first block of
each stage after the first downsamples by 2 only while the feature map is at least 2x2;
inputs of 64 pixels or more get the ImageNet stem (7x7 stride 2 conv + 3x3 max pool).
Global average pooling and a linear head follow.

Block output = ReLU(F(x) + shortcut(x)), with the ReLU a dedicated module ``act``; hidden
layers are ``stages.<i>.<j>.act`` for every block.

Variants: ``resnet`` (width 16, blocks (1, 1, 1): a ResNet-8 for CPU), ``resnet18``
(width 64, blocks (2, 2, 2, 2): the ResNet-18 widths used on CIFAR-10) and ``resnet34``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lsm_train.models.cnn import conv_block
from lsm_train.models.registry import int_list, positive_int, register_model

__all__ = ["BasicBlock", "ResNet", "resnet", "resnet18", "resnet34"]


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.act(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(
        self, in_channels: int, num_classes: int, image_size: tuple[int, int],
        width: int, blocks: list[int],
    ):
        super().__init__()
        h, w = image_size
        if min(h, w) >= 64:
            self.stem = nn.Sequential(
                conv_block(in_channels, width, 7, 2, padding=3), nn.MaxPool2d(3, 2, 1)
            )
            h, w = (h + 3) // 4, (w + 3) // 4
        else:
            self.stem = conv_block(in_channels, width, 3)
        stages, cin = [], width
        self.hidden_layers: list[str] = []
        for i, n in enumerate(blocks):
            cout = width * 2**i
            stride = 2 if i > 0 and min(h, w) >= 2 else 1
            if stride == 2:
                h, w = (h + 1) // 2, (w + 1) // 2
            stage = []
            for j in range(n):
                stage.append(BasicBlock(cin, cout, stride if j == 0 else 1))
                self.hidden_layers.append(f"stages.{i}.{j}.act")
                cin = cout
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.flatten(self.pool(self.stages(self.stem(x)))))


def _build(num_classes, in_channels, image_size, width, blocks) -> ResNet:
    return ResNet(
        in_channels, num_classes, image_size, positive_int(width, "width"),
        int_list(blocks, "blocks"),
    )


@register_model
def resnet(
    *, num_classes: int, in_channels: int, image_size: tuple[int, int],
    width: int = 16, blocks: list[int] = (1, 1, 1),
) -> ResNet:
    """Small ResNet (ResNet-8 layout); ``width`` = channels of the first stage."""
    return _build(num_classes, in_channels, image_size, width, blocks)


@register_model
def resnet18(
    *, num_classes: int, in_channels: int, image_size: tuple[int, int],
    width: int = 64, blocks: list[int] = (2, 2, 2, 2),
) -> ResNet:
    """ResNet-18 (CIFAR variant: 3x3 stem below 64 pixels), 11.2M parameters at width 64."""
    return _build(num_classes, in_channels, image_size, width, blocks)


@register_model
def resnet34(
    *, num_classes: int, in_channels: int, image_size: tuple[int, int],
    width: int = 64, blocks: list[int] = (3, 4, 6, 3),
) -> ResNet:
    """ResNet-34 (CIFAR variant: 3x3 stem below 64 pixels)."""
    return _build(num_classes, in_channels, image_size, width, blocks)

