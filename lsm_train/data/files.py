"""Datasets read from files in torchvision's layout (user guide: docs/app.md#data).

* ``mnist``, ``fashion_mnist``: the IDX files (``*-idx3-ubyte`` / ``*-idx1-ubyte``,
  optionally ``.gz``) read by :func:`read_idx`;
* ``cifar10``: the python pickle batches of ``cifar-10-batches-py`` read by
  :func:`read_cifar10`.

The files are looked up under ``root``; ``download=true`` fetches them with torchvision
(``pip install torchvision``), which is otherwise not needed. Images stay uint8 in memory
and are normalised per batch with the dataset's mean and std (:data:`NORMALISE`).
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import torch

from .bundle import ArrayDataset, DataBundle

__all__ = ["read_idx", "read_cifar10", "load_mnist", "load_cifar10", "NORMALISE"]

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format; gzip if the name ends in ``.gz``).

    Header: two zero bytes, a type code (0x08 = ubyte), the number of dimensions, then one
    big-endian uint32 per dimension; the data follow in C order.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number {raw[:4]!r})")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    data = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: IDX header says shape {dims}, found {data.size} values")
    return data.reshape(dims)


def read_cifar10(folder: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read ``cifar-10-batches-py``: ``data_batch_1..5`` and ``test_batch`` (pickled dicts
    with ``b"data"`` (n, 3072) uint8 and ``b"labels"``). Returns x_train (n, 3, 32, 32),
    y_train, x_test, y_test."""
    folder = Path(folder)

    def load(name: str) -> tuple[np.ndarray, np.ndarray]:
        with open(folder / name, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        return x, np.asarray(d[b"labels"], dtype=np.int64)

    train = [load(f"data_batch_{i}") for i in range(1, 6)]
    x_te, y_te = load("test_batch")
    return (
        np.concatenate([t[0] for t in train]),
        np.concatenate([t[1] for t in train]),
        x_te,
        y_te,
    )


_MNIST_DIRS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
_MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
NORMALISE = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


def _torchvision_download(name: str, root: Path) -> None:
    try:
        import torchvision.datasets as tvd
    except ImportError as err:
        raise RuntimeError(
            f"data={name} with download=true needs torchvision to fetch the files: "
            "pip install torchvision (or pip install 'lsm_train[vision]'), "
            f"or put the files under {root} yourself (see docs/app.md#data)"
        ) from err
    cls = {"mnist": tvd.MNIST, "fashion_mnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10}[name]
    for train in (True, False):
        cls(str(root), train=train, download=True)


def _find_mnist_files(name: str, root: Path) -> dict[str, Path] | None:
    for folder in (root / _MNIST_DIRS[name] / "raw", root / _MNIST_DIRS[name], root):
        found = {}
        for key, stem in _MNIST_FILES.items():
            for cand in (folder / stem, folder / (stem + ".gz")):
                if cand.is_file():
                    found[key] = cand
                    break
        if len(found) == 4:
            return found
    return None


def load_mnist(
    name: str = "mnist", *, root: str = "data", download: bool = False
) -> DataBundle:
    """MNIST or Fashion-MNIST from IDX files under ``root`` (torchvision's layout
    ``root/MNIST/raw/`` or ``root/FashionMNIST/raw/``, or directly in ``root``)."""
    root = Path(root).expanduser()
    files = _find_mnist_files(name, root)
    if files is None and download:
        _torchvision_download(name, root)
        files = _find_mnist_files(name, root)
    if files is None:
        wanted = ", ".join(_MNIST_FILES.values())
        raise FileNotFoundError(
            f"data={name}: files not found under {root}/{_MNIST_DIRS[name]}/raw/ "
            f"(expected {wanted}, optionally .gz). Set data.download=true to fetch them "
            f"(needs: pip install torchvision) or data.root=<folder that has them>"
        )
    arr = {k: read_idx(p) for k, p in files.items()}
    mean, std = NORMALISE[name]
    x_tr = torch.from_numpy(arr["x_train"].astype(np.uint8)).unsqueeze(1)
    x_te = torch.from_numpy(arr["x_test"].astype(np.uint8)).unsqueeze(1)
    return DataBundle(
        name,
        ArrayDataset(x_tr, torch.from_numpy(arr["y_train"].astype(np.int64)), mean, std),
        ArrayDataset(x_te, torch.from_numpy(arr["y_test"].astype(np.int64)), mean, std),
        num_classes=10,
        in_channels=1,
        image_size=int(x_tr.shape[-1]),
    )


def load_cifar10(*, root: str = "data", download: bool = False) -> DataBundle:
    """CIFAR-10 from ``root/cifar-10-batches-py/`` (the python pickle batches)."""
    root = Path(root).expanduser()
    folder = root / "cifar-10-batches-py"
    if not (folder / "test_batch").is_file() and download:
        _torchvision_download("cifar10", root)
    if not (folder / "test_batch").is_file():
        raise FileNotFoundError(
            f"data=cifar10: {folder}/ not found (expected data_batch_1..5 and test_batch from "
            "cifar-10-python.tar.gz). Set data.download=true to fetch it (needs: pip install "
            "torchvision) or data.root=<folder that contains cifar-10-batches-py>"
        )
    x_tr, y_tr, x_te, y_te = read_cifar10(folder)
    mean, std = NORMALISE["cifar10"]
    return DataBundle(
        "cifar10",
        ArrayDataset(torch.from_numpy(x_tr), torch.from_numpy(y_tr), mean, std),
        ArrayDataset(torch.from_numpy(x_te), torch.from_numpy(y_te), mean, std),
        num_classes=10,
        in_channels=3,
        image_size=32,
    )
