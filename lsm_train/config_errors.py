"""Config errors name their full key (user guide: ``docs/runs.md``).

The optimizer, :class:`~lsm_train.loss.LSMLoss` and
:class:`~lsm_train.guard.SeparabilityGuard` are built from config sections (``optim``,
``lsm.loss``, ``lsm.guard``) and report a bad argument by its own name (``tau: expected
...``, ``unexpected keyword argument 'foo'``, ``Invalid weight_decay value``).
:func:`keyed_error` rewrites such a message so that it starts with the config key
(``lsm.guard.tau: expected ...``, ``lsm.guard.foo: unknown option ...``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["keyed_error", "build_section"]

T = TypeVar("T")

_PATTERNS = (
    (re.compile(r"unexpected keyword argument '(\w+)'"), "unknown option ({msg})"),
    (re.compile(r"^Invalid (\w+) value"), "{msg}"),
    (re.compile(r"^(\w+): "), "{rest}"),
)


def keyed_error(section: str, err: Exception) -> ValueError:
    """A ValueError whose message starts with ``<section>.<argument>:`` when ``err``
    names one argument, else with ``<section>:``."""
    msg = str(err)
    if msg.startswith(section + "."):
        return ValueError(msg)
    for pattern, template in _PATTERNS:
        m = pattern.search(msg)
        if m:
            rest = msg[m.end():]
            return ValueError(f"{section}.{m.group(1)}: " + template.format(msg=msg, rest=rest))
    return ValueError(f"{section}: {msg}")


def build_section(section: str, build: Callable[..., T], *args: Any) -> T:
    """``build(*args)`` with a ValueError or TypeError rewritten by :func:`keyed_error`."""
    try:
        return build(*args)
    except (ValueError, TypeError) as err:
        raise keyed_error(section, err) from err
