"""Pass configuration: frozen keyword-only dataclasses built from Python values or strings.

`make_config` turns a mapping of options (keyword arguments, `NAME:key=value` CLI
strings, a recipe's `[[pass]]` table) into a pass's `Config` dataclass, coercing
strings to the annotated field types (`coerce`) and naming the option in every
`ConfigError`; `config_dict` reads a config back as a dict for reports.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from onnxslim_edge.errors import ConfigError

__all__ = ["NoConfig", "coerce", "config_dict", "make_config"]


@dataclass(frozen=True)
class NoConfig:
    """A pass without options."""


def coerce(value: Any, hint: Any, where: str) -> Any:
    """Convert `value` (often a string from the CLI) to the type `hint`, or raise ConfigError."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if (
            value is None
            or (isinstance(value, str) and value.lower() == "none" and type(None) in args)
        ) and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is Literal:
        for choice in args:
            if value == choice or (isinstance(value, str) and str(choice) == value):
                return choice
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
    if origin in (tuple, list, Sequence, typing.Sequence):
        items = value.split("|") if isinstance(value, str) else value
        if isinstance(items, str) or not isinstance(items, Iterable):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item_hint = args[0] if args else Any
        return tuple(coerce(v, item_hint, where) for v in items)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def make_config(config_cls: type, options: Mapping[str, Any], *, where: str) -> Any:
    """Build a frozen config dataclass from a mapping, coercing strings to field types.

    Unknown keys raise ConfigError listing the valid ones; field validation in the
    dataclass's `__post_init__` may raise ConfigError too.
    """
    fields = {f.name: f for f in dataclasses.fields(config_cls) if f.init}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        valid = ", ".join(sorted(fields)) or "(none)"
        raise ConfigError(f"{where}: unknown option(s) {', '.join(unknown)}; valid: {valid}")
    hints = typing.get_type_hints(config_cls)
    values = {k: coerce(v, hints.get(k, Any), f"{where}.{k}") for k, v in options.items()}
    try:
        return config_cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def config_dict(config: Any) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
