"""Multi-layer perceptron: flatten -> [Linear -> activation] x depth -> Linear head.

The paper's activation, width and depth studies use this family: ``activation`` is one of
``ACTIVATIONS``; ``width`` is an int (every hidden layer) or a list of widths (one per
hidden layer, then ``depth`` is its length). Images are flattened, so the input dimension
is ``in_channels * h * w``. Hidden layers: ``blocks.<i>.act`` (each block's activation
module, so a forward hook sees the post-activation output).
"""

from __future__ import annotations

import numbers
from collections import OrderedDict
from typing import Any

import torch
import torch.nn as nn

from lsm_train._validation import check_choice
from lsm_train.models.registry import (
    flatten_inputs,
    int_list,
    positive_int,
    register_model,
)

__all__ = ["ACTIVATIONS", "make_activation", "MLP", "mlp"]

ACTIVATIONS = {
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "identity": nn.Identity,
}


def make_activation(name: str) -> nn.Module:
    """A fresh activation module (never shared, so each hook fires once per forward)."""
    return ACTIVATIONS[check_choice(name, "activation", tuple(ACTIVATIONS))]()


class MLP(nn.Module):
    def __init__(self, in_features: int, num_classes: int, widths: list[int], activation: str):
        super().__init__()
        make_activation(activation)  # validate before building
        self.in_features = in_features
        blocks, d = [], in_features
        for w in widths:
            blocks.append(
                nn.Sequential(OrderedDict(linear=nn.Linear(d, w), act=make_activation(activation)))
            )
            d = w
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(d, num_classes)
        self.hidden_layers = [f"blocks.{i}.act" for i in range(len(widths))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(flatten_inputs(x, self.in_features, "MLP")))


def widths_from(width: Any, depth: int | None, name: str = "width") -> list[int]:
    """Per-layer widths from an int ``width`` x ``depth`` or a list ``width``."""
    if isinstance(width, numbers.Real) and not isinstance(width, bool):
        return [positive_int(width, name)] * positive_int(2 if depth is None else depth, "depth")
    widths = int_list(width, name)
    if depth is not None and positive_int(depth, "depth") != len(widths):
        raise ValueError(f"depth={depth} disagrees with {name}={list(widths)}; give one of them")
    return widths


@register_model
def mlp(
    *,
    num_classes: int,
    in_channels: int,
    image_size: tuple[int, int],
    width: int | list[int] = 64,
    depth: int | None = None,
    activation: str = "relu",
) -> MLP:
    """MLP with ``depth`` (default 2) hidden layers of ``width`` units (or a list of widths).

    GPU scale: ``width=1024, depth=4``.
    """
    h, w = image_size
    return MLP(in_channels * h * w, num_classes, widths_from(width, depth), activation)
