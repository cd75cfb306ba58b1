"""``lsm-report``: synchronicity, sweep tables and plots from local run folders (no network).

    lsm-report <run or sweep folder> [--out DIR] [--threshold ACC] [--wandb]

:mod:`~lsm_train.report.runs` finds and reads run folders, :mod:`~lsm_train.report.groups`
groups them into settings by their config, :mod:`~lsm_train.report.tables` and
:mod:`~lsm_train.report.plots` compute the output, :mod:`~lsm_train.report.build` writes it
and :mod:`~lsm_train.report.cli` is the command line. The statistics are in
:mod:`lsm_train.stats`, the file format in :mod:`lsm_train.runlog`. See ``docs/report.md``.
"""

from lsm_train.report.build import Report, build_report, log_to_wandb
from lsm_train.report.cli import main
from lsm_train.report.groups import Group, group_runs, is_seed_override
from lsm_train.report.runs import MAX_DEPTH, ReportError, Run, find_run_folders, load_runs
from lsm_train.report.tables import Table, layer_table, summary_table, sync_table

__all__ = [
    "ReportError", "Run", "Group", "Table", "Report", "MAX_DEPTH",
    "find_run_folders", "load_runs", "group_runs", "is_seed_override",
    "summary_table", "layer_table", "sync_table", "build_report", "log_to_wandb", "main",
]
