"""Command-line flags generated from a frozen config dataclass: its fields, defaults and help text.

A setting is declared once (the dataclass, with `field(metadata={"help": ...})`) and the CLI,
`--help` and validation all follow from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

Config = TypeVar("Config")


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(the type to parse with, whether None is allowed)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(annotation))
    return annotation, False


def _parse_tuple_of_ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_config_arguments(parser: argparse.ArgumentParser, config_type: type) -> None:
    hints = typing.get_type_hints(config_type)
    for item in dataclasses.fields(config_type):
        if not item.init or item.metadata.get("cli") is False:
            continue
        flag = "--" + item.name.replace("_", "-")
        kind, optional = _base_type(hints[item.name])
        default = item.default if item.default is not dataclasses.MISSING else None
        required = item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING
        if item.default_factory is not dataclasses.MISSING:
            default = item.default_factory()
        help_text = item.metadata.get("help", "")
        shown = default.value if isinstance(default, enum.Enum) else (",".join(map(str, default)) if isinstance(default, tuple) else default)
        help_text = f"{help_text} (default: {shown})" if not required else f"{help_text} (required)"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif isinstance(kind, type) and issubclass(kind, enum.Enum):
            parser.add_argument(flag, choices=[m.value for m in kind], default=default.value if default is not None else None,
                                required=required, help=help_text)
        elif typing.get_origin(kind) is tuple:
            parser.add_argument(flag, type=_parse_tuple_of_ints, default=default, required=required, help=help_text)
        else:
            parser.add_argument(flag, type=kind if kind in (int, float, str, Path) else str, default=default,
                                required=required, help=help_text, metavar=item.name.upper())


def config_from_arguments(config_type: type[Config], namespace: argparse.Namespace) -> Config:
    """Build the config (its __post_init__ validates) from parsed flags."""
    hints = typing.get_type_hints(config_type)
    values = {}
    for item in dataclasses.fields(config_type):
        if not item.init or item.metadata.get("cli") is False or not hasattr(namespace, item.name):
            continue
        value = getattr(namespace, item.name)
        kind, _ = _base_type(hints[item.name])
        if value is not None and isinstance(kind, type) and issubclass(kind, enum.Enum):
            value = kind(value)
        values[item.name] = value
    return config_type(**values)


def config_arguments(config: object) -> list[str]:
    """The flags that reproduce `config` (the inverse of `config_from_arguments`), e.g. to start a child process."""
    arguments = []
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        flag = "--" + item.name.replace("_", "-")
        if not item.init or item.metadata.get("cli") is False or value is None:  # an unset optional flag keeps its default
            continue
        if isinstance(value, bool):
            arguments.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, enum.Enum):
            arguments += [flag, str(value.value)]
        elif isinstance(value, tuple):
            arguments += [flag, ",".join(map(str, value))]
        else:
            arguments += [flag, str(value)]
    return arguments
