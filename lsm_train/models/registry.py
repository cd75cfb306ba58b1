"""Model registry in the style of timm: ``register_model``, ``create_model``, ``list_models``.

A builder is a function ``fn(*, num_classes, in_channels, image_size, **options) -> nn.Module``
registered under its name (or ``name=``). ``create_model`` normalises the common arguments
(``image_size`` an int or ``(h, w)``; lists from Hydra configs accepted), rejects unknown
names and options with a ValueError that lists what exists / what is accepted, and checks
that the returned model has ``hidden_layers``: the ordered names (as in
``model.named_modules()``) of its meaningful hidden outputs, ready for forward hooks.

Names of the form ``"torchvision:<name>"`` and ``"timm:<name>"`` build external models
(see :mod:`lsm_train.models.external`).
"""

from __future__ import annotations

import fnmatch
import inspect
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from lsm_train._validation import check_int
from lsm_train.models.external import create_external

__all__ = [
    "register_model",
    "create_model",
    "list_models",
    "model_options",
    "image_hw",
    "check_hidden_layers",
    "positive_int",
    "int_list",
]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_COMMON = ("num_classes", "in_channels", "image_size")
EXTERNAL_PREFIXES = ("torchvision", "timm")


def register_model(fn: Callable[..., nn.Module] | None = None, *, name: str | None = None):
    """Decorator: register ``fn`` as a model builder under ``name`` (default ``fn.__name__``).

    The builder must accept the keyword arguments ``num_classes``, ``in_channels`` and
    ``image_size`` (an ``(h, w)`` tuple of ints); its other keyword arguments are the options
    that ``create_model`` accepts for that name.
    """

    def wrap(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or f.__name__
        params = inspect.signature(f).parameters
        missing = [p for p in _COMMON if p not in params]
        if missing:
            raise ValueError(f"model builder {key!r} must accept keyword argument(s) {missing}")
        if key in _REGISTRY and _REGISTRY[key] is not f:
            raise ValueError(f"a model named {key!r} is already registered")
        _REGISTRY[key] = f
        return f

    return wrap(fn) if fn is not None else wrap


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted names of the registered models, optionally filtered by a glob ``pattern``."""
    names = sorted(_REGISTRY)
    return [n for n in names if fnmatch.fnmatchcase(n, pattern)] if pattern else names


def model_options(name: str) -> dict[str, Any]:
    """The options (beyond the common arguments) of a registered model, with their defaults."""
    fn = _builder(name)
    return {
        p.name: p.default
        for p in inspect.signature(fn).parameters.values()
        if p.name not in _COMMON and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }


def _builder(name: str) -> Callable[..., nn.Module]:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(
            f"unknown model {name!r}; registered models: {', '.join(list_models())}; "
            f"external models: 'torchvision:<name>' or 'timm:<name>'"
        )
    return _REGISTRY[name]


def positive_int(value: Any, name: str) -> int:
    """``value`` as an int >= 1 (integral floats and numpy integers accepted)."""
    return check_int(value, name, 1, integral_float=True)


def int_list(value: Any, name: str, *, allow_empty: bool = False) -> list[int]:
    """A list of positive ints from a list/tuple, 1-D array or Hydra ListConfig."""
    if isinstance(value, np.ndarray) and value.ndim == 1:
        value = value.tolist()
    if isinstance(value, Sequence) and not isinstance(value, str):
        vals = [positive_int(v, f"{name}[{i}]") for i, v in enumerate(value)]
        if vals or allow_empty:
            return vals
    raise ValueError(f"{name}: expected a non-empty list of positive integers, got {value!r}")


def image_hw(image_size: Any) -> tuple[int, int]:
    """``image_size`` as ``(h, w)``: an int ``s`` means ``(s, s)``; a pair is taken as is."""
    if isinstance(image_size, numbers.Real) and not isinstance(image_size, bool):
        s = positive_int(image_size, "image_size")
        return s, s
    if isinstance(image_size, Sequence) and not isinstance(image_size, str):
        vals = list(image_size)
        if len(vals) == 2:
            return (positive_int(vals[0], "image_size[0]"), positive_int(vals[1], "image_size[1]"))
    raise ValueError(f"image_size: expected an int or an (h, w) pair of ints, got {image_size!r}")


def flatten_inputs(x: torch.Tensor, in_features: int, model: str) -> torch.Tensor:
    """(N, ...) -> (N, in_features), with a clear error when the sample size is wrong
    (the flattening models: MLP, DBN)."""
    x = x.flatten(1)
    if x.shape[1] != in_features:
        raise ValueError(
            f"{model} expects inputs with {in_features} values per sample "
            f"(in_channels*h*w), got {x.shape[1]}"
        )
    return x


def check_hidden_layers(model: nn.Module, what: str) -> list[str]:
    """Validate ``model.hidden_layers`` (non-empty, unique, existing module names)."""
    names = getattr(model, "hidden_layers", None)
    if not names or isinstance(names, str):
        raise ValueError(f"{what}: the model has no hidden_layers list")
    modules = dict(model.named_modules())
    unknown = [n for n in names if n.removesuffix(":input") not in modules]
    if unknown:
        raise ValueError(f"{what}: hidden_layers {unknown} are not module names of the model")
    if len(set(names)) != len(names):
        raise ValueError(f"{what}: hidden_layers contains duplicates: {list(names)}")
    return list(names)


def create_model(
    name: str,
    *,
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int | Sequence[int] = 8,
    **kwargs: Any,
) -> nn.Module:
    """Build model ``name`` for ``in_channels x image_size`` inputs and ``num_classes`` outputs.

    The defaults fit sklearn's digits (1x8x8, 10 classes). ``kwargs`` are the model's own
    options (see ``model_options(name)``); an unknown option raises a ValueError listing the
    accepted ones. The returned model maps ``(N, in_channels, h, w)`` to ``(N, num_classes)``
    logits and has ``.hidden_layers``.
    """
    num_classes = positive_int(num_classes, "num_classes")
    in_channels = positive_int(in_channels, "in_channels")
    hw = image_hw(image_size)
    if isinstance(name, str) and ":" in name:
        prefix, _, ext_name = name.partition(":")
        if prefix not in EXTERNAL_PREFIXES:
            raise ValueError(
                f"unknown model source {prefix!r} in {name!r}; expected one of "
                f"{', '.join(p + ':<name>' for p in EXTERNAL_PREFIXES)} or a registered model: "
                f"{', '.join(list_models())}"
            )
        model = create_external(
            prefix, ext_name, num_classes=num_classes, in_channels=in_channels,
            image_size=hw, **kwargs,
        )
        check_hidden_layers(model, name)
        return model
    fn = _builder(name)
    accepted = model_options(name)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        listed = ", ".join(f"{k}={v!r}" for k, v in accepted.items()) or "none"
        raise ValueError(
            f"unknown option(s) {unknown} for model {name!r}; accepted options: {listed}"
        )
    model = fn(num_classes=num_classes, in_channels=in_channels, image_size=hw, **kwargs)
    check_hidden_layers(model, name)
    return model
