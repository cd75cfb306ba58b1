"""Capture the outputs of chosen hidden layers with forward hooks.

    with lt.HiddenCapture(model, ["layer1", "layer*.relu", nn.ReLU]) as feats:
        model(x)
    feats["layer1"]            # what `layer1` returned in that forward pass

Layer selection (``layers``), resolved once at construction, in a stable order (the order
given; a pattern or a type expands in ``model.named_modules()`` order; duplicates dropped),
in the one dialect of :mod:`lsm_train.selection` (see docs/integrations.md):

* an exact module name (``"features.3"``),
* a dotted glob (``"layer*.relu"``, ``"blocks.*"``): ``*`` stays within one dotted
  segment, ``**`` spans any number of them; ``GLOB:ClassName`` filters by class name,
* ``NAME:input`` watches the module's input instead of its output (e.g. ``"fc:input"``,
  the features the classifier sees),
* a module class (``nn.ReLU``): every submodule that is an instance of it,
* ``None`` (default): ``model.hidden_layers`` when the model has that attribute, else the
  automatic choice :func:`lsm_train.selection.auto_layers` (the outputs of the repeated
  blocks and the input of the final classifier; logged at INFO, and ``.names`` says).

A name or pattern that matches nothing raises a ValueError listing the closest names.

A module called more than once in one forward pass of the model (one ``nn.ReLU`` used in
several places) keeps the output of its *last* call; HiddenCapture warns
(``RuntimeWarning``, once per layer) when it sees that, since the earlier calls' outputs
are lost. Give each place its own module to watch them all.

Wrappers: a ``DistributedDataParallel``/``DataParallel`` model or a ``torch.compile``
result is unwrapped (``.module`` / ``._orig_mod``) and names are resolved against the
original module, with or without the ``module.`` / ``_orig_mod.`` prefix; ``.names`` and
the keys of the features dict never carry the prefix.

Lifetime: hooks are registered in ``__init__``, so a capture works both as a context
manager (hooks removed on exit, the dict keeps the last tensors) and as a long-lived object
(``LSMLoss``); ``remove()`` is idempotent and ``attach()`` (or entering ``with`` again)
re-registers them. Each entry holds the output of that layer's latest call; a layer that
did not run in the latest forward keeps its older entry (``clear()`` empties the dict).

In-place safety: the stored tensor is a copy made inside the hook (``out.detach().clone()``
with ``detach=True``; ``out.clone()``, which is differentiable, with ``detach=False``), so a
later in-place op on the module's output (``nn.ReLU(inplace=True)``, ``out += shortcut``)
changes neither the captured values nor its gradients.

torch.compile: hooks registered on submodules *before* the model is compiled (or at
least before the compiled model's first call) are traced into the compiled graph and
honoured, and removing them triggers a recompilation. Rule: build the capture first, then
compile, or pass the original (uncompiled) module.
"""

from __future__ import annotations

import difflib
import logging
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lsm_train.selection import INPUT_SUFFIX, auto_layers, is_glob, match_names, split_spec

__all__ = ["HiddenCapture", "unwrap_model", "resolve_layers"]

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
log = logging.getLogger(__name__)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Peel ``DistributedDataParallel``/``DataParallel`` (``.module``) and ``torch.compile``
    (``._orig_mod``) wrappers and return the module that owns the layers."""
    parallel = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    while True:
        if isinstance(model, parallel):
            model = model.module
            continue
        orig = getattr(model, "_orig_mod", None)
        if isinstance(orig, nn.Module):
            model = orig
            continue
        return model


def _strip_prefixes(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
                changed = True
    return name


def _no_match(spec: str, names: list[str], model: nn.Module) -> ValueError:
    close = difflib.get_close_matches(spec, names, n=5, cutoff=0.4)
    if not close:
        close = names[:10]
        hint = f"module names include {close}"
    else:
        hint = f"closest module names: {close}"
    return ValueError(
        f"layers: {spec!r} matches no module of {type(model).__name__}; {hint} "
        "(pass exact names from model.named_modules(), dotted glob patterns where * stays "
        "within one segment and ** spans several, or module classes)"
    )


def resolve_layers(model: nn.Module, layers: Any = None) -> list[str]:
    """Resolve ``layers`` (see module docstring) to a list of layer names of
    ``unwrap_model(model)`` (module names, ``"<name>:input"`` for inputs)."""
    base = unwrap_model(model)
    if layers is None:
        layers = getattr(base, "hidden_layers", None)
        if layers is None:
            chosen = auto_layers(base)
            log.info("layers: %s has no hidden_layers; chosen automatically: %s",
                     type(base).__name__, chosen)
            return chosen
    if isinstance(layers, (str, type)):
        layers = [layers]
    if not isinstance(layers, Iterable):
        raise ValueError(
            f"layers: expected a name, pattern, module class or a list of them, got "
            f"{type(layers).__name__}"
        )
    specs = list(layers)
    if not specs:
        raise ValueError("layers: expected at least one layer, got an empty list")

    named = [(n, m) for n, m in base.named_modules() if n != ""]
    names = [n for n, _ in named]
    name_set = set(names)
    resolved: list[str] = []
    for spec in specs:
        suffix = ""
        if isinstance(spec, type) and issubclass(spec, nn.Module):
            found = [n for n, m in named if isinstance(m, spec)]
            if not found:
                kinds = sorted({type(m).__name__ for _, m in named})
                raise ValueError(
                    f"layers: no submodule of {type(base).__name__} is a {spec.__name__}; "
                    f"module classes present: {kinds}"
                )
        elif isinstance(spec, str):
            glob, type_name, is_input = split_spec(spec)
            suffix = INPUT_SUFFIX if is_input else ""
            if is_glob(glob) or type_name is not None:
                found = match_names(base, glob, type_name) or match_names(
                    base, _strip_prefixes(glob), type_name
                )
            else:
                stripped = _strip_prefixes(glob)
                found = [glob] if glob in name_set else [stripped] if stripped in name_set else []
            if not found:
                raise _no_match(spec, names, base)
        else:
            raise ValueError(
                f"layers: expected module names, glob patterns or nn.Module classes, got "
                f"{spec!r} of type {type(spec).__name__}"
            )
        resolved.extend(n + suffix for n in found if n + suffix not in resolved)
    return resolved


def _select_tensor(output: Any, index: int | str, name: str) -> torch.Tensor:
    """The tensor to keep from a layer output: the output itself when it is a tensor;
    for a tuple/list/dict, the ``index``-th tensor among its elements (dict values in
    order) when ``index`` is an int, or the item ``output[index]`` when it is a str."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(index, str):
        if not isinstance(output, Mapping):
            raise ValueError(
                f"layer {name!r} returned a {type(output).__name__}, but output_index="
                f"{index!r} is a key; use an int index for sequence outputs"
            )
        if index not in output:
            raise ValueError(
                f"layer {name!r} returned a dict without key {index!r}; keys: {list(output)}"
            )
        value = output[index]
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"layer {name!r}: output[{index!r}] is a {type(value).__name__}, not a tensor"
            )
        return value
    if isinstance(output, Mapping):
        items = list(output.values())
    elif isinstance(output, Sequence) and not isinstance(output, (str, bytes)):
        items = list(output)
    else:
        items = []
    tensors = [t for t in items if isinstance(t, torch.Tensor)]
    if not tensors:
        raise ValueError(
            f"layer {name!r} returned a {type(output).__name__} that holds no tensor; "
            "HiddenCapture needs a tensor output (or a tuple/list/dict containing one)"
        )
    if index >= len(tensors) or index < -len(tensors):
        raise ValueError(
            f"layer {name!r} returned {len(tensors)} tensor(s) in a {type(output).__name__}; "
            f"output_index={index} is out of range"
        )
    return tensors[index]


class _CaptureHook:
    """Forward hook object (picklable; deepcopy of a hooked model copies the capture too)."""

    def __init__(self, capture: HiddenCapture, name: str) -> None:
        self.capture = capture
        self.name = name
        self.watch_input = name.endswith(INPUT_SUFFIX)

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if self.watch_input:
            self.capture._store(self.name, inputs, index=0)
        else:
            self.capture._store(self.name, output)


class _PassHook:
    """Hooks on the model itself that delimit one forward pass (to count repeated calls)."""

    def __init__(self, capture: HiddenCapture, start: bool) -> None:
        self.capture = capture
        self.start = start

    def __call__(self, module: nn.Module, *args: Any) -> None:
        self.capture._calls = {} if self.start else None


class HiddenCapture:
    """Record hidden-layer outputs of ``model`` during its forward passes.

    Args:
        model: any ``nn.Module`` (DDP / DataParallel / torch.compile wrappers accepted).
        layers: names, glob patterns, module classes, or None for ``model.hidden_layers``.
        detach: True (monitoring) stores ``out.detach().clone()``; False (losses) stores
            ``out.clone()``, still attached to the autograd graph.
        output_index: for layers returning a tuple/list/dict, which tensor to keep: an int
            counts tensors among the elements (0 = the first tensor), a str is a dict key.

    ``with HiddenCapture(model, layers) as feats`` gives the dict ``{name: tensor}``
    (also ``capture.features``); ``capture[name]`` reads it too.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Any = None,
        *,
        detach: bool = True,
        output_index: int | str = 0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if isinstance(output_index, bool) or not isinstance(output_index, (int, str)):
            raise ValueError(
                f"output_index: expected an int (tensor position) or a str (dict key), got "
                f"{output_index!r}"
            )
        self.model = model
        self.module = unwrap_model(model)
        self.names: list[str] = resolve_layers(model, layers)
        self.detach = bool(detach)
        self.output_index = output_index
        self.features: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []
        self._calls: dict[str, int] | None = None  # calls per layer in the current pass
        self._warned: set[str] = set()
        self.attach()

    # -- hooks ------------------------------------------------------------------------
    @property
    def attached(self) -> bool:
        """Whether the hooks are currently registered."""
        return bool(self._handles)

    def attach(self) -> HiddenCapture:
        """Register the forward hooks (no-op when already registered)."""
        if not self._handles:
            modules = dict(self.module.named_modules())
            self._handles = [
                modules[n.removesuffix(INPUT_SUFFIX)].register_forward_hook(_CaptureHook(self, n))
                for n in self.names
            ]
            self._handles += [
                self.module.register_forward_pre_hook(_PassHook(self, start=True)),
                self.module.register_forward_hook(_PassHook(self, start=False), always_call=True),
            ]
        return self

    def remove(self) -> None:
        """Remove the hooks (idempotent). Captured tensors stay in ``features``."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def clear(self) -> None:
        """Forget the captured tensors (frees their memory and, with detach=False, the graph)."""
        self.features.clear()

    def _store(self, name: str, output: Any, index: int | str | None = None) -> None:
        if self._calls is not None:
            calls = self._calls[name] = self._calls.get(name, 0) + 1
            if calls == 2 and name not in self._warned:
                self._warned.add(name)
                warnings.warn(
                    f"HiddenCapture: layer {name!r} ran more than once in one forward pass of "
                    f"{type(self.module).__name__}; only its last call is kept. Use one module "
                    "per place (e.g. a separate nn.ReLU) to watch each call",
                    RuntimeWarning,
                    stacklevel=2,
                )
        index = self.output_index if index is None else index
        t = _select_tensor(output, index, name)
        self.features[name] = t.detach().clone() if self.detach else t.clone()

    # -- context manager and mapping access --------------------------------------------
    def __enter__(self) -> dict[str, torch.Tensor]:
        self.attach()
        return self.features

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.features[name]

    def __contains__(self, name: object) -> bool:
        return name in self.features

    def __len__(self) -> int:
        return len(self.features)

    def __repr__(self) -> str:
        state = "attached" if self.attached else "removed"
        return (
            f"HiddenCapture({type(self.module).__name__}, names={self.names}, "
            f"detach={self.detach}, {state})"
        )
