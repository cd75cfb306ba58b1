"""Automatic layer choice (models without ``hidden_layers``), the one layer-pattern dialect,
``:input`` layers and the warning for a module called twice in one forward pass.

References are the tensors computed by hand from the model's own submodules."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lsm_train as lt
from lsm_train.capture import resolve_layers
from lsm_train.models.external import match_modules
from lsm_train.selection import auto_layers, glob_match


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
        nn.Dropout(0.2), nn.Linear(32, 10),
    )


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.conv2(F.relu(self.bn(self.conv1(x)))))


class ResNet(nn.Module):
    def __init__(self, c: int = 4, n: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.blocks = nn.Sequential(*[Block(c) for _ in range(n)])
        self.fc = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean(dim=(2, 3)))


class Transformer(nn.Module):
    def __init__(self, d: int = 16, depth: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d)
        layer = nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, 1, 8, 8): 8 tokens of 8
        return self.head(self.encoder(self.embed(x.flatten(1, 2))).mean(dim=1))


def images(n: int = 12) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(3))


# -- the rule on the three kinds of model of the issue ------------------------------------


def test_sequential_mlp_watches_each_activation_and_not_the_logits():
    model = mlp().eval()
    assert auto_layers(model) == ["2", "4"]  # ReLU outputs; the classifier input is "4"
    x = images()
    with lt.HiddenCapture(model) as feats:
        model(x)
    h1 = torch.relu(model[1](x.flatten(1)))
    torch.testing.assert_close(feats["2"], h1)
    torch.testing.assert_close(feats["4"], torch.relu(model[3](h1)))


def test_residual_blocks_in_a_sequential_and_the_classifier_input():
    torch.manual_seed(0)
    model = ResNet().eval()
    names = lt.HiddenCapture(model).names
    assert names == ["blocks.0", "blocks.1", "blocks.2", "fc:input"]
    x = images()
    with lt.HiddenCapture(model) as feats:
        model(x)
    h = model.stem(x)
    for i, block in enumerate(model.blocks):
        h = block(h)
        torch.testing.assert_close(feats[f"blocks.{i}"], h)
    torch.testing.assert_close(feats["fc:input"], h.mean(dim=(2, 3)))


def test_transformer_encoder_layers_and_the_classifier_input():
    torch.manual_seed(0)
    model = Transformer().eval()
    assert auto_layers(model) == ["encoder.layers.0", "encoder.layers.1", "head:input"]
    x = images()
    with lt.HiddenCapture(model) as feats:
        model(x)
    h = model.embed(x.flatten(1, 2))
    for i, layer in enumerate(model.encoder.layers):
        h = layer(h)
        torch.testing.assert_close(feats[f"encoder.layers.{i}"], h)
    torch.testing.assert_close(feats["head:input"], h.mean(dim=1))


def test_flat_vgg_like_model_uses_the_stages_of_each_sequential():
    model = nn.Module()
    model.features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2),
                                   nn.Conv2d(4, 4, 1), nn.ReLU())
    model.classifier = nn.Sequential(nn.Linear(36, 8), nn.ReLU(), nn.Dropout(),
                                     nn.Linear(8, 3))
    assert auto_layers(model) == ["features.2", "features.4", "classifier.1"]


def test_choice_is_logged_and_nothing_to_choose_is_explained(caplog):
    with caplog.at_level(logging.INFO, logger="lsm_train.capture"):
        lt.HiddenCapture(mlp()).remove()
    assert "chosen automatically: ['2', '4']" in caplog.text
    for model in (nn.Linear(4, 2), nn.Sequential(nn.Flatten(), nn.Linear(4, 2))):
        with pytest.raises(ValueError, match="no hidden layer could be chosen automatically"):
            lt.HiddenCapture(model)


def test_readme_three_lines_on_a_model_without_hidden_layers():
    """LSMLoss, SeparabilityGuard and HiddenCapture all take the automatic choice."""
    model = mlp()
    x, y = images(96), torch.arange(96) % 10
    reg = lt.LSMLoss(model, weight=0.1, crossfit=True)
    opt = lt.SeparabilityGuard(torch.optim.AdamW(model.parameters(), 1e-3), model,
                               probe=(x[:48], y[:48]))
    for i in range(0, 96, 32):
        opt.zero_grad()
        loss = F.cross_entropy(model(x[i : i + 32]), y[i : i + 32]) + reg(y[i : i + 32])
        loss.backward()
        opt.step()
    with lt.HiddenCapture(model, detach=True) as feats:
        model(x)
    assert reg.names == opt.layer_names == list(feats) == ["2", "4"]
    assert opt.stats["steps"] == 3 and set(reg.last) == {"2", "4"}


# -- one dialect ---------------------------------------------------------------------------


@pytest.mark.parametrize("name,pattern,hit", [
    ("blocks.0", "blocks.*", True),
    ("blocks.0.conv1", "blocks.*", False),          # * stays within a segment
    ("blocks.0.conv1", "blocks.**", True),
    ("blocks", "blocks.**", True),                  # ** also matches no segment
    ("blocks.0.conv1", "**.conv1", True),
    ("blocks.10.bn", "blocks.?.bn", False),
    ("stem.1", "stem.[0-1]", True),
])
def test_glob_segments(name, pattern, hit):
    assert glob_match(name, pattern) is hit


PATTERNS = [["blocks.*"], ["blocks.**:Conv2d"], ["**:BatchNorm2d"], ["blocks.*.conv?"],
            ["fc:input", "blocks.1"]]
EXPECTED = [
    ["blocks.0", "blocks.1", "blocks.2"],
    [f"blocks.{i}.conv{j}" for i in range(3) for j in (1, 2)],
    ["stem.1", "blocks.0.bn", "blocks.1.bn", "blocks.2.bn"],
    [f"blocks.{i}.conv{j}" for i in range(3) for j in (1, 2)],
    ["fc:input", "blocks.1"],
]


@pytest.mark.parametrize("patterns,expected", list(zip(PATTERNS, EXPECTED, strict=True)))
def test_capture_and_external_adapter_speak_the_same_dialect(patterns, expected):
    model = ResNet()
    assert resolve_layers(model, patterns) == expected
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    assert match_modules(model, patterns) == sorted(
        expected, key=lambda n: order[n.removesuffix(":input")]
    )


def test_input_layer_captures_the_first_positional_argument():
    model = ResNet().eval()
    x = images()
    with lt.HiddenCapture(model, ["blocks.1:input", "fc:input"], detach=False) as feats:
        model(x)
    torch.testing.assert_close(feats["blocks.1:input"], model.blocks[0](model.stem(x)))
    assert feats["fc:input"].requires_grad


# -- a module called twice in one forward pass ----------------------------------------------


class SharedReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 2)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.fc2(self.act(self.fc1(x)))))


def test_a_module_called_twice_warns_once_and_keeps_its_last_call():
    model = SharedReLU()
    x = torch.randn(5, 4)
    cap = lt.HiddenCapture(model, ["act", "fc1"])
    with pytest.warns(RuntimeWarning, match="'act' ran more than once in one forward pass"):
        model(x)
    torch.testing.assert_close(cap["act"], torch.relu(model.fc2(torch.relu(model.fc1(x)))))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x)  # warned once per layer
        cap.remove()
        cap2 = lt.HiddenCapture(model, ["fc1"])
        model(x)
        model.fc1(x)  # a direct call outside a pass of the model is not a repeat
        model(x)
        cap2.remove()


def test_loss_and_guard_train_through_an_input_layer():
    """fc:input (from the automatic choice) feeds LSMLoss gradients and the guard's score."""
    torch.manual_seed(0)
    model = ResNet()
    x, y = images(24), torch.arange(24) % 3
    reg = lt.LSMLoss(model, weight=1.0)
    opt = lt.SeparabilityGuard(torch.optim.SGD(model.parameters(), 0.01), model, (x, y))
    assert reg.names == opt.layer_names == ["blocks.0", "blocks.1", "blocks.2", "fc:input"]
    (F.cross_entropy(model(x), y) + reg(y)).backward()
    assert set(reg.last) == set(reg.names)
    reg.capture.remove()
    # the input of fc depends on the blocks, not on fc: so do the gradients of its term
    model.zero_grad()
    only_input = lt.LSMLoss(model, ["fc:input"], weight=1.0)
    model(x)
    only_input(y).backward()
    assert model.fc.weight.grad is None
    assert model.blocks[2].conv2.weight.grad.abs().sum() > 0
    opt.step()
    assert set(opt.last_layer_scores) == set(reg.names)
