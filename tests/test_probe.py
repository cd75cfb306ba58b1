"""lsm_train.probe: probe checks, the clean eval forward, scores and jackknife groups."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lsm_train.capture import HiddenCapture
from lsm_train.guard import SeparabilityGuard
from lsm_train.measures.soft import soft_md_lsm
from lsm_train.probe import (
    ProbeScorer,
    as_probe,
    digest,
    jackknife_groups,
    probe_forward,
    version_key,
)


class TwoInputs(nn.Module):
    hidden_layers = ["act"]

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.act = nn.ReLU()
        self.out = nn.Linear(6, 3)

    def forward(self, a: torch.Tensor, b: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
        return self.out(self.act(self.fc(a + scale * b)))


class WithAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.drop = nn.Dropout(0.5)
        self.bn = nn.BatchNorm1d(8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.attn(x, x, x)
        h = self.drop(self.norm(h + x)).mean(1)
        return self.out(self.bn(h))


def data(n=30, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    return torch.randn(n, d, generator=g) + y[:, None].float(), y


def test_numpy_probe_converted_to_the_model_dtype_and_labels_checked():
    model = TwoInputs().double()
    x, y = data()
    probe = as_probe(((x.numpy(), x.numpy()), y.numpy()), model)
    assert isinstance(probe.inputs, tuple) and probe.inputs[0].dtype == torch.float64
    assert probe.labels.dtype == torch.int64
    with pytest.raises(ValueError, match="expected 30 labels .one per probe sample"):
        as_probe(((x, x), y[:20]), model)
    with pytest.raises(ValueError, match="at least 2 classes"):
        as_probe(((x, x), torch.zeros(30, dtype=torch.long)), model)
    with pytest.raises(ValueError, match="probe: expected a pair"):
        as_probe(x, model)
    with pytest.raises(ValueError, match="at least one tensor or numpy array"):
        as_probe(("text", y), model)


def test_integer_inputs_keep_their_dtype():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 3))
    tokens = torch.randint(0, 10, (12, 2))
    probe = as_probe((tokens, torch.arange(12) % 3), model)
    assert probe.inputs.dtype == torch.int64


def test_tuple_and_dict_inputs_reach_forward_as_positional_and_keyword_arguments():
    torch.manual_seed(0)
    model = TwoInputs()
    x, y = data()
    b = torch.randn(30, 4)
    ref = soft_md_lsm(_relu_features(model, x + 0.5 * b), y)
    tuple_probe = ProbeScorer(model, ((x, 0.5 * b), y))
    dict_probe = ProbeScorer(model, ({"a": x, "b": b, "scale": 0.5}, y))
    assert float(tuple_probe.scores()[0, 0]) == pytest.approx(float(ref), rel=1e-6)
    assert float(dict_probe.scores()[0, 0]) == pytest.approx(float(ref), rel=1e-6)
    guard = SeparabilityGuard(torch.optim.SGD(model.parameters(), lr=0.1), model,
                              ({"a": x, "b": b, "scale": 0.5}, y))
    assert guard.score() == pytest.approx(float(ref), rel=1e-6)


def _relu_features(model, z):
    with torch.no_grad():
        return torch.relu(model.fc(z))


def test_eval_forward_restores_each_modules_flag_and_keeps_bn_statistics():
    torch.manual_seed(0)
    model = WithAttention()
    model.train()
    model.norm.eval()  # a submodule frozen in eval mode
    flags = {n: m.training for n, m in model.named_modules()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    x = torch.randn(12, 5, 8)
    probe = as_probe((x, torch.arange(12) % 3), model)
    feats, out1 = probe_forward(model, probe, ["bn"])
    _, out2 = probe_forward(model, probe, ["bn"])
    assert torch.equal(out1, out2)  # dropout off
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    assert torch.is_grad_enabled() and feats["bn"].shape == (12, 8)


def test_a_layer_that_never_runs_is_named():
    model = WithAttention()
    probe = as_probe((torch.randn(12, 5, 8), torch.arange(12) % 3), model)
    with pytest.raises(ValueError, match=r"\['attn.out_proj'\] of WithAttention did not run"):
        probe_forward(model, probe, ["bn", "attn.out_proj"])
    guard = SeparabilityGuard(torch.optim.SGD(model.parameters(), lr=0.1), model,
                              probe, layers=["attn.out_proj"])
    with pytest.raises(ValueError, match="did not run in the probe forward"):
        guard.score()


def test_scores_match_the_measure_on_captured_features_and_on_subsets():
    torch.manual_seed(0)
    model = TwoInputs()
    x, y = data(40)
    scorer = ProbeScorer(model, ((x, x), y), groups=4)
    table = scorer.scores()
    assert table.shape == (1, 5) and table.dtype == torch.float64
    model.eval()
    with torch.no_grad(), HiddenCapture(model, ["act"]) as feats:
        model(x, x)
    H = feats["act"]
    assert float(table[0, 0]) == pytest.approx(float(soft_md_lsm(H, y)), rel=1e-6)
    for g, keep in enumerate(jackknife_groups(y, 4)):
        ref = soft_md_lsm(H[keep], y[keep])
        assert float(table[0, 1 + g]) == pytest.approx(float(ref), rel=1e-6)


def test_jackknife_groups_are_class_stratified_and_partition_the_probe():
    y = torch.tensor([0, 1, 0, 2, 1, 0, 0, 2, 1, 0, 0, 1])
    kept = jackknife_groups(y, 3)
    left_out = [sorted(set(range(12)) - set(k.tolist())) for k in kept]
    assert sorted(i for group in left_out for i in group) == list(range(12))
    for c in (0, 1, 2):
        members = (y == c).nonzero().flatten().tolist()
        for i, sample in enumerate(members):  # the i-th of its class is in group i mod 3
            assert sample in left_out[i % 3]


def test_loss_measure_needs_logits():
    model = nn.Sequential(nn.Linear(4, 3), nn.Flatten(0))
    with pytest.raises(ValueError, match=r"measure='loss': expected the model to return logits"):
        ProbeScorer(model, data(), measure="loss").scores()
    with pytest.raises(ValueError, match="measure: expected one of"):
        ProbeScorer(model, data(), measure="nope")


def test_version_key_and_digest():
    t = torch.arange(4.0)
    key = version_key([t])
    t.add_(1)
    assert version_key([t]) != key
    assert digest([t]) == digest([t.clone()])
    assert digest([t]) != digest([t.double()])
    assert digest([np.float64(1.0)]) == digest([np.float64(1.0)])
