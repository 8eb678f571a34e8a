"""Recipes: a pipeline as TOML data (`[[pass]]` tables, a `target`, `[verify]` floors).

`load_recipe` reads a TOML file, a shipped recipe by name (`shipped_recipes()`: the
`.toml` files in `onnxslim_edge/recipes/`, e.g. "lossless", "edge"), TOML text or a
mapping into a `Recipe` (configured passes from the registry, the target name,
fidelity floors from `FLOOR_KEYS`), with one `ConfigError` naming the file and the key
for anything it cannot use.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxslim_edge.base import Pass
from onnxslim_edge.config import coerce
from onnxslim_edge.context import get_target
from onnxslim_edge.errors import ConfigError
from onnxslim_edge.registry import create_pass
from onnxslim_edge.verify import FLOOR_KEYS  # the one list of floors (re-exported)

__all__ = ["FLOOR_KEYS", "Recipe", "load_recipe", "read_toml", "shipped_recipes"]


def shipped_recipes() -> dict[str, Path]:
    """The recipes that come with the package, by name: {"demo": .../demo.toml, ...}."""
    from importlib.resources import files

    folder = Path(str(files("onnxslim_edge") / "recipes"))
    # (`*.space.toml` are sweep search spaces, not recipes)
    return {p.stem: p for p in sorted(folder.glob("*.toml")) if not p.stem.endswith(".space")}


def _recipe_file(source: str | os.PathLike) -> Path:
    """A recipe argument as a file: an existing path, else a shipped recipe's name."""
    path = Path(source)
    if path.is_file():
        return path
    text = str(source)
    shipped = shipped_recipes()
    if text in shipped:
        return shipped[text]
    if os.sep in text or "/" in text or path.suffix:
        raise ConfigError(f"{text}: recipe file not found")
    raise ConfigError(
        f"unknown recipe '{text}'; shipped: {', '.join(shipped)} (or give a .toml file's path)"
    )


@dataclass(frozen=True)
class Recipe:
    passes: tuple[Pass, ...]
    target: str = "tensorrt"
    floors: Mapping[str, float] = field(default_factory=dict)


def read_toml(
    source: str | os.PathLike | Mapping[str, Any],
    origin: str,
    locate: Callable[[str | os.PathLike], Path],
) -> tuple[Mapping[str, Any], str, str]:
    """(document, origin, text) of TOML given as a mapping, a file or TOML text. A path,
    or a one-line string that is not TOML, is a file `locate` finds (raising ConfigError
    when there is none); its path becomes the origin errors name."""
    if isinstance(source, Mapping):
        return source, origin, ""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    text = str(source)
    if isinstance(source, os.PathLike) or (
        not text.lstrip().startswith(("[", "#")) and "\n" not in text and "=" not in text
    ):
        path = locate(source)
        origin = str(path)
        text = path.read_text(encoding="utf-8", errors="replace")
    try:
        return tomllib.loads(text), origin, text
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{origin}: not valid TOML ({' '.join(str(exc).split())})") from exc


def load_recipe(source: str | os.PathLike | Mapping[str, Any]) -> Recipe:
    """A recipe from a TOML file, a shipped recipe's name ("lossless", "edge", "demo":
    see `shipped_recipes`; an existing file of that name wins), TOML text or a mapping.

    target = "tensorrt"
    [[pass]]
    name = "cleanup"
    [[pass]]
    name = "fold-batchnorm"
    [verify]
    min_cosine = 0.999
    """
    doc, origin, _ = read_toml(source, "<recipe>", _recipe_file)
    unknown = sorted(set(doc) - {"pass", "target", "verify"})
    if unknown:
        raise ConfigError(
            f"{origin}: unknown key(s) {', '.join(unknown)}; valid: pass, target, verify"
        )
    entries = doc.get("pass", [])
    if not isinstance(entries, list) or not all(isinstance(e, Mapping) for e in entries):
        raise ConfigError(f"{origin}: 'pass' must be an array of tables ([[pass]])")
    passes = []
    for i, entry in enumerate(entries):
        options = dict(entry)
        name = options.pop("name", None)
        if not isinstance(name, str):
            raise ConfigError(f"{origin}: [[pass]] number {i + 1} has no name")
        passes.append(create_pass(name, **options))
    target = doc.get("target", "tensorrt")
    if not isinstance(target, str):
        raise ConfigError(f'{origin}: target must be a string, e.g. target = "tensorrt"')
    get_target(target)
    verify = doc.get("verify", {})
    if not isinstance(verify, Mapping):
        raise ConfigError(
            f"{origin}: 'verify' must be a table ([verify] with {', '.join(FLOOR_KEYS)})"
        )
    floors = dict(verify)
    bad = sorted(set(floors) - set(FLOOR_KEYS))
    if bad:
        raise ConfigError(
            f"{origin}: unknown [verify] key(s) {', '.join(bad)}; valid: {', '.join(FLOOR_KEYS)}"
        )
    for key, value in floors.items():
        floors[key] = coerce(value, float, f"{origin}: verify.{key}")
        if not math.isfinite(floors[key]):
            raise ConfigError(f"{origin}: verify.{key} must be a finite number, got {value!r}")
    return Recipe(tuple(passes), target=target, floors=floors)
