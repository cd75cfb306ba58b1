"""The import graph runs one way: library -> app -> report (docs/index.md#layout).

Every ``import`` of a package module (top level or inside a function) is read with ``ast``;
a library module may not import an app or report module, and an app module may not import
the report."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "lsm_train"

APP = {"app", "trainer", "build", "evaluation", "config_check", "train_log", "stopping",
       "batches", "schedules", "recipe_source", "cli_args", "resume", "runlock", "runfolder",
       "run_names", "tracking", "plots", "checkpoint", "__main__"}


def _layer(module: str) -> str:
    parts = module.split(".")
    if parts[:2] == ["lsm_train", "report"]:
        return "report"
    return "app" if len(parts) > 1 and parts[1] in APP else "library"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str) -> set[str]:
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found |= {f"{mod}.{a.name}" for a in node.names}  # from pkg import module
    return {m for m in found if m.startswith("lsm_train")}


def test_no_import_from_a_lower_layer_to_a_higher_one():
    rank = {"library": 0, "app": 1, "report": 2}
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        name = _module_name(path)
        if name == "lsm_train":  # the lazy public table names everything
            continue
        mine = _layer(name)
        for target in _imports(path, name):
            if rank[_layer(target)] > rank[mine]:
                bad.append(f"{name} ({mine}) imports {target} ({_layer(target)})")
    assert not bad, "\n".join(bad)


def test_the_layer_check_sees_function_local_and_relative_imports(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from lsm_train.report.plots import x\nfrom . import trainer\n")
    got = _imports(src, "lsm_train.measures.m")
    assert "lsm_train.report.plots" in got and "lsm_train.measures.trainer" in got
    assert _layer("lsm_train.report.plots") == "report" and _layer("lsm_train.trainer") == "app"
