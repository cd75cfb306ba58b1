"""The README's examples run as written (on real digits, with tiny stand-ins for the user's
data loader and probe), and do what the README says they do."""

import re
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linprog
from sklearn.datasets import load_digits

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks(section: str) -> list[str]:
    text = README.read_text()
    start = text.index(section)
    end = text.index("\n## ", start + len(section))
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)


def _digits():
    X, y = load_digits(return_X_y=True)
    return torch.tensor(X / 16.0, dtype=torch.float32).view(-1, 1, 8, 8), torch.tensor(y)


def _run(block: str, name: str, env: dict) -> dict:
    exec(compile(block, f"README:{name}", "exec"), env)  # noqa: S102
    return env


def test_the_three_uses_run_in_order():
    X, y = _digits()
    torch.manual_seed(0)
    env = {
        "x_probe": X[:128], "y_probe": y[:128], "x_test": X[1500:], "y_test": y[1500:],
        "loader": [(X[i : i + 64], y[i : i + 64]) for i in range(128, 640, 64)],
    }
    monitor, loss, guard = _python_blocks("## The three uses")
    _run(monitor, "monitor", env)
    model = env["model"]
    assert list(env["scores"]) == model.hidden_layers
    assert all(0.0 <= s <= 1.0 for s in env["scores"].values())

    before = [p.detach().clone() for p in model.parameters()]
    _run(loss, "loss", env)
    assert int(env["reg"].num_steps) == len(env["loader"])  # one score per forward
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))

    _run(guard, "guard", env)
    stats = env["opt"].stats
    assert stats["steps"] == stats["checks"] == len(env["loader"])
    assert stats["accepted"] + stats["rejected"] == stats["checks"]


def _lp_separable(A: np.ndarray, B: np.ndarray) -> bool:
    """Independent reference: A w >= b + 1, B w <= b - 1 feasible (scipy's LP)."""
    d = A.shape[1]
    rows = np.vstack([np.hstack([-A, np.ones((len(A), 1))]), np.hstack([B, -np.ones((len(B), 1))])])
    res = linprog(np.zeros(d + 1), A_ub=rows, b_ub=-np.ones(len(rows)),
                  bounds=[(None, None)] * (d + 1), method="highs")
    return res.status == 0


def test_the_measures_block_agrees_with_an_lp():
    (block,) = _python_blocks("## The measures at a glance")
    rng = torch.Generator().manual_seed(0)
    H = torch.randn(64, 8, generator=rng, dtype=torch.float64)
    y = torch.arange(64) % 4
    for shift, separable in ((6.0, True), (0.0, False)):
        A = torch.randn(40, 3, generator=rng, dtype=torch.float64) + shift
        B = torch.randn(30, 3, generator=rng, dtype=torch.float64)
        env = _run(block, "measures", {"A": A, "B": B, "H": H, "y": y, "lt": __import__(
            "lsm_train")})
        assert _lp_separable(A.numpy(), B.numpy()) is separable
        assert env["cert"].separable is separable
        assert (env["m"] == 1.0) is separable and 0.5 <= env["m"] <= 1.0
        assert (env["rho"] > 0.0) is separable
        assert 0.0 <= env["s"] <= 1.0
        assert env["S"].ndim == 0
