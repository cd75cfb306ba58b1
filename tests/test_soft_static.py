"""The static, sync-free soft MD-LSM (``num_classes=K``) against the recorded-autograd
reference, and the three guards that it reads nothing to the host (meta tensors, a profiler
blocklist of sync-type operators, torch._dynamo with fullgraph=True)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from lsm_train.measures.soft import reference, soft_md_lsm, soft_pair_score, static_scores
from lsm_train.measures.soft.layout import LabelLayout

# operators that read a value to the host or have a data-dependent output shape
SYNC_OPS = ("aten::nonzero", "aten::item", "aten::_local_scalar_dense", "aten::unique",
            "aten::_unique", "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive",
            "aten::masked_select", "aten::equal", "aten::is_nonzero")


def _data(n, d, labels, seed=0, shift=1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    y = torch.as_tensor(labels)
    H = torch.randn(n, d, generator=g, dtype=dtype) + shift * torch.randn(
        int(y.max()) + 1, d, generator=g, dtype=dtype)[y]
    return H, y


def _labels(n, classes, singletons=(), seed=0):
    """n labels over ``classes`` (shuffled) plus one sample of each class in ``singletons``."""
    g = torch.Generator().manual_seed(seed)
    y = torch.as_tensor(classes)[torch.arange(n - len(singletons)) % len(classes)]
    y = torch.cat([y, torch.as_tensor(singletons, dtype=torch.long)])
    return y[torch.randperm(n, generator=g)]


def _reference(H, y, scheme, shrinkage, crossfit, tau=0.5):
    """Value and gradient of the recorded-autograd path on the classes present."""
    Hg = H.clone().requires_grad_(True)
    lay = LabelLayout(y)
    if crossfit:
        v = reference.soft_md_lsm_crossfit(Hg, lay, tau, scheme, shrinkage)
    else:
        v = reference.soft_md_lsm_tasks(Hg, y, tau, scheme, shrinkage, lay=lay).mean()
    (g,) = torch.autograd.grad(v, Hg)
    return v.item(), g


def _static(H, y, K, scheme, shrinkage, crossfit, tau=0.5, **kw):
    Hg = H.clone().requires_grad_(True)
    v = soft_md_lsm(Hg, y, tau, scheme=scheme, shrinkage=shrinkage, crossfit=crossfit,
                    num_classes=K, **kw)
    (g,) = torch.autograd.grad(v, Hg)
    return v.item(), g


def _close(static, ref):
    (vs, gs), (vr, gr) = static, ref
    assert vs == pytest.approx(vr, abs=1e-10)
    scale = float(gr.abs().max()) or 1.0
    np.testing.assert_allclose(gs.numpy(), gr.numpy(), rtol=0, atol=1e-10 * max(1.0, scale))


@pytest.mark.parametrize("scheme", ["pairwise", "ovr"])
@pytest.mark.parametrize("n,d", [(30, 5), (14, 40)])  # primal (d <= n) and dual (d > n)
@pytest.mark.parametrize("crossfit", [False, True])
@pytest.mark.parametrize("shrinkage", [0.0, 0.4, 1.0])
def test_equals_reference(scheme, n, d, crossfit, shrinkage):
    """Classes 1 and 4 absent of K = 6, class 5 a single sample."""
    y = _labels(n, [0, 2, 3], singletons=[5])
    H, _ = _data(n, d, y)
    _close(_static(H, y, 6, scheme, shrinkage, crossfit), _reference(H, y, scheme, shrinkage,
                                                                       crossfit))


@pytest.mark.parametrize("crossfit", [False, True])
@pytest.mark.parametrize("exponent", [-40, 40])
def test_scaled_features_equal_reference(crossfit, exponent):
    y = _labels(24, [0, 1, 2])
    H, _ = _data(24, 30, y)
    H = H * 2.0**exponent
    ref = _reference(H, y, "pairwise", 0.1, crossfit)
    _close(_static(H, y, 3, "pairwise", 0.1, crossfit), ref)
    base = _reference(H * 2.0**-exponent, y, "pairwise", 0.1, crossfit)[0]
    assert ref[0] == pytest.approx(base, abs=1e-10)  # scale invariance of the reference too


@pytest.mark.parametrize("crossfit", [False, True])
@pytest.mark.parametrize("d", [4, 20])
def test_one_class_batch_is_exactly_one_with_zero_gradient(crossfit, d):
    H, _ = _data(12, d, torch.zeros(12, dtype=torch.long))
    for y in (torch.full((12,), 3), _labels(12, [1]) if not crossfit else
              torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 2, 2])):  # crossfit: one class of >= 2
        v, g = _static(H, y, 10, "pairwise", 0.1, crossfit)
        assert v == 1.0
        assert torch.isfinite(g).all() and (g == 0).all()


def test_many_layers_in_one_batched_call_equal_each_reference():
    y = _labels(20, [0, 1, 2, 3], singletons=[6])
    layers = [_data(20, d, y, seed=d)[0].requires_grad_(True) for d in (3, 20, 57)]
    for scheme in ("pairwise", "ovr"):
        for crossfit in (False, True):
            values, degenerate = static_scores(layers, y, 8, tau=0.5, scheme=scheme,
                                               shrinkage=0.2, crossfit=crossfit)
            assert not bool(degenerate)
            grads = torch.autograd.grad(values.sum(), layers)
            for X, v, g in zip(layers, values, grads, strict=True):
                _close((v.item(), g), _reference(X.detach(), y, scheme, 0.2, crossfit))


def test_failed_factorization_falls_back_to_the_mean_difference(monkeypatch):
    """Where cholesky_ex reports a failure, the direction is μ_k − μ_l in units of √α: the
    soft AUC (soft_pair_score) of w = δ / (|δ| √α)."""
    y = torch.arange(16) % 2
    H, _ = _data(16, 6, y)
    real = torch.linalg.cholesky_ex
    monkeypatch.setattr(torch.linalg, "cholesky_ex",
                        lambda S: (real(S)[0], torch.ones(S.shape[:-2], dtype=torch.int32)))
    v, g = _static(H, y, 2, "pairwise", 0.3, False)
    assert torch.isfinite(g).all()
    A, B = H[y == 0], H[y == 1]
    delta = A.mean(0) - B.mean(0)
    U = H - torch.stack([A.mean(0), B.mean(0)])[y]
    Hc = H - H.mean(0)
    n, d = H.shape
    alpha = 0.3 * U.square().sum() / ((n - 2) * d) + 1e-6 * Hc.square().sum() / (n * d)
    w = delta / (delta.norm() * alpha.sqrt())
    assert v == pytest.approx(soft_pair_score(A, B, w, 0.5).item(), abs=1e-12)


def test_validation_raises_or_gives_nan():
    y = _labels(20, [0, 1, 2])
    H, _ = _data(20, 6, y)
    bad_label = y.clone()
    bad_label[0] = 5
    Hn = H.clone()
    Hn[3, 2] = float("nan")
    Hi = H.clone()
    Hi[1, 1] = float("inf")
    with pytest.raises(ValueError, match=r"in \[0, num_classes=5\)"):
        soft_md_lsm(H, bad_label, num_classes=5)
    with pytest.raises(ValueError, match=r"in \[0, num_classes=3\)"):
        soft_md_lsm(H, y - 1, num_classes=3)
    with pytest.raises(ValueError, match="finite"):
        soft_md_lsm(Hn, y, num_classes=3)
    for crossfit in (False, True):
        assert torch.isnan(soft_md_lsm(H, bad_label, num_classes=5, validate=False,
                                       crossfit=crossfit))
        for X in (Hn, Hi):
            assert torch.isnan(soft_md_lsm(X, y, num_classes=3, validate=False,
                                           crossfit=crossfit))
    with pytest.raises(ValueError, match="num_classes"):
        soft_md_lsm(H, y, num_classes=0)
    with pytest.raises(ValueError, match="num_classes"):
        soft_md_lsm(H, y, num_classes=2.0)
    with pytest.raises(ValueError, match="detach_directions"):
        soft_md_lsm(H, y, num_classes=3, detach_directions=True)


def test_float32_maps_and_numpy_inputs():
    y = _labels(16, [0, 1, 2, 3])
    H, _ = _data(16, 12, y, dtype=torch.float32)
    v = soft_md_lsm(H.reshape(16, 3, 2, 2), y, num_classes=4, reduce="flatten")
    ref = reference.soft_md_lsm_tasks(H.double(), y, 0.5, "pairwise", 0.1).mean()
    assert v.dtype == torch.float32
    assert v.item() == pytest.approx(ref.item(), abs=1e-5)
    assert soft_md_lsm(H.numpy(), y.numpy(), num_classes=4).item() == pytest.approx(v.item())


# --------------------------------------------------------------------------- sync-free guards

_CASES = [(scheme, crossfit, d) for scheme in ("pairwise", "ovr") for crossfit in (False, True)
          for d in (5, 40)]


@pytest.mark.parametrize("scheme,crossfit,d", _CASES)
def test_forward_and_backward_on_meta_tensors(scheme, crossfit, d):
    """Any host read raises on the meta device."""
    H = torch.empty(16, d, device="meta", dtype=torch.float64, requires_grad=True)
    y = torch.empty(16, device="meta", dtype=torch.long)
    v = soft_md_lsm(H, y, scheme=scheme, crossfit=crossfit, num_classes=5, validate=False)
    v.backward()
    assert v.shape == () and H.grad.shape == H.shape
    values, _ = static_scores([H, H[:, :3]], y, 5, tau=0.5, scheme=scheme, shrinkage=0.1,
                              crossfit=crossfit)
    values.sum().backward()


def sync_ops(fn) -> list[str]:
    """The sync-type operators dispatched while ``fn()`` runs (autograd's backward included;
    boolean-mask indexing shows as the aten::nonzero it dispatches)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sorted({e.name for e in prof.events() if e.name in SYNC_OPS})


@pytest.mark.parametrize("scheme,crossfit,d", _CASES)
def test_no_sync_type_operator_in_forward_and_backward(scheme, crossfit, d):
    y = _labels(24, [0, 1, 3], singletons=[4])
    H = _data(24, d, y)[0].float().requires_grad_(True)

    def step():
        soft_md_lsm(H, y, scheme=scheme, crossfit=crossfit, num_classes=5,
                    validate=False).backward()

    assert sync_ops(step) == []


def test_the_blocklist_sees_the_reference_paths_syncs():
    y = _labels(24, [0, 1, 3])
    H = _data(24, 5, y)[0].requires_grad_(True)
    assert "aten::_local_scalar_dense" in sync_ops(lambda: soft_md_lsm(H, y).backward())
    found = sync_ops(lambda: soft_md_lsm(H, y, crossfit=True).backward())
    assert {"aten::nonzero", "aten::_unique2"} <= set(found), found
    assert sync_ops(lambda: H[H[:, 0] > 0]) == ["aten::nonzero"]


def test_compiles_with_fullgraph_and_no_graph_breaks():
    """torch._dynamo.explain: zero graph breaks; fullgraph=True with aot_eager (forward and
    backward graphs) equals eager."""
    y = _labels(12, [0, 1, 2], singletons=[3])
    H = _data(12, 16, y)[0]

    def fn(X, labels):
        return soft_md_lsm(X, labels, num_classes=5, crossfit=True, validate=False)

    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(H, y)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, dynamic=False, backend="aot_eager")
    Hc, He = H.clone().requires_grad_(True), H.clone().requires_grad_(True)
    vc, ve = compiled(Hc, y), fn(He, y)
    (gc,), (ge,) = torch.autograd.grad(vc, Hc), torch.autograd.grad(ve, He)
    assert vc.item() == pytest.approx(ve.item(), abs=1e-12)
    torch.testing.assert_close(gc, ge, rtol=1e-9, atol=1e-12)
    torch._dynamo.reset()
