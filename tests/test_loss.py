"""LSMLoss and lsm_loss: value, gradients, warmup, skipped batches, state, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from test_surrogate import count_syncs
from torch import nn

import lsm_train as lt
from lsm_train.measures.soft import soft_md_lsm


class Block(nn.Module):
    """Linear -> BatchNorm -> (+ residual, in place or not) -> ReLU(inplace or not)."""

    def __init__(self, d: int, inplace: bool) -> None:
        super().__init__()
        self.inplace = inplace
        self.fc = nn.Linear(d, d)
        self.bn = nn.BatchNorm1d(d)
        self.act = nn.ReLU(inplace=inplace)

    def forward(self, x):
        out = self.bn(self.fc(x))
        if self.inplace:
            out += x
        else:
            out = out + x
        return self.act(out)


class MLP(nn.Module):
    def __init__(self, inplace: bool = True, d_in: int = 5, d: int = 8, k: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.block1 = Block(d, inplace)
        self.drop = nn.Dropout(0.2)
        self.block2 = Block(d, inplace)
        self.head = nn.Linear(d, k)
        self.hidden_layers = ["block1.bn", "block2"]

    def forward(self, x):
        return self.head(self.block2(self.drop(self.block1(self.inp(x)))))


def data(n: int = 24, k: int = 3, d_in: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % k
    x = torch.randn(n, d_in, generator=g) + 0.7 * nn.functional.one_hot(y, d_in).float()
    return x, y


def twins(seed: int = 0):
    torch.manual_seed(seed)
    a, b = MLP(inplace=True), MLP(inplace=False)
    b.load_state_dict(a.state_dict())
    return a, b


# -- value and gradients ------------------------------------------------------------------


def test_value_matches_soft_md_lsm_reference_and_last_scores():
    model, ref = twins()
    model.eval()
    ref.eval()
    x, y = data()
    reg = lt.LSMLoss(model, weight=0.3, tau=0.7, scheme="ovr", shrinkage=0.2, crossfit=False)
    assert reg.names == ["block1.bn", "block2"]
    model(x)
    value = reg(y)
    h1 = ref.block1.bn(ref.block1.fc(ref.inp(x)))
    h2 = ref.block2(ref.block1(ref.inp(x)))
    s = [soft_md_lsm(h, y, 0.7, scheme="ovr", shrinkage=0.2).item() for h in (h1, h2)]
    assert value.ndim == 0
    assert math.isclose(value.item(), 0.3 * ((1 - s[0]) / 2 + (1 - s[1]) / 2), rel_tol=1e-5)
    assert reg.last == pytest.approx({"block1.bn": s[0], "block2": s[1]}, rel=1e-5)
    assert all(isinstance(v, float) for v in reg.last.values())
    assert 0 <= value.item() <= 0.3


def test_gradients_reach_the_model_and_match_an_out_of_place_twin():
    a, b = twins()
    x, y = data()
    grads = []
    for model in (a, b):
        model.train()
        reg = lt.LSMLoss(model, weight=1.0)
        torch.manual_seed(7)  # same dropout mask
        out = model(x)
        loss = nn.functional.cross_entropy(out, y) + reg(y)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        reg.remove()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)
    # the regulariser alone sends gradients to every layer before the captured ones
    model = MLP().train()
    reg = lt.LSMLoss(model, ["block1.bn"], weight=1.0)
    model(x)
    reg(y).backward()
    for name, p in model.named_parameters():
        if name.startswith(("inp.", "block1.fc", "block1.bn")):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_training_with_the_loss_raises_the_soft_score():
    torch.manual_seed(0)
    n, k = 96, 4
    g = torch.Generator().manual_seed(1)
    y = torch.arange(n) % k
    angle = y.float() * (2 * math.pi / k)
    x = torch.stack([angle.cos(), angle.sin()], 1) * 1.0 + 0.8 * torch.randn(n, 2, generator=g)
    x = torch.cat([x, torch.randn(n, 3, generator=g)], 1)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, k))
    reg = lt.LSMLoss(model, ["3"], weight=1.0, tau=0.5)

    def score() -> float:
        with lt.HiddenCapture(model, ["3"]) as feats:
            model(x)
        return soft_md_lsm(feats["3"], y, 0.5).item()

    before = score()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(25):
        opt.zero_grad()
        model(x)
        reg(y).backward()
        opt.step()
    after = score()
    print(before, after)
    assert after > before + 0.05, (before, after)
    assert reg.steps == 25


def test_layer_weights_dict_and_list():
    model = MLP().eval()
    x, y = data()
    values = []
    for lw in ({"block2": 3.0, "block1.bn": 0.5}, [0.5, 3.0]):
        reg = lt.LSMLoss(model, weight=2.0, layer_weights=lw)
        model(x)
        values.append(reg(y).item())
        s = reg.last
        reg.remove()
    expected = 2.0 * (0.5 * (1 - s["block1.bn"]) + 3.0 * (1 - s["block2"]))
    assert values == pytest.approx([expected, expected], rel=1e-6)


def test_functional_form_dict_and_tensor():
    torch.manual_seed(0)
    x, y = data()
    h = torch.randn(24, 3, 4, 4, requires_grad=True)  # conv map: avg-pooled by reduce="auto"
    s = soft_md_lsm(h.mean((2, 3)), y, 0.5).item()
    v = lt.lsm_loss(h, y, weight=0.5, crossfit=False)
    assert math.isclose(v.item(), 0.5 * (1 - s), rel_tol=1e-5)
    v.backward()
    assert h.grad is not None and h.grad.abs().sum() > 0
    feats = {"a": h.detach().mean((2, 3)), "b": x}
    both = lt.lsm_loss(feats, y, weight=1.0, layer_weights={"a": 1.0, "b": 0.0}, scheme="ovr",
                       crossfit=False)
    assert math.isclose(both.item(), 1 - soft_md_lsm(feats["a"], y, scheme="ovr").item(),
                        rel_tol=1e-5)


def test_crossfit_is_passed_through():
    model = MLP().eval()
    x, y = data()
    reg = lt.LSMLoss(model, ["block2"], weight=1.0, crossfit=True)
    model(x)
    v = reg(y).item()
    with torch.no_grad():
        h = model.block2(model.block1(model.inp(x)))
    crossfit, in_sample = soft_md_lsm(h, y, crossfit=True).item(), soft_md_lsm(h, y).item()
    assert abs(crossfit - in_sample) > 1e-3  # the option matters on this batch
    assert math.isclose(v, 1 - crossfit, rel_tol=1e-5)
    f = lt.lsm_loss(h, y, weight=1.0, crossfit=True).item()
    assert math.isclose(f, 1 - crossfit, rel_tol=1e-5)
    default = lt.LSMLoss(model, ["block2"], weight=1.0)  # cross-fitted by default
    model(x)
    assert math.isclose(default(y).item(), 1 - crossfit, rel_tol=1e-5)
    assert math.isclose(lt.lsm_loss(h, y, weight=1.0).item(), 1 - crossfit, rel_tol=1e-5)


def test_half_precision_features_are_upcast():
    x, y = data()
    h = x.to(torch.bfloat16)
    v = lt.lsm_loss(h, y, weight=1.0, crossfit=False)
    assert v.dtype == torch.float32 and torch.isfinite(v)
    assert math.isclose(v.item(), 1 - soft_md_lsm(h.float(), y).item(), rel_tol=1e-6)


# -- warmup, skipped batches, state ---------------------------------------------------------


def test_warmup_ramps_linearly_and_counts_training_calls_only():
    model = MLP().eval()  # eval: deterministic features
    x, y = data()
    full = lt.LSMLoss(model, weight=0.4)
    model(x)
    target = full(y).item()
    full.remove()
    reg = lt.LSMLoss(model, weight=0.4, warmup_steps=4)
    got = []
    for counted in [False, True, True, True, True, True, True]:
        model.eval()
        model(x)  # identical features every call
        model.train(counted)  # the model's mode at reg() time gates the counter
        got.append(reg(y).item())
    assert got == pytest.approx(
        [0, 0, 0.25 * target, 0.5 * target, 0.75 * target, target, target], abs=1e-6
    )
    assert reg.steps == 6
    # the loss module's own mode gates it too
    reg.eval()
    model(x)
    reg(y)
    assert reg.steps == 6 and reg.ramp() == 1.0


def test_state_dict_resumes_the_warmup():
    model = MLP().eval()
    x, y = data()
    reg = lt.LSMLoss(model, warmup_steps=10)
    model.train()
    for _ in range(3):
        model(x)
        reg(y)
    state = reg.state_dict()
    assert set(state) == {"num_steps", "num_skipped"} and int(state["num_steps"]) == 3
    assert list(reg.parameters()) == []
    reg.remove()
    resumed = lt.LSMLoss(model, warmup_steps=10)
    resumed.load_state_dict(state)
    assert resumed.steps == 3 and resumed.ramp() == pytest.approx(0.3)


def test_single_class_batch_contributes_zero_and_is_counted():
    model = MLP().train()
    x, _ = data()
    reg = lt.LSMLoss(model, weight=1.0)
    model(x)
    v = reg(torch.full((24,), 2))
    assert v.item() == 0.0 and reg.skipped == 1
    v.backward()
    for name, p in model.named_parameters():
        assert p.grad is None or bool(torch.isfinite(p.grad).all()), name
        assert p.grad is None or float(p.grad.abs().sum()) == 0.0, name
    assert reg.last == {"block1.bn": 1.0, "block2": 1.0}
    model(x)
    reg(data()[1])
    assert reg.skipped == 1


def test_diverged_model_gives_nan_loss_not_an_exception():
    model = MLP().eval()
    x, y = data()
    reg = lt.LSMLoss(model, weight=1.0)
    with torch.no_grad():
        model.block1.fc.weight[0, 0] = float("nan")
    model(x)
    v = reg(y)
    assert math.isnan(v.item()) and math.isnan(reg.last["block2"])
    with pytest.raises(ValueError, match="finite"):
        lt.lsm_loss(torch.full((24, 3), float("inf")), y)


# -- errors ----------------------------------------------------------------------------------


def test_call_before_forward_twice_or_after_remove_raises():
    model = MLP()
    x, y = data()
    reg = lt.LSMLoss(model)
    with pytest.raises(RuntimeError, match="run model"):
        reg(y)
    model(x)
    reg(y)
    with pytest.raises(RuntimeError, match="used once"):
        reg(y)
    reg.remove()
    reg.remove()
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0
    model(x)
    with pytest.raises(RuntimeError, match="removed"):
        reg(y)


def test_layer_not_run_in_latest_forward_raises():
    model = MLP()
    reg = lt.LSMLoss(model)
    model.block2(torch.randn(4, 8))  # only block2 ran
    with pytest.raises(RuntimeError, match="did not run"):
        reg(torch.tensor([0, 1, 0, 1]))


def test_label_mismatch_raises():
    model = MLP()
    x, y = data()
    reg = lt.LSMLoss(model)
    model(x)
    with pytest.raises(ValueError, match="expected 24 labels"):
        reg(y[:10])
    with pytest.raises(ValueError, match="1-D"):
        reg(nn.functional.one_hot(y))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"weight": -1.0}, "weight"),
        ({"weight": float("nan")}, "weight"),
        ({"tau": 0.0}, "tau"),
        ({"scheme": "ova"}, "scheme"),
        ({"shrinkage": 1.5}, "shrinkage"),
        ({"reduce": "max"}, "reduce"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"warmup_steps": 2.5}, "warmup_steps"),
        ({"layer_weights": [1.0]}, "expected 2 weights"),
        ({"layer_weights": {"block2": 1.0}}, "missing"),
        ({"layer_weights": {"block2": 1.0, "block1.bn": 1.0, "x": 1.0}}, "unknown"),
        ({"layer_weights": [1.0, -1.0]}, "layer_weights"),
        ({"layer_weights": [0.0, 0.0]}, "all weights are 0"),
        ({"layer_weights": "block2"}, "layer_weights"),
        ({"layers": "nope"}, "matches no module"),
    ],
)
def test_bad_options_raise_and_leave_no_hooks(kwargs, match):
    model = MLP()
    with pytest.raises(ValueError, match=match):
        lt.LSMLoss(model, **kwargs)
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


def test_functional_bad_inputs():
    x, y = data()
    with pytest.raises(ValueError, match="empty dict"):
        lt.lsm_loss({}, y)
    with pytest.raises(ValueError, match="expected a tensor"):
        lt.lsm_loss({"a": [1, 2]}, y)
    with pytest.raises(ValueError, match="features"):
        lt.lsm_loss([x], y)
    with pytest.raises(ValueError, match="expected 24 labels"):
        lt.lsm_loss(x, y[:3])
    with pytest.raises(ValueError, match="tau"):
        lt.lsm_loss(x, y, tau=-1)
    with pytest.raises(ValueError, match="batch"):
        lt.lsm_loss(x[0], y[:1])


# -- wrappers ----------------------------------------------------------------------------------


def _same_grads_as_twin(wrap) -> None:
    a, b = twins()
    a.eval()
    b.eval()
    x, y = data()
    ra, rb = lt.LSMLoss(a, weight=1.0), lt.LSMLoss(b, weight=1.0)  # hooks before wrapping
    wrapped = wrap(a)
    for _ in range(2):  # second call: the cached compiled graph
        for p in (*a.parameters(), *b.parameters()):
            p.grad = None
        (nn.functional.cross_entropy(wrapped(x), y) + ra(y)).backward()
        (nn.functional.cross_entropy(b(x), y) + rb(y)).backward()
        assert ra.last == pytest.approx(rb.last, rel=1e-6)
        for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, msg=name)
    ra.remove()
    rb.remove()


def test_loss_through_a_compiled_model_has_the_eager_gradients():
    torch._dynamo.reset()
    _same_grads_as_twin(lambda m: torch.compile(m, backend="aot_eager"))  # joint fwd+bwd graph
    torch._dynamo.reset()


def test_loss_on_ddp_model(tmp_path):
    import torch.distributed as dist

    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                                world_size=1)
    try:
        model = MLP()
        ddp = nn.parallel.DistributedDataParallel(model)
        reg = lt.LSMLoss(ddp, ["module.block2", "block1.bn"])
        assert reg.names == ["block2", "block1.bn"]
        reg.remove()
        _same_grads_as_twin(nn.parallel.DistributedDataParallel)
    finally:
        if own:
            dist.destroy_process_group()


@pytest.mark.parametrize("new_labels", [False, True])
def test_host_syncs_per_step(new_labels):
    """Host syncs of one LSMLoss step (forward and backward) on 2 layers, n = 128, 10
    classes: the same label tensor every step, or a new one (as from a data loader). Upper
    bounds (see test_surrogate.count_syncs): lower them when a change removes a sync."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 256), nn.ReLU(),
                          nn.Linear(256, 10))
    reg = lt.LSMLoss(model, layers=["1", "3"], crossfit=False)  # the in-sample path
    x, y = torch.randn(128, 32), torch.arange(128) % 10

    def step():
        lab = y[torch.randperm(128)] if new_labels else y
        (nn.functional.cross_entropy(model(x), lab) + reg(lab)).backward()

    step()
    with count_syncs() as calls:
        step()
    assert len(calls) <= (4 if new_labels else 3), calls  # labels once, 1 per layer


def test_label_buffer_refilled_in_place_between_steps():
    """LSMLoss trusts label identity only while it scores one batch: a buffer refilled through
    a numpy view (no version bump) between steps gives the value of the new labels."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
    reg = lt.LSMLoss(model, layers=["1", "3"], weight=1.0)
    x, buf = torch.randn(60, 8), torch.arange(60) % 3
    model(x)
    reg(buf)
    buf.numpy()[:] = (torch.arange(60) % 4).numpy()
    model(x)
    got = reg(buf).item()
    model(x)
    assert got == pytest.approx(reg(buf.clone()).item())
