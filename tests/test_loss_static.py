"""LSMLoss(num_classes=K): every hooked layer in one batched static call, equal to the
reference path, counters on the device, no host read after the first call, compile-able."""

from __future__ import annotations

import math

import pytest
import torch
from test_loss import MLP, data, twins
from test_soft_static import sync_ops
from test_surrogate import count_syncs
from torch import nn

import lsm_train as lt
from lsm_train.measures.soft import linalg


def _step(model, reg, x, y):
    for p in model.parameters():
        p.grad = None
    loss = nn.functional.cross_entropy(model(x), y) + reg(y)
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("scheme", ["pairwise", "ovr"])
@pytest.mark.parametrize("crossfit", [False, True])
def test_equals_the_reference_path(scheme, crossfit):
    a, b = twins()
    a, b = a.double().eval(), b.double().eval()
    x, y = data()
    x = x.double()
    kw = dict(weight=1.0, scheme=scheme, crossfit=crossfit, layer_weights=[0.3, 0.7])
    ra, rb = lt.LSMLoss(a, num_classes=5, **kw), lt.LSMLoss(b, **kw)
    (la, ga), (lb, gb) = _step(a, ra, x, y), _step(b, rb, x, y)
    assert la == pytest.approx(lb, abs=1e-10)
    assert ra.last == pytest.approx(rb.last, abs=1e-10)
    for p, q in zip(ga, gb, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-8, atol=1e-10)
    feats = {"a": x[:, :3] * 2, "b": x}
    assert lt.lsm_loss(feats, y, num_classes=3, crossfit=crossfit).item() == pytest.approx(
        lt.lsm_loss(feats, y, crossfit=crossfit).item(), abs=1e-10)


def test_one_batched_factorization_per_step(monkeypatch):
    model = MLP().train()
    x, y = data()
    reg = lt.LSMLoss(model, num_classes=3, crossfit=True)
    shapes = []
    real = linalg.SafeSolve.apply
    monkeypatch.setattr(linalg.SafeSolve, "apply",
                        lambda S, R: shapes.append(tuple(S.shape)) or real(S, R))
    _step(model, reg, x, y)
    assert shapes == [(4, 24, 24)]  # 2 layers x 2 folds, n x n, in one call


def test_counters_stay_on_the_device_and_count_skipped_and_nonfinite():
    model = MLP().train()
    x, y = data()
    reg = lt.LSMLoss(model, weight=1.0, num_classes=3, crossfit=True)
    model(x)
    reg(y)
    model(x)
    v = reg(torch.arange(24) % 3 * 0 + 1)  # one class
    assert v.item() == 0.0
    model(x[:3])
    assert reg(torch.tensor([0, 1, 2])).item() == 0.0  # crossfit: no class of >= 2 samples
    assert reg.skipped == 2 and reg.steps == 3 and reg.nonfinite == 0
    with torch.no_grad():
        model.block1.fc.weight[0, 0] = float("nan")
    model(x)
    assert math.isnan(reg(y).item()) and reg.nonfinite == 2
    assert set(reg.state_dict()) == {"num_steps", "num_skipped"}


@pytest.mark.parametrize("num_classes", [None, 3])
def test_crossfit_batch_of_single_samples_counts_as_skipped(num_classes):
    model = MLP().train()
    x, _ = data()
    reg = lt.LSMLoss(model, weight=1.0, crossfit=True, num_classes=num_classes)
    model(x[:3])
    assert reg(torch.tensor([0, 1, 2])).item() == 0.0
    assert reg.skipped == 1 and reg.last == {"block1.bn": 1.0, "block2": 1.0}


def test_labels_checked_on_the_first_call_then_nan():
    model = MLP().eval()
    x, y = data()
    reg = lt.LSMLoss(model, num_classes=3)
    model(x)
    with pytest.raises(ValueError, match=r"in \[0, num_classes=3\)"):
        reg(y + 1)
    model(x)
    reg(y)
    model(x)
    assert math.isnan(reg(y + 1).item())
    with pytest.raises(ValueError, match=r"in \[0, num_classes=3\)"):
        lt.lsm_loss(x, y + 1, num_classes=3)
    assert math.isnan(lt.lsm_loss(x, y + 1, num_classes=3, validate=False).item())


@pytest.mark.parametrize("num_classes", [None, 3])
def test_float_and_column_labels_raise(num_classes):
    model = MLP()
    x, y = data()
    reg = lt.LSMLoss(model, num_classes=num_classes)
    model(x)
    with pytest.raises(ValueError, match="integer class labels, got dtype"):
        reg(y.float())
    with pytest.raises(ValueError, match=r"column \(n, 1\)"):
        reg(y[:, None])
    with pytest.raises(ValueError, match="num_classes"):
        lt.LSMLoss(model, num_classes=-1)
    with pytest.raises(ValueError, match="detach_directions"):
        lt.LSMLoss(model, num_classes=3, detach_directions=True)


def test_no_host_sync_after_the_first_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 256), nn.ReLU(),
                          nn.Linear(256, 10))
    reg = lt.LSMLoss(model, layers=["1", "3"], num_classes=10, crossfit=True, warmup_steps=5)
    x, y = torch.randn(128, 32), torch.arange(128) % 10

    def step():
        (nn.functional.cross_entropy(model(x), y) + reg(y)).backward()

    step()
    with count_syncs() as calls:
        step()
    assert calls == []
    assert sync_ops(step) == []


def test_meta_tensors():
    feats = {"a": torch.empty(16, 8, 3, 3, device="meta", requires_grad=True),
             "b": torch.empty(16, 40, device="meta", requires_grad=True)}
    y = torch.empty(16, dtype=torch.long, device="meta")
    v = lt.lsm_loss(feats, y, num_classes=4, crossfit=True, validate=False)
    v.backward()
    assert feats["a"].grad.shape == (16, 8, 3, 3)


def assert_same_step(la, lb, a, b):
    """The losses of twin models ``a`` and ``b`` agree, and so do their gradients."""
    la.backward()
    lb.backward()
    assert la.item() == pytest.approx(lb.item(), rel=1e-6)
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_compiled_step_with_fullgraph_equals_eager():
    """Hooks registered before compiling; the whole step (model, LSMLoss) in one graph."""
    a, b = twins()
    a.eval()
    b.eval()
    x, y = data()
    ra = lt.LSMLoss(a, weight=1.0, num_classes=3, crossfit=True)
    rb = lt.LSMLoss(b, weight=1.0, num_classes=3, crossfit=True)

    def make(model, reg):
        return lambda x, y: nn.functional.cross_entropy(model(x), y) + reg(y)

    torch._dynamo.reset()
    compiled = torch.compile(make(a, ra), fullgraph=True, dynamic=False, backend="aot_eager")
    la = compiled(x, y)
    lb = make(b, rb)(x, y)
    assert_same_step(la, lb, a, b)
    torch._dynamo.reset()


def test_reference_path_inside_a_compiled_region_equals_eager():
    """Without num_classes the step still compiles (with graph breaks: the label layout and
    the host checks run eagerly; the fused node is not traced) and equals eager."""
    a, b = twins()
    a.eval()
    b.eval()
    x, y = data()
    ra, rb = lt.LSMLoss(a, weight=1.0), lt.LSMLoss(b, weight=1.0)
    torch._dynamo.reset()
    step = torch.compile(lambda x, y: nn.functional.cross_entropy(a(x), y) + ra(y),
                         backend="aot_eager")
    la, lb = step(x, y), nn.functional.cross_entropy(b(x), y) + rb(y)
    assert_same_step(la, lb, a, b)
    torch._dynamo.reset()
