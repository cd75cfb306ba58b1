"""Where ``lsm-train`` finds its config groups and recipes (user guide: docs/app.md#recipes).

* :func:`conf_dir`: the Hydra config groups (``conf/``); :func:`recipes_dir`: the recipes
  (``recipes/``). Both sit at the top of a source checkout and inside the package in an
  installed wheel (``lsm_train/conf``, ``lsm_train/recipes``: package data).
* :class:`RecipeConfigSource`: a Hydra config source (the public plugin type
  ``hydra.plugins.config_source.ConfigSource``, registered through
  ``hydra.core.plugins.Plugins``) that shows a folder of recipes as the config group
  ``recipe``: search-path entry ``lsmrecipes://builtin`` is :func:`recipes_dir`,
  ``lsmrecipes:///abs/folder`` any folder, and ``recipe=zoo/digits`` selects
  ``<folder>/zoo/digits.yaml``. A plain search-path entry cannot do this: Hydra names a
  group after its folder, and the folder is ``recipes/``.
* :func:`list_recipes`: every ``recipe=`` value; :func:`recipes_table`: each with the first
  sentence of its header comment (``lsm-train --recipes``, and the ``lsm_recipes``
  resolver that ``lsm-train --help`` prints).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from hydra.core.object_type import ObjectType
from hydra.core.plugins import Plugins
from hydra.plugins.config_source import ConfigLoadError, ConfigResult, ConfigSource
from omegaconf import OmegaConf

__all__ = ["conf_dir", "recipes_dir", "list_recipes", "recipe_summary", "recipes_table",
           "RecipeConfigSource", "register_sources", "tuning_conflicts"]

_PKG = Path(__file__).resolve().parent


def _find_dir(name: str) -> Path:
    """``lsm_train/<name>`` in an installed wheel, ``<checkout>/<name>`` in a source tree."""
    candidates = [_PKG / name, _PKG.parent / name]
    for cand in candidates:
        if cand.is_dir():
            return cand
    raise FileNotFoundError(
        f"lsm_train: the '{name}' folder was not found (looked in "
        f"{', '.join(str(c) for c in candidates)}); reinstall the package"
    )


def conf_dir() -> Path:
    """The folder of Hydra config groups (``conf/``)."""
    return _find_dir("conf")


def recipes_dir() -> Path:
    """The folder of recipes (``recipes/``)."""
    return _find_dir("recipes")


def list_recipes() -> list[str]:
    """Every recipe name (``recipe=`` values), e.g. ``["quickstart", "zoo/digits", ...]``."""
    root = recipes_dir()
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))


def recipe_summary(name: str) -> str:
    """The first sentence of recipe ``name``'s header comment ("" when it has none)."""
    words: list[str] = []
    for line in (recipes_dir() / f"{name}.yaml").read_text(encoding="utf-8").splitlines():
        if not line.startswith("#") or line.startswith("#  "):  # end, or a command example
            break
        if not line.startswith("# @"):
            words.extend(line.lstrip("#").split())
    text = " ".join(words)
    for end in (". ", "? "):
        text = text.split(end, 1)[0]
    text = text.rstrip(".:")
    return text if len(text) <= 100 else text[:97].rstrip() + "..."


def recipes_table() -> str:
    """One line per recipe: its name and :func:`recipe_summary`."""
    names = list_recipes()
    width = max(len(n) for n in names)
    return "\n".join(f"  {n:<{width}}  {recipe_summary(n)}".rstrip() for n in names)


class RecipeConfigSource(ConfigSource):
    """A folder of recipes as the config group ``recipe`` (``recipe/<path>`` is
    ``<folder>/<path>.yaml``); the folder is ``lsmrecipes://<folder>`` or
    ``lsmrecipes://builtin`` (:func:`recipes_dir`)."""

    GROUP = "recipe"

    def __init__(self, provider: str, path: str) -> None:
        super().__init__(provider=provider, path=path)
        self.root = recipes_dir() if self.path in ("", "builtin") else Path(self.path)

    @staticmethod
    def scheme() -> str:
        return "lsmrecipes"

    def _inner(self, config_path: str) -> str | None:
        """``recipe/zoo/x`` -> ``zoo/x``, ``recipe`` -> ``""``, anything else -> None."""
        p = config_path.strip("/")
        if p == self.GROUP:
            return ""
        if p.startswith(self.GROUP + "/"):
            return p[len(self.GROUP) + 1 :]
        return None

    def _file(self, config_path: str) -> Path | None:
        inner = self._inner(config_path)
        return self.root / self._normalize_file_name(inner) if inner else None

    def available(self) -> bool:
        return self.root.is_dir()

    def load_config(self, config_path: str) -> ConfigResult:
        path = self._file(config_path)
        if path is None or not path.is_file():
            raise ConfigLoadError(f"Config not found : {config_path}")
        text = path.read_text(encoding="utf-8")
        return ConfigResult(
            config=OmegaConf.create(text) if text.strip() else OmegaConf.create(),
            path=f"{self.scheme()}://{self.root}",
            provider=self.provider,
            header=ConfigSource._get_header_dict(text[:512]),
        )

    def is_group(self, config_path: str) -> bool:
        if config_path.strip("/") == "":
            return True
        inner = self._inner(config_path)
        return inner is not None and (self.root / inner).is_dir()

    def is_config(self, config_path: str) -> bool:
        path = self._file(config_path)
        return path is not None and path.is_file()

    def list(self, config_path: str, results_filter: ObjectType | None) -> list[str]:
        if config_path.strip("/") == "":
            return [self.GROUP] if results_filter in (None, ObjectType.GROUP) else []
        inner = self._inner(config_path)
        if inner is None or not (self.root / inner).is_dir():
            return []
        files: list[str] = []
        for entry in (self.root / inner).iterdir():
            self._list_add_result(
                files=files,
                file_path=f"{config_path.rstrip('/')}/{entry.name}",
                file_name=entry.name,
                results_filter=results_filter,
            )
        return sorted(set(files))


def tuning_conflicts(choices: Mapping[str, Any], overrides: Iterable[str]) -> list[str]:
    """The config groups chosen on the command line (``optim=adam``) whose ``_target_``
    the applied family file ``conf/tuning/<recipe>/<model>.yaml`` replaces; one message
    each (the family file is applied after the group, so the choice would be lost)."""
    tuning = choices.get("tuning@_global_")
    path = conf_dir() / "tuning" / f"{tuning}.yaml"
    if not tuning or not path.is_file():
        return []
    sections = OmegaConf.to_container(OmegaConf.load(path))
    chosen = {o.lstrip("+~").partition("=")[0] for o in overrides if "=" in o}
    return [
        f"{group}={choices.get(group)} is replaced by {path.relative_to(conf_dir().parent)}, "
        f"which sets {group}._target_={section['_target_']} for this family; override its "
        f"values instead ({group}.lr=...), or start from another recipe"
        for group, section in (sections or {}).items()
        if isinstance(section, dict) and "_target_" in section and group in chosen
    ]


def register_sources() -> None:
    """Make the ``lsmrecipes://`` scheme and the ``${lsm_recipes:}`` resolver (the recipes
    table, for the help text) known to Hydra and OmegaConf (idempotent)."""
    Plugins.instance().register(RecipeConfigSource)
    if not OmegaConf.has_resolver("lsm_recipes"):
        OmegaConf.register_new_resolver("lsm_recipes", recipes_table)
