"""Command-line checks of ``lsm-train`` that must run before Hydra starts (Hydra creates the
run folder and writes ``.hydra/`` before the task runs; user guide: ``docs/runs.md``).

* :func:`check_recipes`: an unknown ``recipe=`` lists the real recipes and exits 2;
* :func:`check_writable`: a run folder that cannot be written is reported, exit 2;
* :func:`resume_args`: ``resume=<folder or file>`` runs in that folder, and a resume
  records its config in ``.hydra/resume-<time>/`` instead of overwriting ``.hydra/``.
"""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["arg_value", "check_recipes", "check_writable", "resume_args"]


def arg_value(argv: list[str], key: str) -> str | None:
    """The last command-line value of ``key`` (``key=``, ``+key=`` or ``++key=``)."""
    found = None
    for a in argv[1:]:
        name, sep, value = a.lstrip("+").partition("=")
        if sep and name == key:
            found = value
    return found


def check_recipes(argv: list[str]) -> None:
    """An unknown ``recipe=`` value: list the real recipes and exit 2 (Hydra would list
    the top folder of recipes/ only)."""
    value = arg_value(argv, "recipe")
    if value is None or "(" in value:  # a sweep function (choice, glob, ...) is Hydra's
        return
    from lsm_train.app import list_recipes

    known = list_recipes()
    unknown = [v.strip() for v in value.split(",") if v.strip() not in known]
    if unknown:
        print(f"lsm-train: error: unknown recipe {', '.join(unknown)}; the recipes are: "
              + ", ".join(known), file=sys.stderr)
        sys.exit(2)


def check_writable(argv: list[str], multirun: bool) -> None:
    """A run folder that cannot be written: say so and exit 2 before Hydra writes there."""
    import tempfile

    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    target = Path(arg_value(argv, key) or ("multirun" if multirun else "outputs"))
    if "${" in str(target):
        target = Path(str(target).split("${", 1)[0] or ".")
    folder = target.absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        print(f"lsm-train: error: the run folder {target} cannot be written ({folder}: "
              f"{err.strerror or err}; a read-only file system or no permission); choose "
              f"another with {key}=<folder>", file=sys.stderr)
        sys.exit(2)


def resume_args(argv: list[str], stamp_format: str) -> None:
    """``resume=<folder or file>`` runs in that folder (``hydra.run.dir``, unless given);
    a resume records its config in ``.hydra/resume-<time>/``, keeping the run's own
    ``.hydra/`` as it was."""
    value = arg_value(argv, "resume")
    if value is None or value in ("false", "False", "null", ""):
        return
    if value not in ("true", "True") and arg_value(argv, "hydra.run.dir") is None:
        path = Path(value).expanduser()
        argv.append(f"hydra.run.dir={path.parent if path.is_file() else path}")
    if arg_value(argv, "hydra.output_subdir") is None:
        argv.append("hydra.output_subdir=.hydra/resume-${now:" + stamp_format + "}")
