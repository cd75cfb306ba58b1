"""The library on a CUDA device, with values and gradients compared against the CPU's.

Skipped where no GPU is present (CI); run on a GPU machine with
``python -m pytest tests/test_cuda.py``. ``LSM_TRAIN_TEST_DEVICE=cpu`` runs the same file with
the CPU standing in for the GPU (it then checks only that the tests themselves are sound).

What is checked: the measures and the surrogate accept CUDA tensors and give the CPU's
values, the gradient of the surrogate matches, LSMLoss works under autocast (float16 and
bfloat16), the guard restores CUDA parameters and optimizer state bit for bit (also with its
snapshot kept on the CPU), works with a real float16 GradScaler (steps, and skips a step
with infinite gradients without a check), and the Hydra app trains on ``trainer=gpu``.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import lsm_train as lt
from lsm_train.guard import SeparabilityGuard

DEV = os.environ.get("LSM_TRAIN_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEV == "cuda" and not torch.cuda.is_available(),
                                reason="needs CUDA")


def blobs(n: int = 96, d: int = 24, k: int = 3, seed: int = 0, sep: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % k
    centres = torch.randn(k, d, generator=g, dtype=torch.float64) * sep
    return torch.randn(n, d, generator=g, dtype=torch.float64) + centres[y], y


class ConvNet(nn.Module):
    """BatchNorm, in-place ReLU and a residual add; hidden layers as the zoo names them."""

    hidden_layers = ["block1", "block2"]

    def __init__(self) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8),
                                    nn.ReLU(inplace=True))
        self.block2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8),
                                    nn.ReLU(inplace=True))
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block1(x)
        h = h + self.block2(h)
        return self.fc(h.mean((2, 3)))


def image_batch(n: int = 48, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randn(n, 3, 8, 8, generator=g) + y[:, None, None, None].float()
    return x, y


# ------------------------------------------------------------------ measures --------------
def test_exact_measures_match_cpu():
    H, y = blobs(sep=3.0)
    A, B = H[y == 0], H[y == 1]
    cert_cpu, cert_gpu = lt.separability_test(A, B), lt.separability_test(A.to(DEV), B.to(DEV))
    assert cert_gpu.separable == cert_cpu.separable
    assert lt.md_lsm(A.to(DEV), B.to(DEV)) == pytest.approx(lt.md_lsm(A, B), abs=1e-9)
    assert lt.md_lsm_margin(A.to(DEV), B.to(DEV)) == pytest.approx(
        lt.md_lsm_margin(A, B), rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("method", ["degree", "margin", "soft"])
def test_layer_separability_matches_cpu(method):
    H, y = blobs(n=120, d=16, k=4, sep=0.7)
    cpu = lt.layer_separability(H, y, method=method)
    gpu = lt.layer_separability(H.to(DEV), y.to(DEV), method=method)
    assert gpu == pytest.approx(cpu, rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("d", [16, 200])  # primal (d <= n) and dual (d > n) solves
@pytest.mark.parametrize("crossfit", [False, True])
def test_soft_md_lsm_value_and_gradient_match_cpu(d, crossfit):
    H, y = blobs(n=96, d=d, k=3, sep=0.5)
    Hc = H.clone().requires_grad_(True)
    Hg = H.to(DEV).requires_grad_(True)
    vc = lt.soft_md_lsm(Hc, y, crossfit=crossfit)
    vg = lt.soft_md_lsm(Hg, y.to(DEV), crossfit=crossfit)
    assert vg.device.type == DEV
    assert vg.item() == pytest.approx(vc.item(), rel=1e-9, abs=1e-12)
    vc.backward()
    vg.backward()
    torch.testing.assert_close(Hg.grad.cpu(), Hc.grad, rtol=1e-7, atol=1e-10)


def test_soft_md_lsm_float32_large_batch_blocked_path():
    H, y = blobs(n=1200, d=32, k=5, sep=0.4)  # n² above the dense path: the blocked one
    cpu = lt.soft_md_lsm(H.float(), y).item()
    gpu = lt.soft_md_lsm(H.float().to(DEV), y.to(DEV)).item()
    assert gpu == pytest.approx(cpu, abs=1e-4)


# ------------------------------------------------------------------ the static path -------
real_cuda = pytest.mark.skipif(DEV != "cuda", reason="CUDA sync checks and graphs need a GPU")


def _no_sync():
    """Raise on any host sync inside the block (CUDA only; nothing on the CPU stand-in)."""
    import contextlib

    @contextlib.contextmanager
    def mode():
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")

    return mode() if DEV == "cuda" else contextlib.nullcontext()


@pytest.mark.parametrize("scheme", ["pairwise", "ovr"])
@pytest.mark.parametrize("d", [16, 200])
@pytest.mark.parametrize("crossfit", [False, True])
def test_static_soft_md_lsm_is_sync_free_and_matches_cpu(scheme, d, crossfit):
    H, y = blobs(n=96, d=d, k=3, sep=0.5)
    Hc = H.clone().requires_grad_(True)
    Hg = H.to(DEV).requires_grad_(True)
    yg = y.to(DEV)
    vc = lt.soft_md_lsm(Hc, y, scheme=scheme, crossfit=crossfit)
    with _no_sync():
        vg = lt.soft_md_lsm(Hg, yg, scheme=scheme, crossfit=crossfit, num_classes=5,
                            validate=False)
        vg.backward()
    assert vg.item() == pytest.approx(vc.item(), rel=1e-9, abs=1e-12)
    vc.backward()
    torch.testing.assert_close(Hg.grad.cpu(), Hc.grad, rtol=1e-7, atol=1e-10)


def _static_runner(seed: int = 0):
    torch.manual_seed(seed)
    model = ConvNet().to(DEV)
    reg = lt.LSMLoss(model, weight=0.5, num_classes=3, crossfit=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def step(x, y):
        loss = F.cross_entropy(model(x), y) + reg(y)
        loss.backward()
        opt.step()
        return loss.detach()

    return model, reg, opt, step


@real_cuda
def test_lsm_loss_static_step_is_sync_free_and_replays_from_a_cuda_graph():
    """A training step with LSMLoss(num_classes=K): no host sync after the first call, and
    captured in a CUDA graph its replays train like the eager twin."""
    x, y = (t.to(DEV) for t in image_batch())
    model, reg, opt, step = _static_runner()
    twin, twin_reg, twin_opt, twin_step = _static_runner()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up: the first call checks the labels (a sync)
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            step(x, y)
    torch.cuda.current_stream().wait_stream(stream)
    opt.zero_grad(set_to_none=True)
    with _no_sync():
        step(x, y)  # eager, after the first call: sync-free
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        loss = step(x, y)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    for _ in range(4 + 3):
        twin_opt.zero_grad(set_to_none=True)
        twin_loss = twin_step(x, y)
    assert loss.item() == pytest.approx(twin_loss.item(), rel=1e-4)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    assert reg.steps == twin_reg.steps == 7 and reg.skipped == 0


# ------------------------------------------------------------------ capture and loss ------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lsm_loss_under_autocast_has_finite_gradients(dtype):
    torch.manual_seed(0)
    model = ConvNet().to(DEV)
    reg = lt.LSMLoss(model, weight=0.5)
    x, y = (t.to(DEV) for t in image_batch())
    with torch.autocast(DEV, dtype=dtype):
        logits = model(x)
        loss = F.cross_entropy(logits, y) + reg(y)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert set(reg.last) == {"block1", "block2"}
    assert all(0.0 < v < 1.0 for v in reg.last.values())
    for p in model.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()


def test_lsm_loss_matches_cpu():
    torch.manual_seed(0)
    cpu_model = ConvNet().double()
    gpu_model = ConvNet().double()
    gpu_model.load_state_dict(cpu_model.state_dict())
    gpu_model.to(DEV)
    x, y = image_batch()
    reg_c, reg_g = lt.LSMLoss(cpu_model), lt.LSMLoss(gpu_model)
    cpu_model(x.double())
    gpu_model(x.double().to(DEV))
    vc, vg = reg_c(y), reg_g(y.to(DEV))
    assert vg.item() == pytest.approx(vc.item(), rel=1e-9)
    vc.backward()
    vg.backward()
    with_grad = 0
    for pc, pg in zip(cpu_model.parameters(), gpu_model.parameters(), strict=True):
        assert (pc.grad is None) == (pg.grad is None)  # the head gets none from the reg
        if pc.grad is not None:
            torch.testing.assert_close(pg.grad.cpu(), pc.grad, rtol=1e-6, atol=1e-9)
            with_grad += 1
    assert with_grad >= 4


def test_hidden_capture_on_cuda_sees_pre_inplace_output():
    model = ConvNet().to(DEV).eval()
    x, _ = image_batch()
    with lt.HiddenCapture(model, ["block1.1"]) as feats, torch.no_grad():
        model(x.to(DEV))
    h = feats["block1.1"]  # BatchNorm output, later modified by the in-place ReLU
    assert h.device.type == DEV and (h < 0).any()


# ------------------------------------------------------------------ guard -----------------
def _state_copy(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    state = {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
             for p, s in opt.state.items()}
    return params, state


def _assert_same(model, opt, ref):
    params, state = ref
    for p, q in zip(model.parameters(), params, strict=True):
        assert torch.equal(p, q)
    for p, s in opt.state.items():
        for k, v in s.items():
            r = state[id(p)][k]
            assert torch.equal(v, r) if torch.is_tensor(v) else v == r


@pytest.mark.parametrize("snapshot_device", [None, "cpu"])
def test_guard_rejection_restores_cuda_state_bitwise(snapshot_device):
    torch.manual_seed(0)
    model = ConvNet().to(DEV)
    inner = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = (t.to(DEV) for t in image_batch())
    values = iter([0.9, 0.9, 0.9, 0.9, 0.1, 0.1])  # step 1 accepted, step 2 rejected

    def scripted(H, labels):
        assert H.device.type == DEV
        return next(values)

    guard = SeparabilityGuard(inner, model, image_batch(30, seed=1), measure=scripted,
                              z=0.0, snapshot_device=snapshot_device)
    assert guard.scorer.probe.inputs.device.type == DEV  # the probe follows the params
    F.cross_entropy(model(x), y).backward()
    guard.step()
    assert guard.last_decision.accepted
    ref = _state_copy(model, inner)
    guard.zero_grad()
    F.cross_entropy(model(x), y).backward()
    guard.step()
    assert not guard.last_decision.accepted
    _assert_same(model, inner, ref)
    for key, buf in guard.snapshot._buffers.items():  # Adam's step counters live on the CPU
        if snapshot_device == "cpu":
            assert buf.device.type == "cpu"
        elif key[0] == "param":
            assert buf.device.type == DEV, key


def test_guard_with_float16_grad_scaler():
    torch.manual_seed(0)
    model = ConvNet().to(DEV)
    guard = SeparabilityGuard(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                              model, image_batch(30, seed=1), tolerance=1.0)
    scaler = torch.amp.GradScaler(DEV)
    x, y = (t.to(DEV) for t in image_batch())
    for _ in range(3):
        guard.zero_grad()
        with torch.autocast(DEV, dtype=torch.float16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(guard)
        scaler.update()
    assert guard.stats["steps"] == 3 and guard.stats["checks"] == 3
    assert guard.last_decision.accepted and 0.0 < guard.last_decision.after < 1.0

    guard.zero_grad()
    with torch.autocast(DEV, dtype=torch.float16):
        loss = F.cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    model.fc.weight.grad[0, 0] = float("inf")
    before = [p.detach().clone() for p in model.parameters()]
    scaler.step(guard)  # skipped by the scaler: no inner step, no check
    scaler.update()
    assert guard.stats["steps"] == 3
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def test_guard_soft_score_matches_cpu():
    torch.manual_seed(0)
    cpu_model = ConvNet().double()
    gpu_model = ConvNet().double()
    gpu_model.load_state_dict(cpu_model.state_dict())
    gpu_model.to(DEV)
    x, y = image_batch(40, seed=3)
    probe = (x.double(), y)
    g_cpu = SeparabilityGuard(torch.optim.SGD(cpu_model.parameters(), lr=0.1), cpu_model, probe)
    g_gpu = SeparabilityGuard(torch.optim.SGD(gpu_model.parameters(), lr=0.1), gpu_model, probe)
    assert g_gpu.score() == pytest.approx(g_cpu.score(), rel=1e-9)


# ------------------------------------------------------------------ app -------------------
def test_app_trains_on_gpu(tmp_path):
    from lsm_train.app import compose, train_from_config
    from lsm_train.models import create_model

    seen: set[str] = set()

    def factory(bundle):
        model = create_model("mlp", num_classes=bundle.num_classes,
                             in_channels=bundle.in_channels, image_size=bundle.image_size)
        model.register_forward_pre_hook(lambda m, inputs: seen.add(inputs[0].device.type))
        return model

    device = ["trainer=gpu"] if DEV == "cuda" else ["trainer.device=cpu"]
    cfg = compose([*device, "debug=smoke", "logger=none", "trainer.progress=false"])
    res = train_from_config(cfg, tmp_path, model_factory=factory)
    assert res.status == "completed" and res.step > 0
    assert seen == {DEV}
    assert 0.0 <= res.final["val/acc"] <= 1.0 and res.final["guard/accept_rate"] > 0


def test_app_resumes_a_gpu_checkpoint(tmp_path):
    """The checkpoint is loaded with map_location=cuda: the RNG byte tensors must go back
    to the CPU before torch.set_rng_state (this failed on the first GPU run)."""
    from lsm_train.app import compose, train_from_config

    device = ["trainer=gpu"] if DEV == "cuda" else ["trainer.device=cpu"]
    args = [*device, "debug=smoke", "lsm=off", "logger=none", "trainer.progress=false"]
    first = train_from_config(compose(args), tmp_path, recipe="quickstart")
    assert first.status == "completed" and first.step == 3
    res = train_from_config(compose([*args, "trainer.epochs=2", "trainer.max_steps=6",
                                     "resume=true"]), tmp_path,
                            recipe="quickstart")
    assert res.status == "completed" and res.step == 6


def test_measure_layers_takes_a_host_probe_for_a_gpu_model():
    from lsm_train.trainer import measure_layers

    torch.manual_seed(0)
    cpu_model = ConvNet().double().eval()
    gpu_model = ConvNet().double()
    gpu_model.load_state_dict(cpu_model.state_dict())
    gpu_model.to(DEV)
    x, y = image_batch(60, seed=4)
    ref = measure_layers(cpu_model, x.double(), y, ["block1", "block2"], batch_size=16)
    got = measure_layers(gpu_model, x.double(), y, ["block1", "block2"], batch_size=16)
    assert got[1] == ref[1]
    assert got[0] == pytest.approx(ref[0], abs=1e-9)
