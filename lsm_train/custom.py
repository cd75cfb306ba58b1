"""Your own model and data in ``lsm-train``: ``model._target_`` and ``data._target_``.

    lsm-train model._target_=mypkg.nets.make_net data._target_=mypkg.data.load

* ``model._target_``: a callable (function or ``nn.Module`` class) given by its dotted
  path. It is called with ``num_classes``, ``in_channels`` and ``image_size`` (taken from
  the data) for those of them it accepts, plus every other key of the ``model`` node except
  the zoo's ``name`` and ``kwargs`` (``+model.width=32``). It must return an ``nn.Module``;
  without ``hidden_layers`` the layers are chosen automatically.
* ``data._target_``: a callable called with the keys of the ``data`` node that it accepts
  (the trainer's own keys ``batch_size``, ``eval_batch_size``, ``augment``, ``limit_*``
  excepted; the others are logged and ignored). When it has a ``split`` parameter it is
  called with ``split="train"`` and ``split="test"``, when it has a ``train`` parameter with
  ``train=True`` / ``False`` (torchvision style); otherwise once. It returns a
  :class:`~lsm_train.data.DataBundle`, a dict ``{"train": part, "test": part}``, a pair
  ``(train_part, test_part)`` or ``(x_train, y_train, x_test, y_test)``; a part is an
  ``(x, y)`` pair of tensors / arrays or a map-style ``Dataset`` of ``(x, y)`` items
  (stacked into memory). ``num_classes`` is ``max(label) + 1`` unless the dict has a
  ``"num_classes"`` entry; inputs ``(n, C, H, W)`` give ``in_channels=C``, ``image_size=H``
  (or ``(H, W)``), ``(n, H, W)`` gets a channel axis, ``(n, d)`` vectors give
  ``in_channels=d``, ``image_size=1``.

See docs/integrations.md for a worked example.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from lsm_train.data import ArrayDataset, DataBundle

__all__ = ["import_target", "model_from_target", "data_from_target", "as_bundle"]

log = logging.getLogger(__name__)
_MODEL_SKIP = ("_target_", "name", "kwargs")
_COMMON = ("num_classes", "in_channels", "image_size")


def import_target(path: Any, key: str) -> Callable[..., Any]:
    """The object named by the dotted ``path`` (``"pkg.module.fn"``)."""
    if not isinstance(path, str) or "." not in path:
        raise ValueError(f"{key}: expected a dotted path 'module.function', got {path!r}")
    module_name, _, attr = path.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"{key}: cannot import {path!r}: {err}") from err
    if not callable(obj):
        raise ValueError(f"{key}: {path!r} is a {type(obj).__name__}, not a callable")
    return obj


def _accepts(fn: Callable[..., Any]) -> tuple[set[str], bool]:
    """(keyword parameter names, takes **kwargs)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return set(), True
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names, any(p.kind == p.VAR_KEYWORD for p in params)


def model_from_target(mcfg: Mapping[str, Any], bundle: DataBundle) -> nn.Module:
    """Build the model of ``mcfg["_target_"]`` for the data in ``bundle`` (module doc)."""
    path = mcfg["_target_"]
    fn = import_target(path, "model._target_")
    names, var_kw = _accepts(fn)
    shape = {"num_classes": bundle.num_classes, "in_channels": bundle.in_channels,
             "image_size": bundle.image_size}
    kwargs = {k: v for k, v in shape.items() if var_kw or k in names}
    kwargs.update({k: v for k, v in mcfg.items() if k not in _MODEL_SKIP})
    try:
        model = fn(**kwargs)
    except TypeError as err:
        raise ValueError(f"model._target_={path}: {err} (called with {sorted(kwargs)})") from err
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"model._target_={path}: returned a {type(model).__name__}, expected an nn.Module"
        )
    return model


def data_from_target(
    dcfg: Mapping[str, Any], skip: Sequence[str] = ()
) -> DataBundle:
    """Load the data of ``dcfg["_target_"]`` (module doc); ``skip``: the trainer's keys."""
    path = dcfg["_target_"]
    fn = import_target(path, "data._target_")
    names, var_kw = _accepts(fn)
    own = ("_target_", "limit_train", "limit_test", *skip)
    offered = {k: v for k, v in dcfg.items() if k not in own}
    kwargs = {k: v for k, v in offered.items() if var_kw or k in names}
    ignored = sorted(set(offered) - set(kwargs))
    if ignored:
        log.info("data._target_=%s: keys it does not take, ignored: %s", path, ignored)
    if "split" in names:
        result: Any = {"train": fn(split="train", **kwargs), "test": fn(split="test", **kwargs)}
    elif "train" in names:
        result = {"train": fn(train=True, **kwargs), "test": fn(train=False, **kwargs)}
    else:
        result = fn(**kwargs)
    bundle = as_bundle(result, name=path.rpartition(".")[2], what=f"data._target_={path}")
    for key in ("limit_train", "limit_test"):
        lim = dcfg.get(key)
        if lim is not None and int(lim) < 1:
            raise ValueError(f"data.{key}: expected a positive number of samples or null, "
                             f"got {lim}")
    bundle.train = bundle.train.subset(dcfg.get("limit_train"))
    bundle.test = bundle.test.subset(dcfg.get("limit_test"))
    return bundle


def _tensor(a: Any) -> torch.Tensor:
    return a if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))


def _part(part: Any, split: str, what: str) -> ArrayDataset:
    if isinstance(part, ArrayDataset):
        return part
    expected = (f"{what}: the {split} part is a {type(part).__name__}; expected an (x, y) "
                "pair of tensors or arrays, or a Dataset of (x, y) items")
    try:
        if isinstance(part, (tuple, list)) and len(part) == 2:
            x, y = _tensor(part[0]), _tensor(part[1])
        elif hasattr(part, "__getitem__") and hasattr(part, "__len__") \
                and not isinstance(part, (str, bytes)):
            items = [part[i] for i in range(len(part))]
            if not items:
                raise ValueError(f"{what}: the {split} Dataset is empty")
            x = torch.stack([_tensor(item[0]) for item in items])
            y = torch.as_tensor([int(item[1]) for item in items])
        else:
            raise ValueError(expected)
    except (TypeError, IndexError, RuntimeError) as err:
        raise ValueError(f"{expected} ({type(err).__name__}: {err})") from err
    if x.ndim < 2 or y.ndim != 1 or len(x) != len(y) or len(y) == 0:
        raise ValueError(
            f"{what}: {split} inputs {tuple(x.shape)} and labels {tuple(y.shape)} do not fit: "
            "expected (n, ...) inputs and n integer labels, n >= 1"
        )
    if y.dtype.is_floating_point or y.dtype == torch.bool or int(y.min()) < 0:
        raise ValueError(f"{what}: {split} labels must be integers >= 0, got {y.dtype}")
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if x.dtype != torch.uint8:
        x = x.float()
    return ArrayDataset(x, y.long())


def as_bundle(result: Any, *, name: str = "custom", what: str = "data") -> DataBundle:
    """A :class:`DataBundle` from what a data function returned (see the module doc)."""
    if isinstance(result, DataBundle):
        return result
    num_classes = None
    if isinstance(result, Mapping):
        missing = [k for k in ("train", "test") if k not in result]
        if missing:
            raise ValueError(f"{what}: the returned dict has no {missing} entries; "
                             f"keys: {list(result)}")
        train, test, num_classes = result["train"], result["test"], result.get("num_classes")
    elif isinstance(result, (tuple, list)) and len(result) == 4:
        train, test = result[:2], result[2:]
    elif isinstance(result, (tuple, list)) and len(result) == 2:
        train, test = result
    else:
        raise ValueError(
            f"{what}: returned a {type(result).__name__}; expected a DataBundle, a dict "
            "{'train': ..., 'test': ...}, (train, test) or (x_train, y_train, x_test, y_test)"
        )
    tr, te = _part(train, "train", what), _part(test, "test", what)
    if tr.x.shape[1:] != te.x.shape[1:]:
        raise ValueError(f"{what}: train inputs {tuple(tr.x.shape[1:])} and test inputs "
                         f"{tuple(te.x.shape[1:])} differ in shape")
    if num_classes is None:
        num_classes = int(max(tr.y.max(), te.y.max())) + 1
    if tr.x.ndim == 2:
        in_channels, image_size = int(tr.x.shape[1]), 1
    else:
        h, w = int(tr.x.shape[-2]), int(tr.x.shape[-1])
        in_channels, image_size = int(tr.x.shape[1]), (h if h == w else (h, w))
    return DataBundle(name, tr, te, num_classes=int(num_classes), in_channels=in_channels,
                      image_size=image_size)
