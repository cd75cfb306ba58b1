"""The README's first examples run as written (on real digits, with tiny stand-ins for the
user's data loader and probe)."""

import re
from pathlib import Path

import torch
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


def test_three_lines_example_runs():
    X, y = _digits()
    env = {
        "x_probe": X[:128], "y_probe": y[:128], "x_test": X[1500:], "y_test": y[1500:],
        "loader": [(X[i : i + 64], y[i : i + 64]) for i in range(128, 640, 64)],
    }
    blocks = _python_blocks("## In three lines")
    assert len(blocks) == 2
    exec(compile(blocks[0], "README:three-lines", "exec"), env)  # noqa: S102
    assert env["opt"].stats["steps"] == 8
    assert set(env["feats"]) == set(env["model"].hidden_layers)

    rng = torch.Generator().manual_seed(0)
    A = torch.randn(40, 3, generator=rng) + 3.0
    B = torch.randn(30, 3, generator=rng)
    H = torch.randn(64, 8, generator=rng)
    y4 = torch.arange(64) % 4
    env = {"A": A, "B": B, "H": H, "y": y4, "lt": env["lt"]}
    exec(compile(blocks[1], "README:measures", "exec"), env)  # noqa: S102
