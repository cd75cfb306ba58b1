"""SeparabilityGuard: decisions, bitwise restore, caching, probe hygiene, persistence."""

from __future__ import annotations

import copy
import math
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lsm_train.guard import GuardDecision, SeparabilityGuard

OPTIMIZERS = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-4),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
}


class Net(nn.Module):
    """BatchNorm, Dropout, in-place ReLU and a residual add."""

    hidden_layers = ["act", "res"]

    def __init__(self, bn: bool = True, d_in: int = 5, width: int = 12, k: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, width)
        self.bn = nn.BatchNorm1d(width) if bn else nn.Identity()
        self.act = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(0.3)
        self.res = nn.Linear(width, width)
        self.out = nn.Linear(width, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.act(self.bn(self.fc1(x))))
        h = h + self.res(h)
        h += 0.5 * h  # in-place residual-style update after the captured layer
        return self.out(h)


class Scripted:
    """A measure returning scripted values (one per layer call); picklable."""

    def __init__(self, values: list[float]) -> None:
        self.values = list(values)
        self.calls = 0

    def __call__(self, H: torch.Tensor, y: torch.Tensor) -> float:
        self.calls += 1
        return self.values.pop(0) if self.values else 0.5


def make_data(n: int = 48, d_in: int = 5, k: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % k
    x = torch.randn(n, d_in, generator=g) + y[:, None].float()
    return x, y


def probe_fn():  # module-level: picklable callable probe
    return make_data(30, seed=7)


def backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss


def count_probe_forwards(model: nn.Module) -> list[int]:
    counter = [0]

    def hook(module, inputs, output):
        if not torch.is_grad_enabled():
            counter[0] += 1

    model.register_forward_hook(hook)
    return counter


def snapshot(model: nn.Module, opt: torch.optim.Optimizer):
    params = [p.detach().clone() for p in model.parameters()]
    state = {
        id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
        for p, s in opt.state.items()
    }
    return params, state


def assert_same(model: nn.Module, opt: torch.optim.Optimizer, snap) -> None:
    params, state = snap
    for p, q in zip(model.parameters(), params, strict=True):
        assert torch.equal(p, q)
    assert set(id(p) for p in opt.state) == set(state)
    for p, s in opt.state.items():
        assert set(s) == set(state[id(p)])
        for k, v in s.items():
            ref = state[id(p)][k]
            assert torch.equal(v, ref) if torch.is_tensor(v) else v == ref


def build(opt_name="adam", bn=True, seed=0, **kw):
    torch.manual_seed(seed)
    model = Net(bn=bn)
    inner = OPTIMIZERS[opt_name](model.parameters())
    if isinstance(kw.get("measure"), Scripted):
        kw.setdefault("z", 0.0)  # the fixed-margin rule: one measure call per layer
    guard = SeparabilityGuard(inner, model, make_data(30, seed=1), **kw)
    return model, inner, guard


# ------------------------------------------------------------------ wrapper basics ------
def test_is_an_optimizer_sharing_the_inner_objects():
    model, inner, guard = build("sgd_momentum")
    assert isinstance(guard, torch.optim.Optimizer)
    assert guard.param_groups is inner.param_groups
    assert guard.state is inner.state
    assert guard.defaults is inner.defaults
    assert guard.layer_names == ["act", "res"]


def test_validation_errors():
    model = Net()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = make_data()
    with pytest.raises(ValueError, match="probe"):
        SeparabilityGuard(inner, model, x)
    with pytest.raises(ValueError, match="at least 2 classes"):
        SeparabilityGuard(inner, model, (x, torch.zeros(len(x), dtype=torch.long)))
    with pytest.raises(ValueError, match="measure"):
        SeparabilityGuard(inner, model, (x, y), measure="nope")
    with pytest.raises(ValueError, match="check_every"):
        SeparabilityGuard(inner, model, (x, y), check_every=0)
    with pytest.raises(ValueError, match="backoff"):
        SeparabilityGuard(inner, model, (x, y), backoff=1.5)
    with pytest.raises(ValueError, match="tolerance"):
        SeparabilityGuard(inner, model, (x, y), tolerance=-1)
    with pytest.raises(ValueError, match="optimizer"):
        SeparabilityGuard(model, model, (x, y))


def test_zero_grad_delegates():
    model, inner, guard = build()
    x, y = make_data()
    backward(model, x, y)
    guard.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    guard.zero_grad()
    assert all(p.grad is None for p in model.parameters())


# ------------------------------------------------------------------ decisions -----------
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_accept_equals_plain_step_and_reject_restores_bitwise(opt_name):
    model, inner, guard = build(opt_name, layers=["act"], measure=Scripted([0.5, 0.6, 0.1]))
    ref_model = copy.deepcopy(model)
    ref_opt = OPTIMIZERS[opt_name](ref_model.parameters())
    x, y = make_data()

    torch.manual_seed(3)
    backward(model, x, y)
    torch.manual_seed(3)
    backward(ref_model, x, y)
    grads = [p.grad.clone() for p in model.parameters()]
    guard.step()  # before 0.5, after 0.6: accepted
    ref_opt.step()
    assert guard.last_decision == GuardDecision(True, 0.5, 0.6, 0, False, True)
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        assert torch.equal(p, q)
    for p, g in zip(model.parameters(), grads, strict=True):
        assert torch.equal(p.grad, g)  # .grad untouched

    snap = snapshot(model, inner)
    guard.step()  # before reused (0.6), after 0.1: rejected
    assert guard.last_decision == GuardDecision(False, 0.6, 0.1, 0, False, True)
    assert_same(model, inner, snap)
    assert guard.stats == dict(steps=2, checks=2, accepted=1, rejected=1, retries=0, forced=0,
                               nonfinite=0, low_acceptance=0)


@pytest.mark.parametrize("opt_name", ["adam", "adamw", "sgd_momentum"])
def test_rejected_first_step_deletes_lazily_created_state(opt_name):
    model, inner, guard = build(opt_name, layers=["act"], measure=Scripted([0.5, 0.4]))
    params = [p.detach().clone() for p in model.parameters()]
    backward(model, *make_data())
    guard.step()
    assert not guard.last_decision.accepted
    assert len(inner.state) == 0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params, strict=True))
    # the next (accepted) step builds state exactly like a fresh optimizer
    guard.scorer.measure = Scripted([0.9])
    ref = copy.deepcopy(model)
    ref_opt = OPTIMIZERS[opt_name](ref.parameters())
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        q.grad = p.grad.clone()
    guard.step()
    ref_opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters(), strict=True))


def test_tolerance():
    model, inner, guard = build(layers=["act"], measure=Scripted([0.5, 0.45]), tolerance=0.1)
    backward(model, *make_data())
    guard.step()
    assert guard.last_decision.accepted


def test_nan_score_is_a_rejection_and_grad_is_never_modified():
    model, inner, guard = build("sgd_momentum")
    params = [p.detach().clone() for p in model.parameters()]
    backward(model, *make_data())
    model.fc1.weight.grad[0, 0] = float("inf")  # the step makes weights non-finite
    grads = [p.grad.clone() for p in model.parameters()]
    guard.step()
    d = guard.last_decision
    assert not d.accepted and d.after != d.after  # NaN
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params, strict=True))
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    assert len(inner.state) == 0 or all(
        torch.isfinite(v).all() for s in inner.state.values() for v in s.values()
        if torch.is_tensor(v)
    )


def test_measure_callable_returning_nan_rejects():
    model, inner, guard = build(layers=["act"], measure=Scripted([0.5, float("nan")]))
    backward(model, *make_data())
    guard.step()
    assert not guard.last_decision.accepted


# ------------------------------------------------------------------ retries -------------
def test_retries_scale_lr_then_restore_exact_lr():
    lr = 0.1 / 3  # not exactly representable: restored bitwise, not recomputed
    torch.manual_seed(0)
    model = Net()
    inner = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    guard = SeparabilityGuard(
        inner, model, make_data(30, seed=1), layers=["act"],
        measure=Scripted([0.5, 0.1, 0.2, 0.7]), z=0.0, max_retries=3, backoff=0.5,
    )
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=lr * 0.5**2, momentum=0.9)
    x, y = make_data()
    torch.manual_seed(5)
    backward(model, x, y)
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        q.grad = p.grad.clone()
    lr_obj = inner.param_groups[0]["lr"]
    guard.step()
    ref_opt.step()
    d = guard.last_decision
    assert d.accepted and d.retries == 2 and d.after == 0.7 and not d.forced
    assert inner.param_groups[0]["lr"] is lr_obj and inner.param_groups[0]["lr"] == lr
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q)  # accepted attempt == a plain step at lr * backoff**2
    for p, q in zip(inner.state.values(), ref_opt.state.values(), strict=True):
        assert torch.equal(p["momentum_buffer"], q["momentum_buffer"])
    assert guard.stats["retries"] == 2


def test_all_retries_rejected_restores_everything():
    model, inner, guard = build(
        "adam", layers=["act"], measure=Scripted([0.5, 0.6, 0.3, 0.3, 0.3]), max_retries=2
    )
    x, y = make_data()
    backward(model, x, y)
    guard.step()
    snap = snapshot(model, inner)
    lr_obj = inner.param_groups[0]["lr"]
    guard.step()
    assert guard.last_decision == GuardDecision(False, 0.6, 0.3, 2, False, True)
    assert_same(model, inner, snap)
    assert inner.param_groups[0]["lr"] is lr_obj


def test_max_consecutive_rejects_forces_a_step():
    model, inner, guard = build(
        "sgd_momentum", layers=["act"], measure=Scripted([0.5] + [0.1] * 10),
        max_consecutive_rejects=2,
    )
    backward(model, *make_data())
    decisions = []
    for _ in range(4):
        guard.step()
        decisions.append((guard.last_decision.accepted, guard.last_decision.forced))
    # the cached before (0.5) stays after rejections; the 3rd failing step is forced,
    # whose after (0.1) becomes the new reference
    assert decisions[:3] == [(False, False), (False, False), (True, True)]
    assert guard.stats["forced"] == 1 and guard.stats["rejected"] == 2


def test_max_consecutive_rejects_none_never_forces():
    model, inner, guard = build(
        layers=["act"], measure=Scripted([0.5] + [0.1] * 20), max_consecutive_rejects=None
    )
    backward(model, *make_data())
    for _ in range(15):
        guard.step()
    assert guard.stats["rejected"] == 15 and guard.stats["forced"] == 0


# ------------------------------------------------------------------ cached score --------
def test_one_probe_forward_per_checked_step_in_steady_state():
    model, inner, guard = build("adam", bn=False, tolerance=1.0)
    forwards = count_probe_forwards(model)
    x, y = make_data()
    for _ in range(5):
        guard.zero_grad()
        backward(model, x, y)
        guard.step()
    assert forwards[0] == 2 + 4  # before + after on the first check, then one per check
    assert guard.stats["accepted"] == 5


def test_cache_after_rejection_and_check_every():
    model, inner, guard = build(
        "adam", bn=False, layers=["act"], measure=Scripted([0.5, 0.4, 0.45])
    )
    forwards = count_probe_forwards(model)
    backward(model, *make_data())
    guard.step()
    guard.step()  # rejected twice; the restored weights keep the cached 0.5
    assert forwards[0] == 3
    assert guard.last_decision.before == 0.5

    model, inner, guard = build("adam", bn=False, tolerance=1.0, check_every=3)
    forwards = count_probe_forwards(model)
    backward(model, *make_data())
    for _ in range(7):  # checks at steps 0, 3, 6; unchecked steps invalidate the cache
        guard.step()
    assert forwards[0] == 6
    assert guard.stats["checks"] == 3 and guard.stats["steps"] == 7
    assert guard.last_decision.checked


def test_external_weight_edit_invalidates_cache():
    model, inner, guard = build("adam", bn=False, tolerance=1.0)
    forwards = count_probe_forwards(model)
    backward(model, *make_data())
    guard.step()
    with torch.no_grad():
        model.fc1.weight.mul_(2)
    guard.step()
    assert forwards[0] == 4


def test_batchnorm_buffers_in_cache_key():
    x, y = make_data()
    for track, expected in [(True, 6), (False, 4)]:
        model, inner, guard = build("adam", bn=True, tolerance=1.0, track_buffers=track)
        forwards = count_probe_forwards(model)
        for _ in range(3):
            guard.zero_grad()
            backward(model, x, y)  # updates the running statistics
            guard.step()
        assert forwards[0] == expected


def test_probe_callable_and_refresh():
    calls = [0]

    def probe():
        calls[0] += 1
        return make_data(30, seed=calls[0])

    torch.manual_seed(0)
    model = Net(bn=False)
    guard = SeparabilityGuard(torch.optim.SGD(model.parameters(), lr=0.01), model, probe,
                              tolerance=1.0)
    assert calls[0] == 1  # read and checked when the guard is built
    forwards = count_probe_forwards(model)
    backward(model, *make_data())
    guard.step()
    guard.step()
    assert calls[0] == 1 and forwards[0] == 3
    s1 = guard.score()
    guard.refresh_probe()
    assert calls[0] == 2
    guard.step()
    assert forwards[0] == 4 + 2  # score() + a fresh before
    assert guard.score() != s1  # a different probe

    x2, y2 = make_data(20, seed=9)
    guard.refresh_probe((x2, y2))
    assert guard.scorer.probe.inputs is x2


def test_tensor_probe_modified_in_place_invalidates():
    model, inner, guard = build("adam", bn=False, tolerance=1.0)
    forwards = count_probe_forwards(model)
    backward(model, *make_data())
    guard.step()
    guard.scorer.probe.inputs.mul_(1.5)
    guard.step()
    assert forwards[0] == 4


# ------------------------------------------------------------------ probe hygiene -------
def test_probe_keeps_bn_stats_and_training_flags_and_turns_dropout_off():
    torch.manual_seed(0)
    model = Net()
    model.train()
    model.drop.eval()  # deliberately in eval
    guard = SeparabilityGuard(torch.optim.SGD(model.parameters(), lr=0.1), model,
                              make_data(30, seed=1))
    flags = {n: m.training for n, m in model.named_modules()}
    bufs = {n: b.clone() for n, b in model.named_buffers()}
    s1, s2 = guard.score(), guard.score()
    model.drop.train()
    s3 = guard.score()
    model.drop.eval()
    assert s1 == s2 == s3  # dropout off and eval-mode BatchNorm: deterministic
    assert {n: m.training for n, m in model.named_modules()} == flags
    for n, b in model.named_buffers():
        assert torch.equal(b, bufs[n])
    assert int(model.bn.num_batches_tracked) == 0
    assert torch.is_grad_enabled()
    assert set(guard.last_layer_scores) == {"act", "res"}


# ------------------------------------------------------------------ closure / amp -------
def test_closure_returns_loss_like_torch():
    model, inner, guard = build("sgd_momentum", tolerance=1.0)
    ref = copy.deepcopy(model)
    ref_opt = OPTIMIZERS["sgd_momentum"](ref.parameters())
    x, y = make_data()

    def closure_for(m, o):
        def closure():
            o.zero_grad()
            return backward(m, x, y)
        return closure

    torch.manual_seed(1)
    loss = guard.step(closure_for(model, guard))
    torch.manual_seed(1)
    ref_loss = ref_opt.step(closure_for(ref, ref_opt))
    assert torch.equal(loss, ref_loss)
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q)
    assert guard.step() is None


def test_grad_scaler_steps_and_skips_inf():
    model, inner, guard = build("adam", tolerance=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    x, y = make_data()
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    scaler.step(guard)
    scaler.update()
    assert guard.stats["steps"] == 1 and guard.stats["checks"] == 1

    guard.zero_grad()
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    model.fc1.weight.grad[0, 0] = float("inf")
    params = [p.detach().clone() for p in model.parameters()]
    scaler.step(guard)  # skipped by the scaler: no step, no check
    scaler.update()
    assert guard.stats["steps"] == 1
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params, strict=True))


# ------------------------------------------------------------------ schedulers ----------
def test_lr_scheduler_without_warnings():
    model, inner, guard = build(
        "sgd_momentum", layers=["act"], measure=Scripted([0.5, 0.1, 0.1, 0.9] * 20),
        max_retries=1,
    )
    x, y = make_data()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sched = torch.optim.lr_scheduler.StepLR(guard, step_size=2, gamma=0.5)
        lrs = []
        for _ in range(6):
            guard.zero_grad()
            backward(model, x, y)
            guard.step()
            sched.step()
            lrs.append(inner.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.05, 0.025, 0.025, 0.0125, 0.0125, 0.00625])
    assert lrs[1] == 0.05 * 0.5  # retries did not disturb the schedule
    assert guard.stats["retries"] > 0


# ------------------------------------------------------------------ persistence ---------
def _train(model, guard, steps, seed):
    for i in range(steps):
        x, y = make_data(32, seed=seed + i)
        guard.zero_grad()
        backward(model, x, y)
        guard.step()


def _save_and_resume(tmp_path, model, guard, steps, seed, rebuild):
    """Checkpoint model, guard and RNG; rebuild (from another init), load, train ``steps``."""
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "opt": guard.state_dict(),
                "rng": torch.get_rng_state()}, path)
    model, _, guard = rebuild()
    ckpt = torch.load(path)
    model.load_state_dict(ckpt["model"])
    guard.load_state_dict(ckpt["opt"])
    torch.set_rng_state(ckpt["rng"])
    _train(model, guard, steps, seed=seed)
    return model, guard


@pytest.mark.parametrize("bn,track", [(True, True), (True, False), (False, True)])
def test_resume_equals_uninterrupted_bitwise(tmp_path, bn, track):
    kw = dict(max_retries=1, track_buffers=track, z=0.0)  # z=0: rejections to replay
    N, k = 8, 3

    model, inner, guard = build("adam", bn=bn, **kw)
    torch.manual_seed(11)
    _train(model, guard, N, seed=100)
    ref_params = [p.detach().clone() for p in model.parameters()]
    ref_stats = dict(guard.stats)

    model, inner, guard = build("adam", bn=bn, **kw)
    torch.manual_seed(11)
    _train(model, guard, k, seed=100)
    model, guard = _save_and_resume(tmp_path, model, guard, N - k, seed=100 + k,
                                    rebuild=lambda: build("adam", bn=bn, seed=99, **kw))
    for p, q in zip(model.parameters(), ref_params, strict=True):
        assert torch.equal(p, q)
    assert guard.stats == ref_stats
    assert ref_stats["rejected"] > 0 and ref_stats["accepted"] > 0


def test_state_dict_holds_inner_state_and_loads_into_plain_optimizer():
    model, inner, guard = build("adam")
    _train(model, guard, 2, seed=0)
    sd = guard.state_dict()
    assert set(sd) >= {"state", "param_groups", "guard"}
    assert sd["guard"]["stats"]["steps"] == 2
    plain = torch.optim.Adam(model.parameters(), lr=1e-2)
    plain.load_state_dict({k: v for k, v in sd.items() if k != "guard"})
    assert torch.equal(plain.state[model.fc1.weight]["exp_avg"],
                       inner.state[model.fc1.weight]["exp_avg"])
    # and a plain optimizer's state dict loads into a guard
    model2, inner2, guard2 = build("adam")
    guard2.load_state_dict(plain.state_dict())
    assert guard2.state is inner2.state and len(inner2.state) == len(inner.state)


def test_load_with_other_weights_rescores():
    model, inner, guard = build("adam", bn=False, tolerance=1.0)
    _train(model, guard, 2, seed=0)
    sd = guard.state_dict()
    assert sd["guard"]["cache"] is not None
    model2, inner2, guard2 = build("adam", bn=False, tolerance=1.0, seed=5)
    guard2.load_state_dict(sd)  # weights of model2 differ from the saved ones
    forwards = count_probe_forwards(model2)
    _train(model2, guard2, 1, seed=0)
    assert forwards[0] == 2
    model2.load_state_dict(model.state_dict())
    guard2.load_state_dict(sd)  # now the weights match the hash: the cache is reused
    _train(model2, guard2, 1, seed=0)
    assert forwards[0] == 3


def test_deepcopy_steps_its_own_params():
    model, inner, guard = build("sgd_momentum", tolerance=1.0)
    sched = torch.optim.lr_scheduler.StepLR(guard, step_size=1, gamma=0.5)  # patches step
    _train(model, guard, 1, seed=0)
    sched.step()
    g2 = copy.deepcopy(guard)
    model2 = g2.model
    assert model2 is not model
    ids = {id(p) for p in model2.parameters()}
    assert {id(p) for g in g2.param_groups for p in g["params"]} == ids
    assert g2.param_groups is g2.optimizer.param_groups and g2.state is g2.optimizer.state
    assert set(map(id, g2.state)) == ids
    before = [p.detach().clone() for p in model.parameters()]
    _train(model2, g2, 2, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(model2.parameters(), before, strict=True))
    assert g2.stats["steps"] == 3 and guard.stats["steps"] == 1


def test_pickle_roundtrip_with_callable_probe():
    torch.manual_seed(0)
    model = Net()
    guard = SeparabilityGuard(torch.optim.AdamW(model.parameters(), lr=1e-2), model, probe_fn,
                              tolerance=1.0)
    _train(model, guard, 2, seed=0)
    g2 = pickle.loads(pickle.dumps(guard))
    assert g2.stats == guard.stats
    for p, q in zip(g2.model.parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q)
    st, st2 = guard.state_dict(), g2.state_dict()
    assert torch.equal(st["state"][0]["exp_avg"], st2["state"][0]["exp_avg"])
    torch.manual_seed(4)
    _train(g2.model, g2, 1, seed=5)
    torch.manual_seed(4)
    _train(model, guard, 1, seed=5)
    for p, q in zip(g2.model.parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q)


# ------------------------------------------------------------------ snapshot memory -----
@pytest.mark.parametrize("device", [None, "cpu"])
def test_snapshot_buffers_allocated_once(device):
    model, inner, guard = build("adam", tolerance=1.0, snapshot_device=device)
    _train(model, guard, 2, seed=0)
    ptrs = {k: b.data_ptr() for k, b in guard.snapshot._buffers.items()}
    _train(model, guard, 3, seed=2)
    assert {k: b.data_ptr() for k, b in guard.snapshot._buffers.items()} == ptrs
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    state_bytes = sum(
        v.numel() * v.element_size() for s in inner.state.values() for v in s.values()
        if torch.is_tensor(v)
    )
    assert guard.snapshot_bytes == param_bytes + state_bytes


def test_stats_and_last_decision_fields():
    model, inner, guard = build(check_every=2, tolerance=1.0)
    assert guard.last_decision is None
    _train(model, guard, 2, seed=0)
    assert guard.last_decision == GuardDecision(True, None, None, 0, False, False)
    assert set(guard.stats) == {"steps", "checks", "accepted", "rejected", "retries", "forced",
                                "nonfinite", "low_acceptance"}
    assert guard.stats["checks"] == guard.stats["accepted"] + guard.stats["rejected"] == 1


def test_degree_measure():
    pytest.importorskip("lsm_train.measures.layer")
    pytest.importorskip("lsm_train.measures.degree")
    model, inner, guard = build("adam", measure="degree", layers=["act"], tolerance=1.0)
    _train(model, guard, 2, seed=0)
    d = guard.last_decision
    assert 0.5 <= d.before <= 1.0 and 0.5 <= d.after <= 1.0


# ------------------------------------------------------------------ scope="window" ------
def test_window_scope_validation():
    with pytest.raises(ValueError, match=r"scope: expected one of \('step', 'window'\)"):
        build("adam", scope="block")
    with pytest.raises(ValueError, match="max_retries: expected 0 with scope='window'"):
        build("adam", scope="window", check_every=3, max_retries=1)


def test_window_accepts_all_steps_with_one_probe_forward_per_window():
    model, inner, guard = build("sgd_momentum", bn=False, tolerance=1.0, scope="window",
                                check_every=3)
    torch.manual_seed(0)
    ref = Net(bn=False)
    ref_opt = OPTIMIZERS["sgd_momentum"](ref.parameters())
    model.drop.p = ref.drop.p = 0.0  # the same steps without sharing one RNG stream
    forwards = count_probe_forwards(model)
    for i in range(9):
        x, y = make_data(32, seed=i)
        for m, o in ((model, guard), (ref, ref_opt)):
            o.zero_grad()
            backward(m, x, y)
            o.step()
        assert guard.last_decision.checked == (i % 3 == 2)
    assert forwards[0] == 1 + 3  # the first window's start, then one per window end
    assert guard.stats == dict(steps=9, checks=3, accepted=3, rejected=0, retries=0, forced=0,
                               nonfinite=0, low_acceptance=0)
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q)


def test_window_rejection_rolls_back_the_whole_window_bitwise():
    # layers act, res: two measure calls per score
    model, inner, guard = build("adam", measure=Scripted([0.9, 0.9, 0.1, 0.1, 0.95, 0.95]),
                                scope="window", check_every=3)
    sched = torch.optim.lr_scheduler.StepLR(guard, step_size=1, gamma=0.5)
    start = snapshot(model, inner)  # Adam's state is created lazily inside the window
    lrs = []
    for i in range(3):
        guard.zero_grad()
        backward(model, *make_data(32, seed=i))
        guard.step()
        sched.step()
        lrs.append(guard.param_groups[0]["lr"])
    d = guard.last_decision
    assert (d.accepted, d.before, d.after, d.checked) == (False, 0.9, 0.1, True)
    assert_same(model, inner, start)  # parameters, and the lazily created state deleted
    assert len(inner.state) == 0
    assert lrs == [5e-3, 2.5e-3, 1.25e-3]  # the scheduler's course is not rolled back
    assert guard.param_groups[0]["lr"] == 1.25e-3

    for i in range(3):  # the next window starts from the cached 0.9: no new "before"
        guard.zero_grad()
        backward(model, *make_data(32, seed=10 + i))
        guard.step()
    assert guard.last_decision.accepted and guard.last_decision.before == 0.9
    assert guard.stats["checks"] == 2 and guard.stats["rejected"] == 1


def test_window_of_one_step_takes_the_step_scope_decisions():
    runs = []
    for scope in ("step", "window"):
        model, inner, guard = build("adam", bn=False, scope=scope, max_consecutive_rejects=None,
                                    z=0.0)
        torch.manual_seed(3)
        _train(model, guard, 6, seed=40)
        runs.append(([p.detach().clone() for p in model.parameters()], dict(guard.stats)))
    (p1, s1), (p2, s2) = runs
    assert s1 == s2 and s1["rejected"] > 0 and s1["accepted"] > 0
    assert all(torch.equal(a, b) for a, b in zip(p1, p2, strict=True))


def wobbly(H: torch.Tensor, y: torch.Tensor) -> float:
    """A measure that is a deterministic function of the features and rises or falls from
    one step to the next (so windows are both kept and rolled back)."""
    return float((H.double().sum() * 1e3) % 1.0)


@pytest.mark.parametrize("stop", [4, 5, 6])  # inside a window (4, 5) and at its boundary
def test_window_resume_equals_uninterrupted_bitwise(tmp_path, stop):
    # z > 0: the replicates of the cached and of the window's "before" score are saved too
    kw = dict(scope="window", check_every=3, max_consecutive_rejects=None, measure=wobbly,
              z=0.1, groups=4)
    N = 10
    model, inner, guard = build("adam", **kw)
    torch.manual_seed(11)
    _train(model, guard, N, seed=100)
    ref_params = [p.detach().clone() for p in model.parameters()]
    ref_stats = dict(guard.stats)
    assert ref_stats["rejected"] > 0 and ref_stats["accepted"] > 0

    model, inner, guard = build("adam", **kw)
    torch.manual_seed(11)
    _train(model, guard, stop, seed=100)
    assert (guard.state_dict()["guard"]["window"] is None) == (stop % 3 == 0)
    model, guard = _save_and_resume(tmp_path, model, guard, N - stop, seed=100 + stop,
                                    rebuild=lambda: build("adam", seed=99, **kw))
    for p, q in zip(model.parameters(), ref_params, strict=True):
        assert torch.equal(p, q)
    assert guard.stats == ref_stats


def test_window_deepcopy_and_pickle_inside_a_window():
    model, inner, guard = build("adam", scope="window", check_every=3,
                                measure=Scripted([0.9, 0.9, 0.1, 0.1] * 2))
    start = snapshot(model, inner)
    _train(model, guard, 1, seed=0)
    for twin in (copy.deepcopy(guard), pickle.loads(pickle.dumps(guard))):
        _train(twin.model, twin, 2, seed=1)  # the window closes and is rolled back
        assert not twin.last_decision.accepted
        assert_same(twin.model, twin.optimizer, start)
        assert twin.snapshot_bytes == guard.snapshot_bytes
    assert guard.stats["steps"] == 1  # the original is untouched


def test_window_refresh_probe_inside_a_window_keeps_it():
    model, inner, guard = build("adam", scope="window", check_every=2,
                                measure=Scripted([0.9, 0.9, 0.1, 0.1]))
    _train(model, guard, 1, seed=0)
    guard.refresh_probe(make_data(30, seed=5))
    _train(model, guard, 1, seed=1)
    d = guard.last_decision
    assert d.checked and d.accepted and math.isnan(d.before)


def test_window_load_checks_the_parameter_count():
    model, inner, guard = build("adam", scope="window", check_every=3, tolerance=1.0)
    _train(model, guard, 1, seed=0)
    sd = guard.state_dict()
    small = nn.Sequential(nn.Linear(5, 3))
    other = SeparabilityGuard(torch.optim.Adam(small.parameters()), small, make_data(30),
                              layers=["0"], scope="window", check_every=3)
    sd["state"], sd["param_groups"] = {}, other.state_dict()["param_groups"]
    with pytest.raises(ValueError, match="open guard window holds 8 parameters"):
        other.load_state_dict(sd)


# ------------------------------------------------------------------ the z rule ----------
def test_default_rule_keeps_a_step_of_lr_zero_and_a_drop_within_noise():
    model, inner, guard = build("sgd_momentum", bn=False)
    assert guard.z == 2.0 and guard.groups == 10
    for g in inner.param_groups:
        g["lr"] = 0.0
    params = [p.detach().clone() for p in model.parameters()]
    for i in range(5):
        guard.zero_grad()
        backward(model, *make_data(32, seed=i))
        guard.step()
        d = guard.last_decision
        assert d.accepted and d.after == d.before and not d.forced
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params, strict=True))


def test_default_rule_computes_the_se_only_on_a_drop_and_matches_a_reference():
    """A scripted drop: the replicates are the measure on the probe with each of the 10
    class-stratified groups left out; SE from them, computed here independently."""
    torch.manual_seed(0)
    model = Net(bn=False)
    x, y = make_data(30, seed=1)
    calls = []

    def measure(H, labels):  # mean feature of class 0 minus class 1: depends on the subset
        calls.append(len(labels))
        return float(H[labels == 0].mean() - H[labels == 1].mean())

    guard = SeparabilityGuard(torch.optim.SGD(model.parameters(), lr=0.5), model, (x, y),
                              layers=["act"], measure=measure, max_consecutive_rejects=None)
    feats_before = _features(model, x, "act")
    backward(model, *make_data())
    guard.step()
    d = guard.last_decision
    after_feats = _features(model, x, "act") if d.accepted else None
    assert d.after < d.before  # this seed's step lowers the score
    # the SE was needed: 2 values + 2 x 10 replicates, each on the probe minus 3 samples
    assert calls[:2] == [30, 30] and calls[2:] == [27] * 20
    if after_feats is None:  # rejected: recompute the attempt's features
        with torch.no_grad():
            for p, g in zip(model.parameters(), [p.grad for p in model.parameters()],
                            strict=True):
                p.sub_(0.5 * g)
        after_feats = _features(model, x, "act")
    rank = torch.zeros(30, dtype=torch.long)
    for c in range(3):
        rank[y == c] = torch.arange(int((y == c).sum()))
    reps = []
    for g in range(10):
        keep = rank % 10 != g
        reps.append(measure(after_feats[keep], y[keep]) - measure(feats_before[keep], y[keep]))
    reps = torch.tensor(reps, dtype=torch.float64)
    se = math.sqrt(9 / 10 * float(((reps - reps.mean()) ** 2).sum()))
    assert d.se == pytest.approx(se, rel=1e-6)
    assert d.accepted == (d.after - d.before >= -2.0 * se)


def _features(model, x, layer):
    from lsm_train.capture import HiddenCapture

    model.eval()
    with torch.no_grad(), HiddenCapture(model, [layer]) as feats:
        model(x)
    model.train()
    return feats[layer]


def test_loss_measure_false_rejection_rate_at_a_population_optimum():
    """Tiny random steps around the population optimum of a logistic model change the
    expected probe loss by O(step^2): the rejection rate is about the nominal level."""
    from scipy import stats

    gen = torch.Generator().manual_seed(0)

    def sample(n):
        y = torch.randint(0, 3, (n,), generator=gen)
        return (torch.randn(n, 4, generator=gen, dtype=torch.float64) + y[:, None]), y

    model = nn.Linear(4, 3).double()
    xs, ys = sample(40000)
    fit = torch.optim.LBFGS(model.parameters(), max_iter=200, tolerance_grad=1e-12,
                            line_search_fn="strong_wolfe")
    fit.step(lambda: (fit.zero_grad(), F.cross_entropy(model(xs), ys).backward(),
                      F.cross_entropy(model(xs), ys))[-1])
    start = [p.detach().clone() for p in model.parameters()]
    rejected, trials = 0, 300
    for _ in range(trials):
        with torch.no_grad():
            for p, q in zip(model.parameters(), start, strict=True):
                p.copy_(q)
        guard = SeparabilityGuard(torch.optim.SGD(model.parameters(), lr=1e-3), model,
                                  sample(200), measure="loss", max_consecutive_rejects=None)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        guard.step()
        rejected += not guard.last_decision.accepted
    level = stats.t.sf(2.0, 9)  # 0.038
    assert abs(rejected / trials - level) < 4 * math.sqrt(level * (1 - level) / trials)


# ------------------------------------------------------------------ controls ------------
def test_loss_measure_is_minus_the_probe_cross_entropy():
    torch.manual_seed(0)
    model = Net()
    x, y = make_data(30, seed=1)
    guard = SeparabilityGuard(torch.optim.SGD(model.parameters(), lr=0.1), model, (x, y),
                              measure="loss")
    model.eval()
    with torch.no_grad():
        ref = F.cross_entropy(model(x).double(), y)
    model.train()
    assert guard.score() == pytest.approx(-float(ref), rel=1e-6)
    assert guard.layer_names == ["loss"]
    assert set(guard.last_layer_scores) == {"loss"}


def test_loss_measure_keeps_a_step_iff_the_loss_did_not_rise_significantly():
    for lr, seed in [(0.05, 0), (3.0, 1), (3.0, 2), (0.5, 3)]:
        torch.manual_seed(seed)
        model = nn.Linear(5, 3)
        x, y = make_data(30, seed=1)  # 10 per class: 5 groups of 6 (2 per class)
        guard = SeparabilityGuard(torch.optim.SGD(model.parameters(), lr=lr), model, (x, y),
                                  measure="loss", groups=5, max_consecutive_rejects=None)
        with torch.no_grad():
            ce0 = F.cross_entropy(model(x).double(), y, reduction="none")
        backward(model, *make_data(16, seed=seed + 10))
        with torch.no_grad():
            ce1 = F.cross_entropy(F.linear(x, model.weight - lr * model.weight.grad,
                                           model.bias - lr * model.bias.grad).double(), y,
                                  reduction="none")
        guard.step()
        rise = ce1 - ce0
        group = torch.zeros(30, dtype=torch.long)
        for c in range(3):
            group[y == c] = torch.arange(10) % 5
        means = torch.stack([rise[group == g].mean() for g in range(5)])
        se = float(means.std() / math.sqrt(5))  # equal groups: the jackknife SE of a mean
        expected = float(rise.mean()) <= 0 or float(rise.mean()) <= 2.0 * se
        assert guard.last_decision.accepted == expected
        if float(rise.mean()) > 0:
            assert guard.last_decision.se == pytest.approx(se, rel=1e-5)


def test_random_measure_is_reproducible_has_its_rate_and_runs_no_probe_forward():
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = Net(bn=False)
        guard = SeparabilityGuard(torch.optim.SGD(model.parameters(), lr=0.01), model,
                                  measure="random", accept_rate=0.3, seed=5,
                                  max_consecutive_rejects=None)
        forwards = count_probe_forwards(model)
        backward(model, *make_data())
        decisions = []
        for _ in range(400):
            guard.step()
            decisions.append(guard.last_decision.accepted)
        assert forwards[0] == 0
        runs.append(decisions)
    assert runs[0] == runs[1]
    assert abs(sum(runs[0]) / 400 - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 400)
    d = guard.last_decision
    assert d.before is None and d.after is None and d.se is None


@pytest.mark.parametrize("kw", [dict(), dict(scope="window", check_every=3)])
def test_random_measure_resume_equals_uninterrupted(tmp_path, kw):
    def make(seed=0):
        torch.manual_seed(seed)
        model = Net(bn=False)
        return model, None, SeparabilityGuard(
            torch.optim.Adam(model.parameters(), lr=1e-2), model, measure="random",
            accept_rate=0.5, seed=3, **kw)

    steps = 12
    model, _, guard = make()
    _train(model, guard, steps, seed=0)
    ref = ([p.detach().clone() for p in model.parameters()], dict(guard.stats))
    model, _, guard = make()
    _train(model, guard, 4, seed=0)  # inside a window with scope="window"
    model, guard = _save_and_resume(tmp_path, model, guard, steps - 4, seed=4,
                                    rebuild=lambda: make(seed=9))
    assert dict(guard.stats) == ref[1] and 0 < ref[1]["rejected"] < ref[1]["checks"]
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref[0], strict=True))


def test_control_options_are_checked():
    model = Net()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = make_data()
    with pytest.raises(ValueError, match="accept_rate: expected a number in"):
        SeparabilityGuard(inner, model, measure="random")
    with pytest.raises(ValueError, match="accept_rate: expected a number in"):
        SeparabilityGuard(inner, model, measure="random", accept_rate=1.5)
    with pytest.raises(ValueError, match="accept_rate: only used with measure='random'"):
        SeparabilityGuard(inner, model, (x, y), accept_rate=0.5)
    with pytest.raises(ValueError, match="probe: expected"):
        SeparabilityGuard(inner, model, measure="loss")
    with pytest.raises(ValueError, match="z: expected a finite number >= 0"):
        SeparabilityGuard(inner, model, (x, y), z=-1)
    with pytest.raises(ValueError, match="groups: expected an integer >= 2"):
        SeparabilityGuard(inner, model, (x, y), groups=1)
    other = nn.Linear(5, 3)
    with pytest.raises(ValueError, match="2 of its 10 parameters are not parameters of model"):
        SeparabilityGuard(torch.optim.SGD([*model.parameters(), *other.parameters()], lr=0.1),
                          model, (x, y))


# ------------------------------------------------------------------ non-finite ----------
@pytest.mark.parametrize("kw", [dict(), dict(measure="random", accept_rate=1.0),
                                dict(z=0.0, tolerance=1.0), dict(scope="window",
                                                                 check_every=2)])
def test_a_non_finite_step_is_never_kept_even_when_forced(kw):
    torch.manual_seed(0)
    model = Net()
    x, y = make_data(30, seed=1)
    probe = None if kw.get("measure") == "random" else (x, y)
    guard = SeparabilityGuard(torch.optim.SGD(model.parameters(), lr=float("inf")), model,
                              probe, max_consecutive_rejects=0, max_nonfinite=3, **kw)
    params = [p.detach().clone() for p in model.parameters()]
    steps = 2 * guard.check_every
    for _ in range(steps):
        guard.zero_grad()
        backward(model, *make_data())
        guard.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params, strict=True))
    assert guard.stats["accepted"] == guard.stats["forced"] == 0
    assert guard.stats["nonfinite"] == guard.stats["rejected"] == 2
    assert guard.last_decision.nonfinite == 1 and not guard.last_decision.forced
    with pytest.raises(RuntimeError, match="last 3 checked steps all gave non-finite"):
        for _ in range(guard.check_every):
            guard.zero_grad()
            backward(model, *make_data())
            guard.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params, strict=True))


def test_non_finite_attempts_are_retried_at_a_smaller_lr_and_counted():
    torch.manual_seed(0)
    model = Net(bn=False)
    guard = SeparabilityGuard(torch.optim.SGD(model.parameters(), lr=0.1), model,
                              make_data(30, seed=1), max_retries=2, tolerance=1.0, z=0.0)
    backward(model, *make_data())
    model.fc1.weight.grad[0, 0] = float("inf")
    guard.step()
    d = guard.last_decision
    assert not d.accepted and d.retries == 2 and d.nonfinite == 3
    assert guard.stats["nonfinite"] == 3


# ------------------------------------------------------------------ low acceptance ------
def test_low_acceptance_warns_once_and_is_in_stats():
    model, inner, guard = build(layers=["act"], measure=Scripted([0.9] + [0.1] * 40),
                                max_consecutive_rejects=None, warn_window=5, warn_below=0.5)
    backward(model, *make_data())
    with pytest.warns(RuntimeWarning, match="acceptance rate 0.00 over the last 5 checks"):
        for _ in range(5):
            guard.step()
    assert guard.stats["low_acceptance"] == 1 and guard.recent_accept_rate == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(10):
            guard.step()  # no second warning


def test_random_control_does_not_warn():
    model = Net()
    guard = SeparabilityGuard(torch.optim.SGD(model.parameters(), lr=0.01), model,
                              measure="random", accept_rate=0.0, warn_window=3)
    backward(model, *make_data())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(6):
            guard.step()
    assert guard.stats["low_acceptance"] == 0 and guard.recent_accept_rate == 0.0
