"""External models: ``create_model("torchvision:<name>")`` and ``create_model("timm:<name>")``.

The model is built untrained (``pretrained=True`` asks for the library's default weights)
with ``num_classes`` outputs; for torchvision a first convolution with 3 input channels is
replaced when ``in_channels`` differs (timm handles ``in_chans`` itself). A dry forward
pass at ``image_size`` checks that the architecture accepts that size (fixed-stride
ImageNet models can be too deep for 8x8 inputs) and raises a ValueError if not.

Hidden layers are chosen by pattern: ``hidden_layers=[...]`` in the one layer dialect of
:mod:`lsm_train.selection` (``*`` stays within one dotted segment, ``**`` spans any number
of them, ``:ClassName`` filters by class, ``:input`` watches a module's input), in module
order. Without it, timm models use their ``feature_info``, torchvision models a default per
known family (``DEFAULT_PATTERNS``), and any other model the automatic choice of
:func:`lsm_train.selection.auto_layers` (docs/integrations.md).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from lsm_train.selection import INPUT_SUFFIX, auto_layers, match_names, split_spec

__all__ = ["DEFAULT_PATTERNS", "match_modules", "default_hidden_layers", "adapt_model",
           "create_external", "EXTRA"]

EXTRA = "pip install lsm_train[vision]"

# torchvision family prefix -> patterns (module outputs after the block nonlinearity).
DEFAULT_PATTERNS: dict[str, list[str]] = {
    "resnet": ["layer*.*"],
    "resnext": ["layer*.*"],
    "wide_resnet": ["layer*.*"],
    "vgg": ["features.*:ReLU", "classifier.*:ReLU"],
    "alexnet": ["features.*:ReLU", "classifier.*:ReLU"],
    "googlenet": ["inception*"],
    "inception": ["Mixed_*"],
    "vit": ["encoder.layers.*"],
    "swin": ["features.*"],
    "convnext": ["features.*"],
    "densenet": ["features.denseblock*", "features.transition*"],
    "mobilenet": ["features.*"],
    "efficientnet": ["features.*"],
    "regnet": ["trunk_output.*"],
}


def match_modules(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Layer names of ``model`` matching any pattern, in ``named_modules()`` order.

    A pattern is a dotted glob (``layer*.*``, ``blocks.**``), optionally followed by
    ``:TypeName`` to keep only modules of that class (``features.*:ReLU``) and/or
    ``:input`` to watch the modules' inputs. A pattern that matches nothing raises a
    ValueError.
    """
    if isinstance(patterns, str) or not isinstance(patterns, Sequence) or not patterns:
        raise ValueError(f"hidden_layers: expected a non-empty list of glob patterns, "
                         f"got {patterns!r}")
    hits: set[str] = set()
    for pat in patterns:
        if not isinstance(pat, str) or not pat:
            raise ValueError(f"hidden_layers: expected glob pattern strings, got {pat!r}")
        glob, type_name, is_input = split_spec(pat)
        found = match_names(model, glob, type_name)
        if not found:
            top = [n for n, _ in model.named_children()]
            raise ValueError(
                f"hidden_layers pattern {pat!r} matches no module; top-level modules: {top}"
            )
        hits.update(n + INPUT_SUFFIX if is_input else n for n in found)
    order = [n for n, _ in model.named_modules() if n]
    return [x for n in order for x in (n, n + INPUT_SUFFIX) if x in hits]


def default_hidden_layers(source: str, name: str, model: nn.Module) -> list[str]:
    """Default hidden layers of an external model (see the module docstring)."""
    info = getattr(model, "feature_info", None)
    if source == "timm" and info is not None:
        try:
            names = [f["module"] for f in info]
        except (TypeError, KeyError):
            names = []
        modules = dict(model.named_modules())
        names = [n for n in names if n in modules]
        if names:
            return names
    for prefix in sorted(DEFAULT_PATTERNS, key=len, reverse=True):
        if name.startswith(prefix):
            return match_modules(model, DEFAULT_PATTERNS[prefix])
    return auto_layers(model)


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            if mod.in_channels == in_channels:
                return
            new = nn.Conv2d(in_channels, mod.out_channels, mod.kernel_size, mod.stride,
                            mod.padding, mod.dilation, mod.groups, mod.bias is not None,
                            mod.padding_mode)
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            setattr(parent, name.rpartition(".")[2], new)
            return
    raise ValueError(f"in_channels={in_channels}: the model has no Conv2d to adapt")


def adapt_model(
    model: nn.Module, *, what: str, in_channels: int, image_size: tuple[int, int],
    hidden_layers: list[str], replace_first_conv: bool = True,
) -> nn.Module:
    """Adapt the input channels, check a dry forward at ``image_size``, set ``hidden_layers``."""
    if replace_first_conv:
        _replace_first_conv(model, in_channels)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            p = next(model.parameters(), None)
            x = torch.zeros(1, in_channels, *image_size,
                            device=p.device if p is not None else None)
            model(x)
    except Exception as err:  # noqa: BLE001 - report any architecture/size mismatch
        raise ValueError(
            f"{what} does not accept inputs of shape ({in_channels}, {image_size[0]}, "
            f"{image_size[1]}): {type(err).__name__}: {err}"
        ) from err
    finally:
        model.train(was_training)
    model.hidden_layers = list(hidden_layers)
    return model


def _import(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"{module} is not installed; external models '{module}:<name>' need it: {EXTRA}"
            + (" (or pip install timm)" if module == "timm" else "")
        ) from err


def create_external(
    source: str, name: str, *, num_classes: int, in_channels: int,
    image_size: tuple[int, int], hidden_layers: Sequence[str] | None = None,
    pretrained: bool = False, **kwargs: Any,
) -> nn.Module:
    """Build ``source:name`` (``source`` is ``"torchvision"`` or ``"timm"``)."""
    what = f"{source}:{name}"
    if source == "torchvision":
        models = _import("torchvision").models
        available = models.list_models()
        if name not in available:
            raise ValueError(f"unknown torchvision model {name!r}; available: "
                             f"{', '.join(available)}")
        if name in ("googlenet", "inception_v3"):
            kwargs.setdefault("aux_logits", False)  # plain logits in training mode too
        if pretrained:
            kwargs["weights"] = "DEFAULT"
        try:
            model = models.get_model(name, num_classes=num_classes, **kwargs)
        except TypeError as err:
            raise ValueError(f"invalid option for {what}: {err}") from err
        replace = True
    elif source == "timm":
        timm = _import("timm")
        kw = dict(num_classes=num_classes, in_chans=in_channels, pretrained=pretrained, **kwargs)
        try:
            try:
                model = timm.create_model(name, img_size=image_size, **kw)
            except TypeError:  # architectures without an img_size argument
                model = timm.create_model(name, **kw)
        except RuntimeError as err:  # timm: "Unknown model (...)"
            raise ValueError(f"unknown timm model {name!r} ({err}); see timm.list_models()") \
                from err
        except TypeError as err:
            raise ValueError(f"invalid option for {what}: {err}") from err
        replace = False
    else:
        raise ValueError(f"unknown model source {source!r}; expected 'torchvision' or 'timm'")
    names = (match_modules(model, hidden_layers) if hidden_layers is not None
             else default_hidden_layers(source, name, model))
    return adapt_model(model, what=what, in_channels=in_channels, image_size=image_size,
                       hidden_layers=names, replace_first_conv=replace)

