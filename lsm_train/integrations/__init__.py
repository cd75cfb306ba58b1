"""Integrations with training frameworks (optional extras); see docs/integrations.md.

* :mod:`lsm_train.integrations.lightning`: ``SeparabilityMonitor`` (a Lightning
  ``Callback``) and notes on ``SeparabilityGuard`` / ``LSMLoss`` under ``lightning.Trainer``
  (``pip install 'lsm_train[lightning]'``).
"""
