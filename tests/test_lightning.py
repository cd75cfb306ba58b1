"""Lightning: SeparabilityMonitor logs lsm/<layer> through the Trainer's loggers, and
SeparabilityGuard returned from configure_optimizers runs under a real lightning.Trainer
(closure once, global step, checkpoint resume, bf16-mixed on the CPU), with LSMLoss inside
training_step; with method="fisher" the monitor scores all layers in one batched pass.
References: a plain-optimizer Lightning run, an uninterrupted run, and layer_separability
computed here on HiddenCapture features."""

from __future__ import annotations

import csv
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lsm_train as lt

L = pytest.importorskip("lightning")
from lightning.pytorch.loggers import CSVLogger, Logger  # noqa: E402

from lsm_train.integrations.lightning import SeparabilityMonitor  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning"
)


def digits(n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return torch.tensor(X[:n] / 16.0, dtype=torch.float32).view(-1, 1, 8, 8), torch.tensor(y[:n])


X, Y = digits()
PROBE = (X[:128], Y[:128])


class Scripted:
    """A guard measure: +step (accept every step) or -step (reject every step)."""

    def __init__(self, sign: float) -> None:
        self.sign, self.calls = sign, 0

    def __call__(self, H: torch.Tensor, y: torch.Tensor) -> float:
        self.calls += 1
        return 0.5 + self.sign * 1e-3 * self.calls


class LitMLP(L.LightningModule):
    def __init__(self, guard: str | None = None, loss_weight: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(),
                                   nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
        self.reg = lt.LSMLoss(self.model, weight=loss_weight) if loss_weight else None
        self.guard_kind = guard
        self.training_steps = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        self.training_steps += 1
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        if self.reg is not None:
            loss = loss + self.reg(y)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
        if self.guard_kind is None:
            return opt
        measure = {"accept": Scripted(1.0), "reject": Scripted(-1.0)}.get(self.guard_kind,
                                                                          self.guard_kind)
        self.guard = lt.SeparabilityGuard(opt, self.model, PROBE, measure=measure,
                                          max_consecutive_rejects=None)
        return self.guard


def fit(module, max_steps, tmp_path, *, ckpt=None, **kw):
    kw.setdefault("logger", False)
    trainer = L.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
        default_root_dir=tmp_path, **kw,
    )
    loader = DataLoader(TensorDataset(X, Y), batch_size=64)  # 4 steps per epoch, no shuffle
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader, ckpt_path=ckpt)
    return trainer


def params(module):
    return [p.detach().clone() for p in module.parameters()]


def test_guard_closure_runs_once_and_steps_count_like_a_plain_optimizer(tmp_path):
    plain, accept, reject = LitMLP(), LitMLP("accept"), LitMLP("reject")
    start = params(reject)
    for module in (plain, accept, reject):
        trainer = fit(module, 6, tmp_path)
        assert trainer.global_step == 6 and module.training_steps == 6  # one closure per step
    assert accept.guard.stats["steps"] == 6 and accept.guard.stats["accepted"] == 6
    assert reject.guard.stats["rejected"] == 6
    for a, b in zip(params(plain), params(accept), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # accepting = the plain optimizer
    for a, b in zip(start, params(reject), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # every step rolled back


def test_lightning_checkpoint_resumes_with_the_guard_state(tmp_path):
    # Checkpoints at an epoch end: a checkpoint taken after a max_steps stop resumes
    # mid-epoch, where Lightning restarts the (stateless) loader and changes the batch order.
    whole = LitMLP("soft")
    fit(whole, -1, tmp_path / "whole", max_epochs=2)

    first = LitMLP("soft")
    trainer = fit(first, -1, tmp_path / "a", max_epochs=1)
    path = tmp_path / "a" / "half.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["optimizer_states"][0]
    assert saved["guard"]["stats"]["steps"] == 4
    resumed = LitMLP("soft")
    trainer = fit(resumed, -1, tmp_path / "b", ckpt=str(path), max_epochs=2)
    assert trainer.global_step == 8 and resumed.training_steps == 4
    assert resumed.guard.stats == whole.guard.stats and whole.guard.stats["checks"] == 8
    for a, b in zip(params(whole), params(resumed), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


class MemoryLogger(Logger):
    """A real Lightning Logger that keeps what it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict]] = []

    name = "memory"
    version = 0

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def test_monitor_logs_lsm_per_layer_through_every_logger(tmp_path):
    module = LitMLP()
    monitor = SeparabilityMonitor(probe=PROBE, every_n_steps=3, method="degree")
    memory = MemoryLogger()
    csv_logger = CSVLogger(tmp_path, name="csv")
    fit(module, 6, tmp_path, logger=[csv_logger, memory], callbacks=[monitor])
    assert monitor.names == ["model.2", "model.4"]  # automatic choice inside the module
    rows = [(s, m) for s, m in memory.rows if "lsm/model.2" in m]
    assert [s for s, _ in rows] == [0, 3, 6]
    # the last measurement is on the final weights: recompute it independently
    module.eval()
    with lt.HiddenCapture(module, monitor.names) as feats, torch.no_grad():
        module(PROBE[0])
    for name in monitor.names:
        ref = lt.layer_separability(feats[name], PROBE[1], holdout=0.5)
        assert rows[-1][1][f"lsm/{name}"] == pytest.approx(ref, abs=1e-12)
    csv_logger.save()
    with open(f"{csv_logger.log_dir}/metrics.csv") as f:
        logged = [r for r in csv.DictReader(f) if r.get("lsm/model.4")]
    assert [int(r["step"]) for r in logged] == [0, 3, 6]
    assert float(logged[-1]["lsm/model.4"]) == pytest.approx(rows[-1][1]["lsm/model.4"])


def test_bf16_mixed_on_cpu_with_loss_guard_and_monitor(tmp_path):
    module = LitMLP("soft", loss_weight=0.1)
    monitor = SeparabilityMonitor(probe=PROBE, every_n_steps=2)
    trainer = fit(module, 4, tmp_path, precision="bf16-mixed", callbacks=[monitor])
    assert trainer.global_step == 4 and module.training_steps == 4
    assert module.guard.stats["checks"] == 4
    assert module.reg.steps == 4 and all(0.0 < v <= 1.0 for v in module.reg.last.values())
    assert len(monitor.history) == 3
    assert all(0.5 <= v <= 1.0 for _, scores in monitor.history for v in scores.values())


def test_monitor_rejects_bad_arguments():
    with pytest.raises(ValueError, match="every_n_steps"):
        SeparabilityMonitor(probe=PROBE, every_n_steps=0)
    with pytest.raises(ValueError, match="probe"):
        SeparabilityMonitor(probe=X)
    with pytest.raises(ValueError, match="method"):
        SeparabilityMonitor(probe=PROBE, method="exact")


class TwoInputs(L.LightningModule):
    """forward(image, extra): a model with two inputs, probed with a tuple or a dict."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(64 + 3, 16), nn.ReLU(), nn.Linear(16, 10))

    def forward(self, image, extra):
        return self.body(torch.cat([image.flatten(1), extra], dim=1))


def test_monitor_probes_a_model_with_two_inputs():
    module = TwoInputs()
    extra = torch.randn(len(PROBE[1]), 3, generator=torch.Generator().manual_seed(0))
    ref_feats = torch.relu(module.body[0](torch.cat([PROBE[0].flatten(1), extra], 1)))
    ref = lt.layer_separability(ref_feats.detach(), PROBE[1], holdout=0.5)
    for inputs in ((PROBE[0], extra), {"image": PROBE[0], "extra": extra}):
        monitor = SeparabilityMonitor(probe=(inputs, PROBE[1]), batch_size=50, method="degree")
        scores = monitor.measure(module)
        assert monitor.names == ["body.1"] and scores["body.1"] == pytest.approx(ref, abs=1e-6)


class Counting:
    """Wraps a function and records its calls' arguments."""

    def __init__(self, fn) -> None:
        self.fn, self.calls = fn, []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.fn(*args, **kwargs)


def test_fisher_monitor_scores_all_layers_in_one_batched_pass(tmp_path, monkeypatch):
    """method="fisher": per measurement one probe forward for all layers and one
    score_sets call with every layer and the label layout built at the first measurement;
    the logged values are layer_separability(method="fisher") of each layer."""
    import lsm_train.measures.fisher as fisher
    import lsm_train.monitor as monitor_mod

    layout_class = fisher.FisherLayout
    layouts = Counting(layout_class)
    monkeypatch.setattr(fisher, "FisherLayout", layouts)
    scored = Counting(monitor_mod.score_sets)
    monkeypatch.setattr(monitor_mod, "score_sets", scored)
    module = LitMLP()
    probe_forwards = []
    module.register_forward_pre_hook(lambda m, a: probe_forwards.append(1) if not m.training
                                     else None)
    monitor = SeparabilityMonitor(probe=PROBE, every_n_steps=3, method="fisher")
    memory = MemoryLogger()
    fit(module, 6, tmp_path, logger=[memory], callbacks=[monitor])
    assert [s for s, m in memory.rows if "lsm/model.2" in m] == [0, 3, 6]
    assert len(probe_forwards) == 3 and len(layouts.calls) == 1 and len(scored.calls) == 3
    for (sets,), _ in scored.calls:
        ((feats, layout),) = sets
        assert list(feats) == ["model.2", "model.4"] and isinstance(layout, layout_class)
    module.eval()
    with lt.HiddenCapture(module, monitor.names) as feats, torch.no_grad():
        module(PROBE[0])
    for name in monitor.names:
        ref = lt.layer_separability(feats[name], PROBE[1], method="fisher", holdout=0.5)
        assert monitor.last[name] == pytest.approx(ref, abs=1e-12)


class LitConv(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Flatten(),
                                   nn.Linear(6 * 64, 10))

    def forward(self, x):
        return self.model(x)


def test_fisher_monitor_reduces_conv_maps_like_layer_separability():
    module = LitConv()
    monitor = SeparabilityMonitor(probe=PROBE, layers=["model.1"], method="fisher",
                                  batch_size=50)
    scores = monitor.measure(module)
    with lt.HiddenCapture(module, ["model.1"]) as feats, torch.no_grad():
        module(PROBE[0])
    assert feats["model.1"].ndim == 4  # the reference reduces the map itself
    ref = lt.layer_separability(feats["model.1"], PROBE[1], method="fisher", holdout=0.5)
    assert scores["model.1"] == pytest.approx(ref, abs=1e-12)


def test_fisher_monitor_warns_and_logs_nan_when_the_probe_cannot_be_cross_fitted():
    probe = (X[:5], torch.arange(5))  # five classes of one sample each
    monitor = SeparabilityMonitor(probe=probe, method="fisher")
    with pytest.warns(RuntimeWarning, match="not computed"):
        scores = monitor.measure(LitMLP())
    assert monitor.names == ["model.2", "model.4"]
    assert all(v != v for v in scores.values())  # NaN
