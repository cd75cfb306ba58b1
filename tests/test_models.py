"""The model zoo: shapes, hidden layers, determinism, training on digits, options, errors."""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits

from lsm_train.models import FAMILIES, create_model, list_models, model_options, registry
from lsm_train.models.external import match_modules
from lsm_train.models.registry import register_model

SHAPES = [(c, s) for c in (1, 3) for s in (8, 28, 32)]


def capture(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, list]]:
    """Forward ``x`` with a plain forward hook on every hidden layer."""
    seen: dict[str, list] = {n: [] for n in model.hidden_layers}
    handles = [
        model.get_submodule(n).register_forward_hook(
            lambda mod, inp, out, n=n: seen[n].append(out)
        )
        for n in model.hidden_layers
    ]
    try:
        y = model(x)
    finally:
        for h in handles:
            h.remove()
    return y, seen


def test_registry_lists_every_family_and_variants():
    names = list_models()
    assert set(FAMILIES) <= set(names)
    assert {"resnet18", "vgg11", "vgg16", "vit_small"} <= set(names)
    assert list_models("vgg*") == ["vgg", "vgg11", "vgg16"]


@pytest.mark.parametrize("channels,size", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("name", FAMILIES)
def test_family_output_shape_and_hidden_capture(name, channels, size):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, in_channels=channels, image_size=size)
    x = torch.rand(3, channels, size, size)
    y, seen = capture(model, x)
    assert y.shape == (3, 7)
    names = model.hidden_layers
    assert len(names) >= 2
    order = [n for n, _ in model.named_modules()]
    assert names == sorted(names, key=order.index), "hidden_layers must follow module order"
    for n in names:
        assert len(seen[n]) == 1, f"{n} fired {len(seen[n])} times"
        out = seen[n][0]
        assert isinstance(out, torch.Tensor) and out.shape[0] == 3 and out.ndim >= 2
        assert torch.isfinite(out).all()
    y.sum().backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert not unused, f"parameters outside the forward graph (DDP would fail): {unused}"


@pytest.mark.parametrize("name", FAMILIES)
def test_family_non_square_image(name):
    model = create_model(name, num_classes=4, in_channels=3, image_size=(12, 8))
    y, seen = capture(model, torch.rand(2, 3, 12, 8))
    assert y.shape == (2, 4) and all(len(v) == 1 for v in seen.values())


@pytest.mark.parametrize("name", FAMILIES)
def test_deterministic_under_seed(name):
    x = torch.rand(2, 1, 8, 8)
    outs, states = [], []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        model = create_model(name).eval()
        outs.append(model(x))
        states.append(model.state_dict())
    assert torch.equal(outs[0], outs[1])
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k])
    assert not torch.equal(outs[0], outs[2]), "a different seed should give another model"


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    return X, torch.tensor(y)


# (Adam lr, steps) per family, chosen so that the smallest loss drop seen over seeds 0-3 is
# at least 2x the 0.15 the test asks for: the test must not sit on the edge of CPU numerics
# (AlexNet at lr 1e-2 dropped 0.2 on one machine and 0.13 on another).
_SHORT_TRAINING = {"alexnet": (1e-3, 40), "vit": (1e-3, 80), "dbn": (1e-2, 80)}


@pytest.mark.parametrize("name", FAMILIES)
def test_short_training_on_digits_lowers_loss(name, digits):
    X, y = digits
    torch.manual_seed(0)
    model = create_model(name)  # defaults have no dropout; BN uses batch statistics here
    Xe, ye = X[:256], y[:256]
    with torch.no_grad():
        before = F.cross_entropy(model(Xe), ye).item()
    lr, steps = _SHORT_TRAINING.get(name, (1e-2, 40))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, X.shape[0], (32,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(X[idx]), y[idx]).backward()
        opt.step()
    with torch.no_grad():
        after = F.cross_entropy(model(Xe), ye).item()
    assert after < before - 0.15, (before, after)  # ln(10) = 2.30 at chance


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_digits_recipe_trains_the_family(name, tmp_path):
    """recipe=zoo/digits model=<family>, plain training, seed 0. Every family's measured test
    accuracy (seeds 0-2, docs/models-training.md) is >= 0.947, so 0.9 is far from the edge;
    test_short_training_on_digits_lowers_loss is the fast check of the same models."""
    from lsm_train.app import compose, train_from_config

    recipe = "zoo/digits"
    cfg = compose([f"recipe={recipe}", f"model={name}", "lsm=off", "logger=none",
                   "trainer.progress=false", "trainer.plots=false", "trainer.checkpoint=false"])
    result = train_from_config(cfg, tmp_path, recipe=recipe)
    assert result.status == "completed"
    assert result.final["val/acc"] >= 0.9, result.final


# ---------------------------------------------------------------- options of the families
@pytest.mark.parametrize("activation,module", [
    ("relu", nn.ReLU), ("sigmoid", nn.Sigmoid), ("tanh", nn.Tanh),
    ("leaky_relu", nn.LeakyReLU), ("elu", nn.ELU), ("gelu", nn.GELU), ("identity", nn.Identity),
])
def test_mlp_activation_is_the_hidden_output(activation, module):
    model = create_model("mlp", activation=activation, width=16, depth=3)
    assert model.hidden_layers == ["blocks.0.act", "blocks.1.act", "blocks.2.act"]
    x = torch.randn(5, 1, 8, 8)
    _, seen = capture(model, x)
    lin = model.blocks[0].linear
    expected = module()(lin(x.flatten(1)))
    assert isinstance(model.get_submodule("blocks.0.act"), module)
    torch.testing.assert_close(seen["blocks.0.act"][0], expected)


def test_mlp_width_list_and_depth():
    model = create_model("mlp", width=[32, 16, 8], in_channels=3, image_size=(4, 5))
    assert model.blocks[0].linear.in_features == 3 * 4 * 5
    _, seen = capture(model, torch.randn(2, 3, 4, 5))
    assert [seen[n][0].shape[1] for n in model.hidden_layers] == [32, 16, 8]
    assert len(create_model("mlp", width=10, depth=5).hidden_layers) == 5
    with pytest.raises(ValueError, match="depth=2 disagrees"):
        create_model("mlp", width=[4, 4, 4], depth=2)
    with pytest.raises(ValueError, match="expects inputs with 64 values"):
        create_model("mlp")(torch.randn(2, 1, 9, 9))


def test_cnn_blocks_are_configurable():
    model = create_model("cnn", channels=[4, 8, 8, 8], kernel_size=5, batchnorm=False,
                         pool="avg", fc_width=None, in_channels=3, image_size=32)
    assert model.hidden_layers == [f"blocks.{i}.act" for i in range(4)]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert model.blocks[0].conv.kernel_size == (5, 5)
    _, seen = capture(model, torch.rand(2, 3, 32, 32))
    assert [seen[n][0].shape[-1] for n in model.hidden_layers] == [32, 16, 8, 4]
    # pools stop at 1x1: 8 -> 4 -> 2 -> 1 -> 1
    small = create_model("cnn", channels=[4] * 5, pool="max")
    _, seen = capture(small, torch.rand(2, 1, 8, 8))
    assert [seen[n][0].shape[-1] for n in small.hidden_layers[:-1]] == [8, 4, 2, 1, 1]
    nopool = create_model("cnn", pool="none", fc_width=0)
    _, seen = capture(nopool, torch.rand(2, 1, 8, 8))
    assert all(seen[n][0].shape[-2:] == (8, 8) for n in nopool.hidden_layers)


def test_width_knobs_give_gpu_scale_variants():
    r18 = create_model("resnet18", in_channels=3, image_size=32)
    assert sum(p.numel() for p in r18.parameters()) == 11_173_962  # CIFAR ResNet-18
    assert len(r18.hidden_layers) == 8
    small = sum(p.numel() for p in create_model("resnet").parameters())
    assert small < 200_000
    for name, kw in [("resnet34", dict(width=4)), ("vgg16", dict(width=4, fc_width=16)),
                     ("vgg11", dict(width=4, fc_width=16)),
                     ("vit_small", dict(dim=24, depth=3)),
                     ("googlenet", dict(width=0.05, depth=9)),
                     ("alexnet", dict(width=4, fc_width=16, dropout=0.5))]:
        for c, s in [(1, 8), (3, 32)]:
            model = create_model(name, in_channels=c, image_size=s, **kw)
            y, seen = capture(model, torch.rand(2, c, s, s))
            assert y.shape == (2, 10) and all(len(v) == 1 for v in seen.values()), name
    assert len(create_model("googlenet", width=0.05, depth=9).hidden_layers) == 9
    assert len(create_model("vgg16", width=2, fc_width=8).hidden_layers) == 15


def test_vit_patch_size_from_image_size():
    assert create_model("vit", image_size=8).patch_size == 2
    assert create_model("vit", image_size=28).patch_size == 7
    assert create_model("vit", image_size=32, in_channels=3).patch_size == 8
    assert create_model("vit_small", image_size=32, in_channels=3, dim=12, heads=2,
                        depth=2).grid == (8, 8)
    m = create_model("vit", image_size=(10, 7), patch_size=3)  # padded to 12 x 9
    assert m.grid == (4, 3) and m(torch.rand(2, 1, 10, 7)).shape == (2, 10)


# ---------------------------------------------------------------- errors
def test_unknown_model_lists_registered_names():
    with pytest.raises(ValueError, match="unknown model 'resnet9'.*mlp.*torchvision"):
        create_model("resnet9")
    with pytest.raises(ValueError, match="unknown model source 'keras'"):
        create_model("keras:resnet50")


def test_unknown_option_lists_accepted_options():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['widht'\].*width=64.*activation"):
        create_model("mlp", widht=32)
    with pytest.raises(ValueError, match="pretrained"):
        create_model("resnet", pretrained=True)
    assert model_options("cnn")["pool"] == "max"


@pytest.mark.parametrize("name,kw,match", [
    ("mlp", dict(activation="swish"), "activation: expected one of .*relu"),
    ("mlp", dict(width=0), "width"),
    ("mlp", dict(num_classes=0), "num_classes"),
    ("mlp", dict(in_channels=1.5), "in_channels"),
    ("mlp", dict(image_size=(8,)), "image_size"),
    ("mlp", dict(image_size="8"), "image_size"),
    ("mlp", dict(image_size=True), "image_size"),
    ("mlp", dict(image_size=float("nan")), "image_size"),
    ("mlp", dict(width=float("inf")), "width"),
    ("googlenet", dict(width=float("inf")), "width"),
    ("cnn", dict(channels=[]), "channels"),
    ("cnn", dict(pool="median"), "pool: expected one of"),
    ("cnn", dict(kernel_size=4), "odd"),
    ("cnn", dict(batchnorm="yes"), "batchnorm"),
    ("resnet", dict(blocks=[1, 0]), r"blocks\[1\]"),
    ("vgg", dict(layout="vgg19"), "layout: expected one of"),
    ("vgg", dict(dropout=1.0), "dropout"),
    ("alexnet", dict(width=-1), "width"),
    ("vit", dict(dim=30, heads=4), "divisible"),
    ("vit", dict(patch_size=9), "exceeds"),
    ("googlenet", dict(depth=1), "depth"),
    ("googlenet", dict(width=0), "width"),
    ("dbn", dict(visible="poisson"), "visible: expected one of"),
])
def test_invalid_option_values(name, kw, match):
    with pytest.raises(ValueError, match=match):
        create_model(name, **kw)


def test_register_model_rules(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    with pytest.raises(ValueError, match="must accept"):
        register_model(lambda width=1: None, name="broken")
    with pytest.raises(ValueError, match="already registered"):
        register_model(lambda *, num_classes, in_channels, image_size: None, name="mlp")

    @register_model(name="_test_no_hidden")
    def _no_hidden(*, num_classes, in_channels, image_size):
        return nn.Linear(1, num_classes)

    with pytest.raises(ValueError, match="no hidden_layers"):
        create_model("_test_no_hidden")


@pytest.mark.parametrize("name", FAMILIES)
def test_hidden_capture_integration(name):
    capture_mod = pytest.importorskip("lsm_train.capture")
    model = create_model(name)
    with capture_mod.HiddenCapture(model, model.hidden_layers) as feats:
        model(torch.rand(2, 1, 8, 8))
    assert list(feats) == model.hidden_layers
    assert all(v.shape[0] == 2 for v in feats.values())


# ---------------------------------------------------------------- external models
class TinyTorchvisionResNet(nn.Module):
    """A stand-in with torchvision's ResNet module names (conv1, layer1.0, ..., fc)."""

    def __init__(self, num_classes=1000, depth=2):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, 1, 1)
        self.relu = nn.ReLU()
        self.layer1 = nn.Sequential(*(nn.Sequential(nn.Conv2d(4, 4, 3, 1, 1), nn.ReLU())
                                      for _ in range(depth)))
        self.layer2 = nn.Sequential(nn.Sequential(nn.Conv2d(4, 4, 3, 2, 1), nn.ReLU()))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.relu(self.conv1(x))))
        return self.fc(self.avgpool(x).flatten(1))


class FixedSizeNet(nn.Module):
    """A stand-in that only accepts 3x32x32 inputs."""

    def __init__(self, num_classes=1000):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU())
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(2 * 30 * 30, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


@pytest.fixture
def fake_torchvision(monkeypatch):
    builders = {"resnet_tiny": TinyTorchvisionResNet, "fixednet": FixedSizeNet}
    models = types.SimpleNamespace(
        list_models=lambda: sorted(builders),
        get_model=lambda name, weights=None, **kw: builders[name](**kw),
    )
    module = types.ModuleType("torchvision")
    module.models = models
    monkeypatch.setitem(sys.modules, "torchvision", module)
    return module


def test_torchvision_adapter_with_stand_in(fake_torchvision):
    torch.manual_seed(0)
    model = create_model("torchvision:resnet_tiny", num_classes=5, in_channels=1, image_size=8)
    assert model.conv1.in_channels == 1
    assert model.hidden_layers == ["layer1.0", "layer1.1", "layer2.0"]
    y, seen = capture(model, torch.rand(2, 1, 8, 8))
    assert y.shape == (2, 5) and all(v[0].shape[0] == 2 for v in seen.values())
    model = create_model("torchvision:resnet_tiny", in_channels=3, image_size=8, depth=3,
                         hidden_layers=["layer1.**:ReLU", "fc"])
    assert model.hidden_layers == ["layer1.0.1", "layer1.1.1", "layer1.2.1", "fc"]
    with pytest.raises(ValueError, match="matches no module; top-level modules"):
        create_model("torchvision:resnet_tiny", hidden_layers=["block*"])
    # no default for the family: the automatic choice (the flat features' stage, then the
    # classifier's input)
    fixed = create_model("torchvision:fixednet", in_channels=3, image_size=32)
    assert fixed.hidden_layers == ["features.1", "classifier.1:input"]
    with pytest.raises(ValueError, match=r"does not accept inputs of shape \(3, 8, 8\)"):
        create_model("torchvision:fixednet", in_channels=3, image_size=8,
                     hidden_layers=["features.*"])
    with pytest.raises(ValueError, match="unknown torchvision model 'resnet99'.*resnet_tiny"):
        create_model("torchvision:resnet99")
    with pytest.raises(ValueError, match="invalid option"):
        create_model("torchvision:resnet_tiny", colour=True)


def test_match_modules_globs_stay_within_a_segment():
    model = TinyTorchvisionResNet()
    assert match_modules(model, ["layer*"]) == ["layer1", "layer2"]
    assert match_modules(model, ["layer2.**"]) == ["layer2", "layer2.0", "layer2.0.0",
                                                   "layer2.0.1"]
    assert match_modules(model, ["*:ReLU"]) == ["relu"]
    with pytest.raises(ValueError, match="non-empty list"):
        match_modules(model, "layer*")


@pytest.mark.parametrize("package,message", [
    ("torchvision", r"pip install lsm_train\[vision\]"),
    ("timm", r"timm is not installed.*pip install"),
])
def test_missing_package_names_the_extra(package, message):
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed; the error path cannot be reached")
    with pytest.raises(ImportError, match=message):
        create_model(f"{package}:resnet18")


def test_real_torchvision_resnet18():
    pytest.importorskip("torchvision")
    model = create_model("torchvision:resnet18", num_classes=10, in_channels=1, image_size=28)
    assert model.hidden_layers[:2] == ["layer1.0", "layer1.1"] and len(model.hidden_layers) == 8
    y, seen = capture(model, torch.rand(2, 1, 28, 28))
    assert y.shape == (2, 10) and all(len(v) == 1 for v in seen.values())


@pytest.mark.parametrize("name", ["vgg11", "alexnet", "googlenet", "mobilenet_v3_small"])
def test_real_torchvision_families_train_with_the_loss(name):
    """Default hidden layers of several real torchvision families: capture, LSMLoss, a step."""
    pytest.importorskip("torchvision")
    from lsm_train.loss import LSMLoss

    torch.manual_seed(0)
    model = create_model(f"torchvision:{name}", num_classes=3, in_channels=3, image_size=64)
    assert model.hidden_layers
    x, y = torch.rand(6, 3, 64, 64), torch.arange(6) % 3
    reg = LSMLoss(model)
    loss = F.cross_entropy(model(x), y) + reg(y)
    loss.backward()
    assert torch.isfinite(loss) and set(reg.last) == set(model.hidden_layers)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224", "convnext_atto"])
def test_real_timm_models(name):
    """timm's feature_info gives the default hidden layers; img_size / in_chans are honoured."""
    pytest.importorskip("timm")
    from lsm_train.loss import LSMLoss

    torch.manual_seed(0)
    model = create_model(f"timm:{name}", num_classes=4, in_channels=1, image_size=32)
    assert model.hidden_layers
    x, y = torch.rand(8, 1, 32, 32), torch.arange(8) % 4
    y_hat, seen = capture(model, x)
    assert y_hat.shape == (8, 4) and set(seen) == set(model.hidden_layers)
    reg = LSMLoss(model)
    (F.cross_entropy(model(x), y) + reg(y)).backward()
    assert all(0.0 < v <= 1.0 for v in reg.last.values())  # 2 per class: may saturate


def test_numpy_integers_are_accepted():
    np = pytest.importorskip("numpy")
    model = create_model("cnn", num_classes=np.int64(3), image_size=(np.int32(8), 8),
                         channels=np.array([4, 8]))
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 3)


def test_hydra_list_configs_are_accepted():
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.create({"image_size": [12, 8], "kwargs": {"channels": [4, 8]}})
    model = create_model("cnn", in_channels=3, image_size=cfg.image_size, **cfg.kwargs)
    assert model(torch.rand(2, 3, 12, 8)).shape == (2, 10)


def test_timm_adapter_with_stand_in(monkeypatch):
    def create(name, img_size=None, num_classes=1000, in_chans=3, pretrained=False, **kw):
        if name != "tiny_resnet":
            raise RuntimeError(f"Unknown model ({name})")
        if img_size is not None:
            raise TypeError("__init__() got an unexpected keyword argument 'img_size'")
        model = TinyTorchvisionResNet(num_classes=num_classes, **kw)
        model.conv1 = nn.Conv2d(in_chans, 4, 3, 1, 1)
        model.feature_info = [{"module": "layer1"}, {"module": "layer2"}]
        return model

    monkeypatch.setitem(sys.modules, "timm", types.SimpleNamespace(create_model=create))
    model = create_model("timm:tiny_resnet", num_classes=3, in_channels=2, image_size=8)
    assert model.hidden_layers == ["layer1", "layer2"]  # from feature_info
    assert model(torch.rand(2, 2, 8, 8)).shape == (2, 3)
    with pytest.raises(ValueError, match="unknown timm model 'nope'"):
        create_model("timm:nope")
    with pytest.raises(ValueError, match="invalid option"):
        create_model("timm:tiny_resnet", colour=True)
