"""lsm_train: linear separability of hidden layers (MD-LSM) as a training signal.

    import lsm_train as lt
    lt.md_lsm(A, B)                      # degree in [0.5, 1]
    lt.layer_separability(H, y)          # multi-class layer score
    loss = task_loss + reg(labels)       # reg = lt.LSMLoss(model)
    opt = lt.SeparabilityGuard(torch.optim.AdamW(...), model, probe=(x, y))

Names are imported on first use, so ``import lsm_train`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "separability_test": "lsm_train.measures.exact",
    "SeparabilityCertificate": "lsm_train.measures.exact",
    "md_lsm": "lsm_train.measures.degree",
    "md_lsm_margin": "lsm_train.measures.margin",
    "layer_separability": "lsm_train.measures.layer",
    "hard_pair_score": "lsm_train.measures.hard_pairs",
    "soft_md_lsm": "lsm_train.measures.soft",
    "LabelLayout": "lsm_train.measures.soft",
    "HiddenCapture": "lsm_train.capture",
    "auto_layers": "lsm_train.selection",
    "LSMLoss": "lsm_train.loss",
    "lsm_loss": "lsm_train.loss",
    "SeparabilityGuard": "lsm_train.guard",
}
_SUBMODULES = {"models", "measures", "data", "distributed"}

__all__ = sorted(_EXPORTS) + sorted(_SUBMODULES)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        module = importlib.import_module(f"lsm_train.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'lsm_train' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
