"""Command-line flags for the trainer: every TrainConfig key is a flag (`--key value`, `--key=value`;
booleans also as `--key` / `--no-key`), applied on top of an optional YAML recipe."""

from __future__ import annotations

import typing
from typing import Any

from ..errors import ConfigError
from .config import TrainConfig, config_from_dict, field_default, field_types, parse_flag_value, read_recipe


def _is_bool(annotation: Any) -> bool:
    return annotation is bool


def parse_flags(args: list[str]) -> dict[str, Any]:
    """Flags -> {key: value}; an unknown flag is a ConfigError naming it."""
    types_ = field_types()
    values: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; options are --key value (see --help)")
        name, eq, text = arg[2:].partition("=")
        key = name.replace("-", "_")
        negated = key.startswith("no_") and key[3:] in types_ and _is_bool(types_[key[3:]])
        if negated:
            if eq:
                raise ConfigError(f"{arg}: --no-{name[3:]} takes no value")
            values[key[3:]] = False
            i += 1
            continue
        if key not in types_:
            raise ConfigError(
                f"unknown option --{name} (no training key {key!r}); see `pybitnet train --help`"
            )
        if not eq:
            if _is_bool(types_[key]) and (i + 1 == len(args) or args[i + 1].startswith("--")):
                values[key] = True
                i += 1
                continue
            if i + 1 == len(args):
                raise ConfigError(f"option --{name} needs a value")
            text = args[i + 1]
            i += 1
        values[key] = _flag_value(key, text, types_[key])
        i += 1
    return values


def _flag_value(key: str, text: str, annotation: Any) -> Any:
    optional_str = typing.get_origin(annotation) is not list and [
        a for a in typing.get_args(annotation) if a is not type(None)
    ] == [str]
    if annotation is str or optional_str:
        return None if optional_str and text.lower() in ("null", "none") else text
    return parse_flag_value(key, text)


def build_config(recipe: str | None, flags: list[str]) -> TrainConfig:
    """The recipe's keys (if any) overridden by flags, validated."""
    values = read_recipe(recipe) if recipe else {}
    source = f"recipe {recipe}" if recipe else "flags"
    types_ = field_types()
    unknown = [k for k in values if k not in types_]
    if unknown:
        raise ConfigError(f"unknown key{'s' if len(unknown) > 1 else ''} in {source}: {', '.join(unknown)}")
    values.update(parse_flags(flags))
    return config_from_dict(values, source)


def keys_help() -> str:
    """One line per key with its default, for --help."""
    lines = []
    for key in field_types():
        lines.append(f"--{key.replace('_', '-')} (default {field_default(key)!r})")
    return "\n".join(lines)


__all__ = ["TrainConfig", "build_config", "keys_help", "parse_flags"]
