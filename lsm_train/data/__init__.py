"""Datasets for the trainer: in-memory tensors, deterministic splits and batch order
(user guide: docs/app.md#data).

:func:`load_data` loads a dataset of :data:`DATASETS` by name and returns a
:class:`DataBundle`: train and test :class:`ArrayDataset` plus the shape facts a model
needs (``num_classes``, ``in_channels``, ``image_size``). Images are ``(n, C, H, W)``;
vectors are ``(n, d)`` with ``in_channels = d`` and ``image_size = 1``. The options of a
dataset are the keywords of its loader; an unknown one is a ValueError that names it and
the accepted ones (a mistyped ``data.*`` key in a recipe is never ignored).

* :mod:`~lsm_train.data.bundled`: ``digits``, ``mnist5k``, ``synthetic`` (no files);
* :mod:`~lsm_train.data.files`: ``mnist``, ``fashion_mnist``, ``cifar10`` (torchvision's
  on-disk layout, optional download);
* :mod:`lsm_train.hard_data`: ``teacher``, ``digits_noisy``, ``digits_small``.

Own data: ``data._target_=<module.fn>`` (:mod:`lsm_train.custom`, docs/integrations.md).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

from .bundle import ArrayDataset, DataBundle, epoch_order
from .bundled import load_digits_data, load_mnist5k, load_synthetic
from .files import load_cifar10, load_mnist, read_cifar10, read_idx

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
    "dataset_options",
    "DATASETS",
]

# the data.* keys that load_data or the trainer read, whatever the dataset
COMMON_KEYS = ("batch_size", "eval_batch_size", "augment", "limit_train", "limit_test")


def _hard_dataset(name: str) -> Callable[..., DataBundle]:
    def load(**kw: object) -> DataBundle:
        from lsm_train.hard_data import HARD_DATASETS  # imported late: it imports this package

        return HARD_DATASETS[name](**kw)

    return load


DATASETS: dict[str, Callable[..., DataBundle]] = {
    "digits": load_digits_data,
    "mnist5k": load_mnist5k,
    "synthetic": load_synthetic,
    "mnist": functools.partial(load_mnist, "mnist"),
    "fashion_mnist": functools.partial(load_mnist, "fashion_mnist"),
    "cifar10": load_cifar10,
    **{n: _hard_dataset(n) for n in ("teacher", "digits_noisy", "digits_small")},
}


def dataset_options(name: str) -> list[str] | None:
    """The keyword options of dataset ``name``'s loader (None: the loader checks its own)."""
    params = inspect.signature(DATASETS[name]).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind is p.KEYWORD_ONLY]


def load_data(
    name: str,
    *,
    limit_train: int | None = None,
    limit_test: int | None = None,
    **options: object,
) -> DataBundle:
    """Load dataset ``name`` (one of :data:`DATASETS`); ``limit_*`` keep the first n samples.

    ``options`` go to the dataset's loader; an option it does not take raises ValueError.
    """
    if name not in DATASETS:
        raise ValueError(f"data.name: unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    for key, lim in (("limit_train", limit_train), ("limit_test", limit_test)):
        if lim is not None and int(lim) < 1:
            raise ValueError(
                f"data.{key}: expected a positive number of samples or null, got {lim}"
            )
    accepted = dataset_options(name)
    unknown = sorted(set(options) - set(accepted)) if accepted is not None else []
    if unknown:
        raise ValueError(
            f"data={name}: unknown option(s) {unknown}; accepted: {', '.join(accepted)} "
            f"(plus {', '.join(COMMON_KEYS)})"
        )
    bundle = DATASETS[name](**options)
    bundle.train = bundle.train.subset(limit_train)
    bundle.test = bundle.test.subset(limit_test)
    return bundle
