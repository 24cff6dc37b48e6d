"""The shipped recipes (the YAML files in this folder) and how any recipe file is read.

A recipe may start from another: `base: gpt-shakespeare` (a shipped name, or a YAML path, which
in a file of your own is relative to that file), then only the keys that differ. A base chain that
loops is an error.

Data paths (data.path, data.dir): a relative path in a shipped recipe resolves against the data
root, $NNLAB_DATA_ROOT, else the `shared/data` folder beside the clone (<repo>/../shared/data,
found from this package's location), never against the current directory. A relative path in a
file of your own (the recipe or a --config file) or a --set resolves against the current
directory. Either way the config holds, and config.yaml records, the absolute path.

curves/RECIPE.json holds a shipped recipe's reference curves (written by benchmarks/curves.py:
loss and metrics against step and seconds, mean and spread over seeds), so a report can hold a
run against them.
"""

from __future__ import annotations

import difflib
import json
import os
from importlib import resources
from pathlib import Path

import yaml

from nnlab.errors import ConfigError

PATH_KEYS = ("dir", "path")  # the data section's keys that hold a file or folder
CURVES = Path(__file__).parent / "curves"


def recipe_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(__name__).iterdir() if p.name.endswith(".yaml"))


def is_shipped(recipe: str) -> bool:
    """A shipped recipe's name, as opposed to a YAML file's path."""
    return not recipe.endswith((".yaml", ".yml")) and "/" not in recipe


def read_yaml(path: str | Path) -> dict:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config: {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config: {path}: cannot read ({e.__class__.__name__})") from None
    return _mapping(text, path)


def _mapping(text: str, where) -> dict:
    try:
        d = yaml.safe_load(text)
    except yaml.YAMLError as e:  # problem and problem_mark say what is wrong and where
        mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None) or str(e)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config: {where}: not valid YAML{at}: {problem.splitlines()[0]}") from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ConfigError(f"config: {where}: expected a mapping of sections, got {type(d).__name__}")
    return d


def data_root() -> Path:
    """Where relative data paths of shipped recipes point (see the module docstring)."""
    env = os.environ.get("NNLAB_DATA_ROOT")
    return Path(env).expanduser().absolute() if env else Path(__file__).resolve().parents[4] / "shared" / "data"


def resolve_data_path(path: str, base: str | Path | None = None) -> str:
    """`path` made absolute: against `base`, by default the data root."""
    return os.path.normpath(os.path.join(base if base is not None else data_root(), os.path.expanduser(path)))


def with_paths_resolved(layer: dict, base: str | Path) -> dict:
    """A config layer whose relative data paths are resolved against `base`."""
    data = layer.get("data")
    if not isinstance(data, dict):
        return layer
    return {**layer, "data": {k: resolve_data_path(v, base) if k in PATH_KEYS and isinstance(v, str) else v
                              for k, v in data.items()}}


def recipe_layers(recipe: str, *, as_file: bool = False, _chain: tuple = ()) -> list[dict]:
    """A recipe (a shipped name, or a YAML path; always a path with as_file) and its base chain as
    config layers, the root base first, each without `base` and with its data paths resolved: a
    shipped recipe's against the data root, a file's against the current directory."""
    shipped = is_shipped(recipe) and not as_file
    ident = recipe if shipped else os.path.abspath(recipe)
    if ident in _chain:
        raise ConfigError(f"base: the recipes' base chain loops: {' -> '.join((*_chain, ident))}")
    if shipped:
        if recipe not in recipe_names():
            near = difflib.get_close_matches(recipe, recipe_names(), n=1)
            hint = f"; did you mean {near[0]}?" if near else "; see `nnlab recipes`"
            raise ConfigError(f"recipe: unknown recipe {recipe!r}{hint}")
        text = resources.files(__name__).joinpath(f"{recipe}.yaml").read_text("utf-8")
        layer, paths_base = _mapping(text, f"{recipe}.yaml"), data_root()
    else:
        layer, paths_base = read_yaml(recipe), os.getcwd()
    base = layer.pop("base", None)
    layer = with_paths_resolved(layer, paths_base)
    if base is None:
        return [layer]
    if not isinstance(base, str):
        raise ConfigError(f"base: expected a recipe name or YAML path, got {base!r}")
    if not shipped and not is_shipped(base):
        base = os.path.join(os.path.dirname(recipe), base)  # a file's base file is found beside it
    return [*recipe_layers(base, _chain=(*_chain, ident)), layer]


def reference_curve(recipe: str) -> dict | None:
    """The reference curves of a shipped recipe (curves/RECIPE.json), or None when it has none."""
    path = CURVES / f"{recipe}.json"
    if not (is_shipped(recipe) and path.is_file()):
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: unreadable reference curve ({e})") from None
