"""Typed, strict configs: frozen dataclasses loaded from YAML; unknown keys and wrong types name the file."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A YAML config does not fit its dataclass; the message names the file and the key."""


def load_yaml(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config {path} not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value at the top level")
    return data


def from_dict(cls: type[T], data: dict, source: str, **overrides: Any) -> T:
    """Build the dataclass ``cls`` from ``data`` (plus ``overrides``), checking keys and types strictly."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; valid keys: {sorted(fields)}")
    values = {**data, **overrides}
    for key, value in data.items():
        if not _fits(value, hints[key]):
            raise ConfigError(f"{source}: {key} = {value!r} should be {_type_name(hints[key])}")
    required = [n for n, f in fields.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [n for n in required if values.get(n) is None]
    if missing:
        raise ConfigError(f"{source}: missing required key(s) {missing}")
    return cls(**values)


def load_config(cls: type[T], path: str | Path, **overrides: Any) -> T:
    """Load ``cls`` from a YAML file; ``overrides`` (e.g. CLI options) win over the file."""
    return from_dict(cls, load_yaml(path), str(path), **overrides)


def _fits(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    target = origin or hint
    return isinstance(value, target)


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
