"""Own model and data in the app: ``model._target_`` / ``data._target_`` end to end (the
real command line in a subprocess, and in-process variants), the shapes a data function
may return, and the errors."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lsm_train.app import compose, train_from_config
from lsm_train.custom import as_bundle, model_from_target
from lsm_train.data import DataBundle, load_digits_data
from lsm_train.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[1]
FAST = ["logger=none", "trainer.progress=false", "debug=smoke"]

USER_CODE = '''
"""A user's own package: a factory without hidden_layers and a data function."""
import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset


def make_net(num_classes, in_channels, image_size, width=16):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size**2, width),
                         nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, num_classes))


def blobs(n=240, dim=6, classes=3):
    """(x_train, y_train, x_test, y_test) as numpy arrays: vectors."""
    rng = np.random.default_rng(0)
    y = np.arange(n) % classes
    x = rng.normal(size=(n, dim)) + 3 * np.eye(classes, dim)[y]
    return x[: n // 2], y[: n // 2], x[n // 2 :], y[n // 2 :]


class Images(Dataset):
    """A map-style Dataset of (1, 4, 4) images; the split picks half of them."""

    def __init__(self, split):
        g = torch.Generator().manual_seed(0 if split == "train" else 1)
        self.y = torch.arange(60) % 2
        self.x = torch.randn(60, 1, 4, 4, generator=g) + 2.0 * self.y.view(-1, 1, 1, 1)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def image_split(split, scale=1.0):
    return Images(split)
'''


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    (tmp_path / "userpkg_i15.py").write_text(textwrap.dedent(USER_CODE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "offline")
    return tmp_path


def test_own_model_and_data_on_the_command_line(user_package, tmp_path):
    """The documented command line; the run logs lsm/<layer> of the automatic choice."""
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", HYDRA_FULL_ERROR="1")
    env["PYTHONPATH"] = os.pathsep.join([str(user_package), str(ROOT), env.get("PYTHONPATH", "")])
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "lsm_train", "model._target_=userpkg_i15.make_net",
         "+model.width=24", "data._target_=userpkg_i15.blobs", "+data.dim=5", "lsm=both",
         f"hydra.run.dir={run_dir}", *FAST],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(run_dir)
    lsm_keys = {k for r in rows for k in r if k.startswith("lsm/")}
    assert lsm_keys == {"lsm/2", "lsm/4", "lsm/mean"}  # the two ReLUs, chosen automatically
    assert "chosen automatically: ['2', '4']" in proc.stderr + proc.stdout + "".join(
        p.read_text() for p in run_dir.glob("*.log")
    )


def test_dataset_split_function_and_a_class_as_model_target(user_package, tmp_path):
    cfg = compose(["model._target_=torch.nn.Sequential", "data._target_=userpkg_i15.image_split",
                   "lsm=monitor", *FAST])
    with pytest.raises(Exception, match="Sequential"):  # Sequential() has no layer to choose
        train_from_config(cfg, tmp_path / "a")
    cfg = compose(["model._target_=userpkg_i15.make_net", "data._target_=userpkg_i15.image_split",
                   "lsm=monitor", *FAST])
    res = train_from_config(cfg, tmp_path / "b")
    assert res.status == "completed"
    assert {"lsm/2", "lsm/4"} <= set(read_metrics(tmp_path / "b")[-1])


# -- model_from_target --------------------------------------------------------------------


def only_classes(num_classes):
    """A factory that takes only num_classes."""
    return nn.Linear(64, num_classes)


def test_model_factory_gets_only_the_shape_arguments_it_accepts():
    bundle = load_digits_data()
    # the zoo's name and kwargs (from the default model group) are not passed
    model = model_from_target({"_target_": f"{__name__}.only_classes", "name": "mlp",
                               "kwargs": {"width": 64}}, bundle)
    assert isinstance(model, nn.Linear) and model.out_features == 10
    with pytest.raises(ValueError, match="cannot import"):
        model_from_target({"_target_": "nowhere_i15.make"}, bundle)
    with pytest.raises(ValueError, match="expected an nn.Module"):
        model_from_target({"_target_": "builtins.dict", "x": 4.0}, bundle)
    with pytest.raises(ValueError, match="unexpected keyword argument 'depth'"):
        model_from_target({"_target_": f"{__name__}.only_classes", "depth": 3}, bundle)


# -- as_bundle ---------------------------------------------------------------------------


def test_returned_shapes_become_a_bundle():
    x = np.random.default_rng(0).normal(size=(10, 3, 5, 5)).astype(np.float32)
    y = np.arange(10) % 4
    for result in ((x, y, x[:4], y[:4]), ((x, y), (x[:4], y[:4])),
                   {"train": (x, y), "test": (x[:4], y[:4]), "num_classes": 7}):
        b = as_bundle(result)
        assert isinstance(b, DataBundle) and b.train.x.shape == (10, 3, 5, 5)
        assert (b.in_channels, b.image_size) == (3, 5)
        assert b.num_classes == (7 if isinstance(result, dict) else 4)
        torch.testing.assert_close(b.train.x, torch.from_numpy(x))
    wide = as_bundle((x[:, :, :4], y, x[:2, :, :4], y[:2]))
    assert wide.image_size == (4, 5)
    gray = as_bundle((x[:, 0], y, x[:2, 0], y[:2]))
    assert gray.train.x.shape == (10, 1, 5, 5)
    vec = as_bundle((x.reshape(10, -1), y, x[:2].reshape(2, -1), y[:2]))
    assert (vec.in_channels, vec.image_size) == (75, 1)


@pytest.mark.parametrize("result,message", [
    ([1, 2, 3], "expected a DataBundle"),
    ({"train": 1}, r"no \['test'\] entries"),
    ((np.ones((4, 2)), np.ones(4), np.ones((2, 2)), np.zeros(2, dtype=int)), "integers >= 0"),
    ((np.ones((4, 2)), np.arange(3), np.ones((2, 2)), np.arange(2)), "do not fit"),
    ((np.ones((4, 2)), np.arange(4), np.ones((2, 3)), np.arange(2)), "differ in shape"),
    (("train", "test"), "expected an"),
])
def test_bad_returns_are_explained(result, message):
    with pytest.raises(ValueError, match=message):
        as_bundle(result)
