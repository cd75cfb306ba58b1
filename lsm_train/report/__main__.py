"""``python -m lsm_train.report`` = ``lsm-report``."""

from lsm_train.report.cli import main

raise SystemExit(main())
