"""HiddenCapture: layer resolution, lifetime, in-place safety, outputs, DDP, torch.compile."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.distributed as dist
from torch import nn

import lsm_train as lt
from lsm_train.capture import _CaptureHook, resolve_layers, unwrap_model

# Block calls its one ReLU twice (as torchvision's BasicBlock does); HiddenCapture's warning
# about that is tested in test_auto_layers.py
pytestmark = pytest.mark.filterwarnings("ignore:HiddenCapture.*ran more than once")


class Block(nn.Module):
    """Residual block: ``inplace`` picks `out += x` + ReLU(inplace) or out-of-place twins."""

    def __init__(self, c: int, inplace: bool) -> None:
        super().__init__()
        self.inplace = inplace
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=inplace)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.inplace:
            out += x
        else:
            out = out + x
        return self.relu(out)


class Net(nn.Module):
    def __init__(self, inplace: bool = True, hidden: bool = True) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.layer1 = Block(4, inplace)
        self.layer2 = Block(4, inplace)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(4, 3)
        if hidden:
            self.hidden_layers = ["layer1", "layer2.bn2"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer2(self.layer1(self.stem(x)))
        return self.head(self.drop(h.mean(dim=(2, 3))))


def twin_nets(seed: int = 0) -> tuple[Net, Net]:
    torch.manual_seed(seed)
    a = Net(inplace=True)
    b = Net(inplace=False)
    b.load_state_dict(a.state_dict())
    return a, b


def x_batch(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 5, 5, generator=torch.Generator().manual_seed(seed))


# -- layer resolution ------------------------------------------------------------------


def test_names_patterns_types_keep_order_and_dedupe():
    model = Net()
    cap = lt.HiddenCapture(model, ["layer2", "layer*.relu", "layer1.bn1", nn.BatchNorm2d])
    assert cap.names == [
        "layer2",
        "layer1.relu",
        "layer2.relu",
        "layer1.bn1",
        "layer1.bn2",
        "layer2.bn1",
        "layer2.bn2",
    ]
    cap.remove()
    assert resolve_layers(model, "layer1.*") == [
        "layer1.conv1", "layer1.bn1", "layer1.relu", "layer1.conv2", "layer1.bn2"
    ]
    assert resolve_layers(model, nn.Linear) == ["head"]


def test_default_is_hidden_layers_else_the_automatic_choice():
    assert lt.HiddenCapture(Net(), detach=True).names == ["layer1", "layer2.bn2"]
    # no hidden_layers: the two Blocks (direct children) and the classifier's input
    assert lt.HiddenCapture(Net(hidden=False)).names == ["layer1", "layer2", "head:input"]


@pytest.mark.parametrize("spec,close", [("layer3.relu", "layer1.relu"), ("laye*.rleu", "layer")])
def test_unmatched_name_or_pattern_lists_closest_names(spec, close):
    with pytest.raises(ValueError, match="matches no module") as err:
        lt.HiddenCapture(Net(), [spec])
    assert close in str(err.value)


def test_bad_layer_specs_raise():
    model = Net()
    with pytest.raises(ValueError, match="no submodule .* is a LSTM"):
        lt.HiddenCapture(model, nn.LSTM)
    with pytest.raises(ValueError, match="empty"):
        lt.HiddenCapture(model, [])
    with pytest.raises(ValueError, match="module names"):
        lt.HiddenCapture(model, [3])
    with pytest.raises(ValueError, match="output_index"):
        lt.HiddenCapture(model, "head", output_index=1.5)
    with pytest.raises(ValueError, match="nn.Module"):
        lt.HiddenCapture(lambda x: x, "head")


# -- lifetime ---------------------------------------------------------------------------


def n_hooks(model: nn.Module) -> int:
    """Layer hooks only (HiddenCapture also hooks the model itself to delimit passes)."""
    return sum(isinstance(h, _CaptureHook) for m in model.modules()
               for h in m._forward_hooks.values())


def n_all_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_context_manager_captures_then_removes_hooks():
    model = Net().eval()
    x = x_batch()
    with lt.HiddenCapture(model, ["stem", "head"]) as feats:
        assert n_hooks(model) == 2
        out = model(x)
    assert n_all_hooks(model) == 0
    assert list(feats) == ["stem", "head"]
    torch.testing.assert_close(feats["head"], out)
    torch.testing.assert_close(feats["stem"], model.stem(x))
    before = feats["stem"]
    model(x_batch(seed=5))
    assert feats["stem"] is before  # not updated after the hooks were removed


def test_long_lived_capture_updates_each_forward_and_remove_is_idempotent():
    model = Net().eval()
    cap = lt.HiddenCapture(model, "stem")
    assert cap.attached and n_hooks(model) == 1
    for seed in (1, 2):
        x = x_batch(seed=seed)
        model(x)
        torch.testing.assert_close(cap["stem"], model.stem(x))
    cap.remove()
    cap.remove()
    assert not cap.attached and n_all_hooks(model) == 0
    assert "stem" in cap and len(cap) == 1
    cap.attach()
    cap.attach()
    assert n_hooks(model) == 1
    cap.clear()
    assert len(cap) == 0
    cap.remove()
    assert "removed" in repr(cap)
    with cap as feats:  # entering again re-registers the hooks
        model(x)
    assert feats is cap.features and "stem" in feats and n_all_hooks(model) == 0


def test_detach_flag_controls_the_graph():
    model = Net()
    x = x_batch()
    with lt.HiddenCapture(model, "layer1") as feats:
        model(x)
    assert not feats["layer1"].requires_grad
    with lt.HiddenCapture(model, "layer1", detach=False) as feats:
        model(x)
    assert feats["layer1"].requires_grad and feats["layer1"].grad_fn is not None


# -- in-place safety ----------------------------------------------------------------------

INPLACE_LAYERS = ["layer1.bn2", "layer1.relu", "layer2.bn1", "layer2.bn2", "stem"]


def test_outputs_modified_in_place_are_captured_as_returned():
    """bn2's output is later hit by `out += x` and ReLU(inplace); relu's by `+=` too."""
    a, b = twin_nets()
    x = x_batch()
    with lt.HiddenCapture(a, INPLACE_LAYERS) as fa, lt.HiddenCapture(b, INPLACE_LAYERS) as fb:
        a.eval()(x)
        b.eval()(x)
    for name in INPLACE_LAYERS:
        torch.testing.assert_close(fa[name], fb[name], rtol=0, atol=0)
    assert (fa["layer2.bn2"] < 0).any()  # before the residual ReLU: negatives survive
    # reference straight from the module: bn2(conv2(relu(bn1(conv1(h)))))
    h = a.stem(x)
    blk = a.layer1
    ref = blk.bn2(blk.conv2(torch.relu(blk.bn1(blk.conv1(h)))))
    torch.testing.assert_close(fa["layer1.bn2"], ref)


def test_gradients_through_captured_outputs_match_out_of_place_model():
    a, b = twin_nets()
    x = x_batch()
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    grads = []
    for model in (a, b):
        model.train()
        torch.manual_seed(3)  # same dropout mask
        with lt.HiddenCapture(model, INPLACE_LAYERS, detach=False) as feats:
            out = model(x)
        loss = nn.functional.cross_entropy(out, y)
        loss = loss + sum((f**2).mean() * (i + 1) for i, f in enumerate(feats.values()))
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)
    assert all(g.abs().sum() > 0 for g in grads[0].values())


def test_dropout_and_batchnorm_train_mode_capture_the_actual_forward():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 2))
    model.train()
    x = torch.randn(10, 4)
    with lt.HiddenCapture(model, ["1", "2"]) as feats:
        out = model(x)
    torch.testing.assert_close(out, model[3](feats["2"]))
    dropped = feats["2"] == 0
    assert dropped.any() and (~dropped).any()
    torch.testing.assert_close(feats["2"][~dropped], 2 * feats["1"][~dropped])


# -- tuple / dict / list outputs ------------------------------------------------------------


class Multi(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x: torch.Tensor):
        if self.kind == "tuple":
            return (None, x + 1, x + 2)
        if self.kind == "list":
            return [x * 2, "tag"]
        if self.kind == "dict":
            return {"meta": 3, "logits": x - 1, "hidden": x * 10}
        return ("no", "tensor")


class Wrap(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.inner = Multi(kind)

    def forward(self, x):
        return self.inner(x)


@pytest.mark.parametrize(
    "kind,index,expected",
    [
        ("tuple", 0, 1),
        ("tuple", 1, 2),
        ("tuple", -1, 2),
        ("list", 0, "x2"),
        ("dict", 0, -1),
        ("dict", "hidden", "x10"),
    ],
)
def test_structured_outputs_select_a_tensor(kind, index, expected):
    x = torch.arange(4.0).reshape(2, 2)
    model = Wrap(kind)
    with lt.HiddenCapture(model, "inner", output_index=index) as feats:
        model(x)
    want = {1: x + 1, 2: x + 2, -1: x - 1, "x2": x * 2, "x10": x * 10}[expected]
    torch.testing.assert_close(feats["inner"], want)


def test_structured_outputs_errors():
    x = torch.ones(2, 2)
    m = Wrap("none")
    with pytest.raises(ValueError, match="holds no tensor"):
        with lt.HiddenCapture(m, "inner"):  # construction is fine, the forward raises
            m(x)
    with pytest.raises(ValueError, match="out of range"):
        m = Wrap("tuple")
        with lt.HiddenCapture(m, "inner", output_index=2):
            m(x)
    with pytest.raises(ValueError, match="without key 'missing'"):
        m = Wrap("dict")
        with lt.HiddenCapture(m, "inner", output_index="missing"):
            m(x)
    with pytest.raises(ValueError, match="is a key"):
        m = Wrap("tuple")
        with lt.HiddenCapture(m, "inner", output_index="hidden"):
            m(x)
    with pytest.raises(ValueError, match="not a tensor"):
        m = Wrap("dict")
        with lt.HiddenCapture(m, "inner", output_index="meta"):
            m(x)


# -- copies ---------------------------------------------------------------------------------


def test_deepcopy_and_pickle_of_hooked_model_use_their_own_capture():
    model = Net().eval()
    cap = lt.HiddenCapture(model, "stem")
    x = x_batch()
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        clone(x)
        assert "stem" not in cap  # the original capture saw nothing
        hook = next(iter(clone.stem._forward_hooks.values()))
        torch.testing.assert_close(hook.capture["stem"], model.stem(x))
        cap.clear()  # model.stem(x) just fed the original capture
    cap.remove()


# -- wrappers: DDP and torch.compile ----------------------------------------------------------


def test_unwrap_model_peels_wrappers():
    model = Net()
    assert unwrap_model(nn.DataParallel(model)) is model


@pytest.fixture
def gloo_group(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    own = not dist.is_initialized()
    if own:
        dist.init_process_group(
            "gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1
        )
    yield
    if own:
        dist.destroy_process_group()


def test_ddp_wrapped_model_with_and_without_prefix(gloo_group):
    a, b = twin_nets()
    ddp = nn.parallel.DistributedDataParallel(a)
    cap = lt.HiddenCapture(ddp, ["module.layer1.bn2", "layer2.bn2", "module.layer*.relu"],
                           detach=False)
    assert cap.names == ["layer1.bn2", "layer2.bn2", "layer1.relu", "layer2.relu"]
    assert lt.HiddenCapture(ddp).names == ["layer1", "layer2.bn2"]  # hidden_layers of .module
    x = x_batch()
    ddp.eval()
    ref = lt.HiddenCapture(b.eval(), cap.names, detach=False)
    ddp(x)
    b(x)
    for name in cap.names:
        torch.testing.assert_close(cap[name], ref[name])
    sum(f.square().mean() for f in cap.features.values()).backward()
    sum(f.square().mean() for f in ref.features.values()).backward()
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    cap.remove()
    ref.remove()


def _compile_check(backend: str) -> None:
    torch._dynamo.reset()
    a, b = twin_nets()
    a.eval()
    b.eval()
    cap = lt.HiddenCapture(a, ["layer1.bn2", "layer2.relu"], detach=False)  # before compiling
    compiled = torch.compile(a, backend=backend)
    ref = lt.HiddenCapture(b, cap.names)
    x = x_batch()
    compiled(x)
    b(x)
    for name in cap.names:
        torch.testing.assert_close(cap[name], ref[name])
    assert cap["layer1.bn2"].requires_grad
    # names with the _orig_mod. prefix resolve against the original module
    assert resolve_layers(compiled, "_orig_mod.stem") == ["stem"]
    cap.remove()
    ref.remove()
    n_before = len(cap.features)
    cap.clear()
    compiled(x)
    assert len(cap.features) == 0 and n_before == 2  # removal is honoured (recompiles)
    torch._dynamo.reset()


def test_hooks_registered_before_torch_compile_are_honoured():
    _compile_check("eager")  # dynamo tracing only: fast


@pytest.mark.slow
def test_hooks_registered_before_torch_compile_inductor():
    _compile_check("inductor")  # ~20 s on a 2-core CPU (C++ codegen)
