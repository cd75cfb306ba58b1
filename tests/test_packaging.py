"""Packaging: ``python -m build`` makes an sdist and a wheel (built from the sdist) whose
``lsm-train`` works from the wheel alone, conf/ and recipes/ inside.

Isolation: the source is copied to a temporary folder (the build writes nothing into the
checkout); the wheel is installed ``--no-deps`` into a fresh venv that reaches the
already-installed dependencies through a ``.pth`` line naming this environment's
site-packages (a ``.pth`` line adds a path but does not run the ``.pth`` files inside it, so
the editable install's finder stays inactive and the checkout is not importable); commands
run from an empty folder without ``PYTHONPATH``, and the test checks that ``lsm_train`` and
its conf/ come from the new venv.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP = shutil.ignore_patterns(".venv", ".git", "outputs", "multirun", "wandb", "build", "dist",
                              "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache",
                              ".hypothesis", "results")


def _run(cmd, cwd, env=None, timeout=600):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    pytest.importorskip("build")
    tmp = tmp_path_factory.mktemp("pkg")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=SKIP)
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp / "dist"),
          str(src)], cwd=tmp)
    wheel = next((tmp / "dist").glob("lsm_train-*.whl"))
    sdist = next((tmp / "dist").glob("lsm_train-*.tar.gz"))
    return tmp, wheel, sdist


def test_wheel_and_sdist_hold_the_package_conf_and_recipes(dists):
    _, wheel, sdist = dists
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in ("lsm_train/app.py", "lsm_train/integrations/lightning.py",
                 "lsm_train/conf/config.yaml", "lsm_train/conf/data/mnist5k.yaml",
                 "lsm_train/conf/model/mlp.yaml", "lsm_train/recipes/quickstart.yaml",
                 "lsm_train/recipes/zoo/digits.yaml",
                 "lsm_train/conf/tuning/zoo/digits/vit.yaml"):
        assert path in names, path
    assert not any(n.startswith(("tests/", "conf/", "recipes/")) for n in names)
    members = tarfile.open(sdist).getnames()
    assert any(m.endswith("/conf/config.yaml") for m in members)
    assert any(m.endswith("/recipes/quickstart.yaml") for m in members)


def test_lsm_train_runs_from_the_wheel_alone(dists):
    tmp, wheel, _ = dists
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp)
    py = venv / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                     cwd=tmp).stdout.strip())
    (site / "outer_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps",
          "--no-index", "--quiet", str(wheel)], cwd=tmp)
    work = tmp / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", HYDRA_FULL_ERROR="1")
    where = _run([str(py), "-c", "import lsm_train.app as a; print(a.__file__); "
                  "print(a.conf_dir()); print(a.recipes_dir())"], cwd=work, env=env)
    for line in where.stdout.split():
        assert line.startswith(str(site)) and not line.startswith(str(ROOT)), line
    script = venv / "bin" / "lsm-train"  # the console script of the wheel
    _run([str(script), "debug=smoke", "lsm=monitor", "logger=none", "trainer.progress=false",
          "trainer.plots=false", f"hydra.run.dir={work / 'run'}"], cwd=work, env=env)
    assert (work / "run" / "metrics.jsonl").is_file()


def test_the_package_uses_public_hydra_api_only():
    """Hydra's ``_internal`` modules change without notice between releases."""
    root = Path(__file__).resolve().parent.parent
    users = [p.relative_to(root).as_posix() for p in (root / "lsm_train").rglob("*.py")
             if "hydra._internal" in p.read_text(encoding="utf-8")]
    assert users == []


def test_every_subpackage_is_in_the_explicit_package_list():
    """The package list in pyproject.toml is explicit (conf/ and recipes/ are renamed into the
    package), so a new subpackage must be added there or the wheel lacks it."""
    import tomllib

    root = Path(__file__).resolve().parent.parent
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    found = {".".join(p.parent.relative_to(root).parts)
             for p in (root / "lsm_train").rglob("__init__.py")}
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"
