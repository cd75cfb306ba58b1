"""DBN: greedy CD-k pretraining of stacked RBMs, then a sigmoid network fine-tuned by backprop."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

from lsm_train.models import DBN, create_model


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return torch.tensor(X / 16.0, dtype=torch.float32), torch.tensor(y)


def test_pretraining_lowers_reconstruction_error_on_digits(digits):
    X, _ = digits
    torch.manual_seed(0)
    model = create_model("dbn", sizes=[64, 32])
    assert isinstance(model, DBN) and model.hidden_layers == ["rbms.0.act", "rbms.1.act"]
    before = model.reconstruction_errors(X)
    history = model.pretrain(X.reshape(-1, 1, 8, 8), epochs=5, k=1, lr=0.3, batch_size=16,
                             seed=0)
    assert len(history) == 2 and all(len(h) == 5 for h in history)
    for errors in history:
        assert errors[-1] < 0.5 * errors[0], history
    after = model.reconstruction_errors(X)
    assert after[0] < 0.5 * before[0]
    # better than the best reconstruction without weights (the per-pixel mean)
    assert after[0] < 0.5 * float(((X - X.mean(0)) ** 2).mean())


def test_gaussian_bernoulli_first_layer(digits):
    X, _ = digits
    Xs = (X - X.mean(0)) / X.std(0).clamp_min(1e-2)
    torch.manual_seed(0)
    model = create_model("dbn", sizes=[32, 16], visible="gaussian")
    assert model.rbms[0].visible == "gaussian" and model.rbms[1].visible == "bernoulli"
    history = model.pretrain(Xs, epochs=4, lr=0.01, batch_size=16, seed=0)
    assert history[0][-1] < 0.8 * history[0][0], history
    assert history[1][-1] < history[1][0], history
    # Gaussian visible means are linear (unbounded), Bernoulli ones are probabilities
    h = torch.ones(1, 32)
    torch.testing.assert_close(model.rbms[0].visible_mean(h),
                               h @ model.rbms[0].weight + model.rbms[0].visible_bias)
    with pytest.raises(ValueError, match=r"values in \[0, 1\].*visible='gaussian'"):
        create_model("dbn").pretrain(Xs, epochs=1)


def _exact_log_likelihood(rbm, V: np.ndarray) -> float:
    """Mean log p(v) of a Bernoulli RBM by enumerating every visible state (independent)."""
    W = rbm.weight.detach().double().numpy()
    b = rbm.visible_bias.detach().double().numpy()
    c = rbm.hidden_bias.detach().double().numpy()

    def neg_free_energy(v):
        return v @ b + np.logaddexp(0, v @ W.T + c).sum(axis=-1)

    states = np.array(list(itertools.product([0, 1], repeat=W.shape[1])), dtype=float)
    log_z = np.logaddexp.reduce(neg_free_energy(states))
    return float(np.mean(neg_free_energy(V) - log_z))


def test_cd1_raises_exact_log_likelihood_of_a_tiny_rbm():
    rng = np.random.default_rng(0)
    protos = np.array([[1, 1, 1, 0, 0, 0, 1, 0], [0, 0, 0, 1, 1, 1, 0, 1]], dtype=float)
    V = protos[rng.integers(0, 2, 200)]
    V = np.abs(V - (rng.random(V.shape) < 0.05))  # flip 5% of the bits
    torch.manual_seed(0)
    model = create_model("dbn", sizes=[3, 2], image_size=(2, 4))
    before = _exact_log_likelihood(model.rbms[0], V)
    model.pretrain(torch.tensor(V, dtype=torch.float32), epochs=20, lr=0.1, batch_size=10,
                   seed=0)
    after = _exact_log_likelihood(model.rbms[0], V)
    assert after > before + 1.0, (before, after)  # before is about 8 * log(1/2) = -5.5


def test_pretraining_is_deterministic_with_a_seed(digits):
    X = digits[0][:200]
    runs = []
    for _ in range(2):
        torch.manual_seed(1)
        model = create_model("dbn", sizes=[16, 8])
        runs.append((model.pretrain(X, epochs=2, seed=3), model.rbms[1].weight.clone()))
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1])


def test_pretraining_from_a_dataloader(digits):
    X, y = digits
    X = X[:320].reshape(-1, 1, 8, 8)
    torch.manual_seed(0)
    pairs = DataLoader(TensorDataset(X, y[:320]), batch_size=16, shuffle=False)
    model = create_model("dbn", sizes=[32, 16])
    history = model.pretrain(pairs, epochs=4, lr=0.3)
    assert all(h[-1] < h[0] for h in history), history
    plain = DataLoader(X, batch_size=32)  # yields x only
    torch.manual_seed(0)
    history = create_model("dbn", sizes=[32, 16]).pretrain(plain, epochs=2, lr=0.3)
    assert [len(h) for h in history] == [2, 2]


def test_pretrained_stack_is_a_sigmoid_network_fine_tuned_by_backprop(digits):
    X, y = digits
    torch.manual_seed(0)
    model = create_model("dbn", sizes=[64, 32])
    model.pretrain(X, epochs=3, lr=0.3, seed=0)
    x = X[:5].reshape(-1, 1, 8, 8)
    seen = {}
    hook = model.rbms[0].act.register_forward_hook(lambda m, i, o: seen.setdefault("h", o))
    logits = model(x)
    hook.remove()
    r0, r1 = model.rbms
    h0 = torch.sigmoid(X[:5] @ r0.weight.T + r0.hidden_bias)
    torch.testing.assert_close(seen["h"], h0)
    h1 = torch.sigmoid(h0 @ r1.weight.T + r1.hidden_bias)
    torch.testing.assert_close(logits, model.head(h1))
    with torch.no_grad():
        before = F.cross_entropy(model(X), y).item()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for i in range(30):
        idx = slice(32 * i, 32 * i + 32)
        opt.zero_grad()
        F.cross_entropy(model(X[idx]), y[idx]).backward()
        opt.step()
    with torch.no_grad():
        after = F.cross_entropy(model(X), y).item()
    assert after < before - 0.3, (before, after)


@pytest.mark.parametrize("kw,match", [
    (dict(epochs=0), "epochs"), (dict(k=0), "k"), (dict(lr=0.0), "lr"),
    (dict(batch_size=0), "batch_size"),
])
def test_pretrain_option_errors(kw, match, digits):
    with pytest.raises(ValueError, match=match):
        create_model("dbn").pretrain(digits[0], **kw)


def test_pretrain_data_errors():
    model = create_model("dbn")
    with pytest.raises(ValueError, match="expects inputs with 64 values"):
        model.pretrain(torch.rand(10, 1, 9, 9), epochs=1)
    with pytest.raises(ValueError, match="finite"):
        model.pretrain(torch.full((10, 64), float("nan")), epochs=1)
    with pytest.raises(ValueError, match="batch of samples"):
        model.pretrain(torch.rand(64), epochs=1)
    with pytest.raises(ValueError, match="depth=3 disagrees"):
        create_model("dbn", sizes=[8, 8], depth=3)
    assert len(create_model("dbn", sizes=16, depth=3).hidden_layers) == 3
