"""SeparabilityGuard: an optimizer wrapper that keeps a step only if the probe score did
not fall significantly (docs/guard.md).

* :mod:`~lsm_train.guard.rule`: the acceptance rule, pure functions on scores;
* :mod:`~lsm_train.guard.snapshot`: the bit-exact snapshot of parameters and inner state;
* :mod:`lsm_train.probe`: the probe scorer (checked probe, clean eval forward, scores);
* :mod:`~lsm_train.guard.optimizer`: the ``torch.optim.Optimizer`` wrapper;
* :mod:`~lsm_train.guard.persist`: state dicts and pickling.
"""

from lsm_train.guard.optimizer import SeparabilityGuard
from lsm_train.guard.rule import GuardDecision, false_rejection_level

__all__ = ["SeparabilityGuard", "GuardDecision", "false_rejection_level"]
