"""The pass registry: every pass, built-in or third-party, is an entry point.

Passes are found by name in the entry-point group `onnxslim_edge.passes` of the
installed distributions; the built-in ones are listed in this project's
pyproject.toml exactly like a third-party package lists its own, and a module is
imported only when its pass is used. The core (this package outside `passes/`) never
imports `onnxslim_edge.passes`: this registry's `get_pass` is the one place that loads
pass modules. Running from a source checkout needs the package installed (a strict
editable install, `pip install -e . --config-settings editable_mode=strict`) and the
repository root not first on `sys.path` — the source folder `onnxslim_edge/` has no
`passes/` inside (the install maps `passes/` there): use the `onnxslim-edge` command,
or python from outside the root (tests/conftest.py and benchmarks/ move the root
behind the installed package).
"""

from __future__ import annotations

from typing import Any

from onnxslim_edge.base import Pass
from onnxslim_edge.errors import ConfigError, first_line

__all__ = ["ENTRY_POINT_GROUP", "available_passes", "create_pass", "get_pass", "parse_pass_spec"]

ENTRY_POINT_GROUP = "onnxslim_edge.passes"


def _entry_points() -> dict[str, Any]:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available_passes() -> list[str]:
    """Names of every registered pass, built-in or from another installed package."""
    return sorted(_entry_points())


def get_pass(name: str) -> type[Pass]:
    """The pass class registered as `name` (imported now, not before)."""
    eps = _entry_points()
    if name not in eps:
        available = ", ".join(sorted(eps)) or (
            "none: onnxslim-edge is not installed (pip install -e .), so no entry points exist"
        )
        raise ConfigError(f"unknown pass '{name}'; available: {available}")
    try:
        cls = eps[name].load()
    except ImportError as exc:
        raise ConfigError(
            f"pass '{name}' is registered as {eps[name].value} but cannot be imported "
            f"({first_line(exc)}); run the installed package, not a source folder "
            "shadowing it (see onnxslim_edge.registry)"
        ) from exc
    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        raise ConfigError(f"entry point '{name}' does not name a Pass subclass")
    return cls


def create_pass(name: str, **options: Any) -> Pass:
    """Instantiate the pass registered as `name` with keyword options."""
    return get_pass(name)(**options)


def parse_pass_spec(spec: str) -> Pass:
    """`NAME` or `NAME:key=value,key=value` (lists as `a|b|c`) -> a configured Pass."""
    name, _, rest = spec.partition(":")
    options: dict[str, str] = {}
    if rest.strip():
        for item in rest.split(","):
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"--pass {spec}: expected key=value, got '{item}'")
            options[key.strip()] = value.strip()
    return create_pass(name.strip(), **options)
