"""Which layers to watch: the layer-pattern dialect and the automatic choice.

One dialect everywhere (``HiddenCapture``, ``LSMLoss``, ``SeparabilityGuard``, the app's
``lsm.layers`` and the external models' ``hidden_layers=``), see
[docs/integrations.md](../docs/integrations.md):

* ``"features.3"``: a module name as in ``model.named_modules()``;
* a dotted glob: ``*``, ``?`` and ``[...]`` match within one dotted segment
  (``"layer*.relu"``, ``"blocks.*"`` = the direct children of ``blocks``), ``**`` matches
  any number of segments, none included (``"blocks.**"`` = ``blocks`` and everything in it);
* ``GLOB:ClassName`` keeps the modules whose class is named ``ClassName``
  (``"features.*:ReLU"``);
* ``NAME:input`` (or ``GLOB[:ClassName]:input``) watches the module's *input* (its first
  positional tensor argument) instead of its output; the layer is named ``"<name>:input"``.

:func:`auto_layers` is the rule used when no layers are given and the model has no
``hidden_layers``: the outputs of the model's repeated blocks and the input of its final
classifier (the docs page spells the rule out).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator

from torch import nn

__all__ = ["INPUT_SUFFIX", "split_spec", "glob_match", "match_names", "auto_layers"]

INPUT_SUFFIX = ":input"
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_GLOB_CHARS = "*?["


def split_spec(spec: str) -> tuple[str, str | None, bool]:
    """``"a.*:ReLU:input"`` -> ``("a.*", "ReLU", True)``: glob, class name, input flag."""
    is_input = spec.endswith(INPUT_SUFFIX)
    if is_input:
        spec = spec[: -len(INPUT_SUFFIX)]
    glob, _, type_name = spec.partition(":")
    return glob, (type_name or None), is_input


def is_glob(pattern: str) -> bool:
    return any(c in pattern for c in _GLOB_CHARS)


def _segments_match(parts: list[str], pats: list[str]) -> bool:
    if not pats:
        return not parts
    if pats[0] == "**":
        return any(_segments_match(parts[i:], pats[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pats[0]) and _segments_match(
        parts[1:], pats[1:]
    )


def glob_match(name: str, pattern: str) -> bool:
    """Whether module ``name`` matches the dotted glob ``pattern`` (see the module doc)."""
    return _segments_match(name.split("."), pattern.split("."))


def match_names(model: nn.Module, glob: str, type_name: str | None = None) -> list[str]:
    """Names of ``model``'s submodules matching ``glob`` (and class ``type_name``), in
    ``named_modules()`` order."""
    return [
        n for n, m in model.named_modules()
        if n and glob_match(n, glob) and (type_name is None or type(m).__name__ == type_name)
    ]


# ------------------------------------------------------------------- automatic choice


def _has_children(module: nn.Module) -> bool:
    return next(module.children(), None) is not None


def _has_params(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _is_container(module: nn.Module) -> bool:
    return type(module) in _CONTAINERS


def _walk(model: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Module]]:
    """``(name, module, parent)`` for every submodule, in ``named_modules()`` order."""
    parents = {}
    for name, module in model.named_modules():
        for child_name, _child in module.named_children():
            parents.setdefault(f"{name}.{child_name}" if name else child_name, module)
    for name, module in model.named_modules():
        if name:
            yield name, module, parents[name]


def _blocks(model: nn.Module) -> list[str]:
    """Rule 1: the most frequent class of blocks (see :func:`auto_layers`), outermost."""
    by_class: dict[type, list[str]] = {}
    params: dict[type, int] = {}
    for name, module, parent in _walk(model):
        if not _has_children(module):
            continue
        in_container = _is_container(parent)
        if not in_container and not (parent is model and not _is_container(module)):
            continue
        if in_container and _is_container(module) and any(
            _has_children(c) for c in module.children()
        ):
            continue  # a container of blocks (a stage), not a block
        by_class.setdefault(type(module), []).append(name)
        params[type(module)] = params.get(type(module), 0) + sum(
            p.numel() for p in module.parameters()
        )
    if not by_class:
        return []
    best = max(by_class, key=lambda c: (len(by_class[c]), params[c]))  # first max wins
    chosen: list[str] = []
    for name in by_class[best]:
        if not any(name.startswith(c + ".") for c in chosen):
            chosen.append(name)
    return chosen


def _stages(container: nn.Module, prefix: str) -> list[str]:
    """Rule 2: in a flat container, every child with parameters starts a stage that runs
    through the parameter-free children after it; a stage's output is its last child that
    is not a Dropout (the first child of a stage when all the rest are Dropout)."""
    outputs: list[str] = []
    stage: list[tuple[str, nn.Module]] = []

    def close() -> None:
        kept = [n for n, m in stage if not isinstance(m, nn.modules.dropout._DropoutNd)]
        if stage:
            outputs.append(kept[-1] if kept else stage[0][0])

    for child_name, child in container.named_children():
        if _is_container(child):
            continue
        if _has_params(child):
            close()
            stage = [(f"{prefix}{child_name}", child)]
        elif stage:
            stage.append((f"{prefix}{child_name}", child))
    close()
    return outputs


def _flat_stages(model: nn.Module) -> list[str]:
    found: list[str] = []
    if _is_container(model) or any(not _has_children(c) for c in model.children()):
        found += _stages(model, "")
    for name, child in model.named_children():
        if _is_container(child):
            found += _stages(child, f"{name}.")
    return found


def _classifier(model: nn.Module, blocks: list[str]) -> str | None:
    """The last ``nn.Linear`` (registration order) outside the chosen blocks."""
    last = None
    for name, module in model.named_modules():
        inside = any(name == b or name.startswith(b + ".") for b in blocks)
        if name and isinstance(module, nn.Linear) and not inside:
            last = name
    return last


def _feeds_directly(model: nn.Module, head: str, chosen: list[str]) -> bool:
    """Whether ``head``'s input is a chosen output passed only through parameter-free
    siblings of one ``nn.Sequential`` (then ``head:input`` would repeat that layer)."""
    parent_name, _, own = head.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not isinstance(parent, nn.Sequential):
        return False
    names = [n for n, _ in parent.named_children()]
    for sibling in reversed(names[: names.index(own)]):
        full = f"{parent_name}.{sibling}" if parent_name else sibling
        if full in chosen:
            return True
        if _has_params(parent.get_submodule(sibling)):
            return False
    return False


def auto_layers(model: nn.Module) -> list[str]:
    """The automatic layer choice for a model without ``hidden_layers``.

    1. Blocks: a *block* is a submodule with children whose parent is an
       ``nn.Sequential``/``nn.ModuleList``, or a direct child of the model that is not such
       a container (a container whose children have children is a stage, not a block).
       The blocks of the most frequent class are chosen (ties: the class with more
       parameters, then the one met first), outermost only.
    2. Flat models (no block at all): the stages of the model itself and of its direct
       ``nn.Sequential``/``nn.ModuleList`` children (see :func:`_stages`).
    3. The final classifier, the last ``nn.Linear`` outside the blocks: a block or stage
       that is or holds it is dropped (its output is the logits), and its input is added
       as ``"<name>:input"`` unless that input is a chosen output passed only through
       parameter-free siblings of one ``nn.Sequential``.

    Raises a ValueError when rules 1-2 leave nothing besides the classifier (e.g. a
    single ``nn.Linear``, or ``Flatten`` + ``Linear``: no hidden layer).
    """
    blocks = _blocks(model)
    chosen = blocks or _flat_stages(model)
    head = _classifier(model, blocks)
    if head is not None:
        chosen = [n for n in chosen if not (head == n or head.startswith(n + "."))]
    if not chosen:
        raise ValueError(
            f"layers: no hidden layer could be chosen automatically for "
            f"{type(model).__name__} (no repeated blocks, no stacked layers); pass layers= "
            "module names, glob patterns such as 'blocks.*', or module classes"
        )
    if head is not None and not _feeds_directly(model, head, chosen):
        chosen.append(head + INPUT_SUFFIX)
    return chosen
