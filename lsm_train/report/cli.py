"""The ``lsm-report`` command line.

    lsm-report <run or sweep folder> [--out DIR] [--threshold ACC] [--acc-key KEY]
               [--max-depth N] [--wandb] [--no-plots]

Prints the report as markdown, writes it to ``--out`` and exits 0; bad input (a missing
folder, no run folder, a bad threshold) prints one error line and exits 2. Warnings (e.g. a
truncated last line) are printed as ``lsm-report: warning: ...``. See ``docs/report.md``.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from lsm_train.report.build import build_report, log_to_wandb
from lsm_train.report.runs import MAX_DEPTH, ReportError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lsm-report",
        description="Synchronicity, sweep tables and plots from lsm-train run folders "
        "(metrics.jsonl), with no network.",
    )
    p.add_argument("folder", help="a run folder (with metrics.jsonl) or a sweep folder")
    p.add_argument("--out", default=None, help="output folder (default: <folder>/report)")
    p.add_argument("--threshold", type=float, default=0.9,
                   help="training-accuracy threshold for 'steps to threshold' (default 0.9)")
    p.add_argument("--wandb", action="store_true",
                   help="also log tables and plots to wandb (WANDB_MODE, default offline)")
    p.add_argument("--acc-key", default="auto",
                   help="accuracy key for synchronicity: auto (probe/acc when logged, else "
                   "train/acc), train/acc, probe/acc, ... (default auto)")
    p.add_argument("--max-depth", type=int, default=MAX_DEPTH,
                   help="how many folder levels below FOLDER are searched for run folders "
                   f"(default {MAX_DEPTH})")
    p.add_argument("--no-plots", action="store_true", help="tables only")
    return p


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit status (0 ok, 2 bad input)."""
    args = _parser().parse_args(argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            report = build_report(args.folder, args.out, threshold=args.threshold,
                                  plots=not args.no_plots, acc_key=args.acc_key,
                                  max_depth=args.max_depth)
        except ReportError as exc:
            print(f"lsm-report: error: {exc}", file=sys.stderr)
            return 2
        finally:
            _print_warnings(caught)
            caught.clear()
        print(report.markdown())
        if args.wandb:
            log_to_wandb(report)
        _print_warnings(caught)
    print(f"report written to {report.out}", file=sys.stderr)
    return 0


def _print_warnings(caught) -> None:
    for w in caught:
        if issubclass(w.category, UserWarning):
            print(f"lsm-report: warning: {w.message}", file=sys.stderr)
