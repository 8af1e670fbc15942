"""Flags with environment-variable fallbacks, for every service's frozen config dataclass.

Precedence: the flag, then the environment variable, then the dataclass default. Nothing is read
at import time: ``parse_config`` reads argv and the environment when a service starts.

    OPTIONS = (Option("--listen", "listen", str, "host:port to bind", env="SCALELLM_KVSTORE_ADDR"), ...)
    config = parse_config(KvstoreConfig, OPTIONS, argv, prog="python -m services.kvstore")
"""

from __future__ import annotations

import argparse
import enum
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, Field, dataclass, fields
from typing import Any, TypeVar

C = TypeVar("C")


@dataclass(frozen=True, slots=True)
class Option:
    flag: str
    field: str
    """The config dataclass field it sets."""
    type: Callable[[str], Any]
    help: str
    env: str
    repeat: bool = False
    """Repeatable flag (a tuple field); its environment variable takes a comma-separated list."""
    choices: tuple[Any, ...] | None = None
    """Allowed values after conversion (enum members are shown by their lower-case name)."""


@dataclass(frozen=True, slots=True)
class OptionGroup:
    """Flags that fill one nested config dataclass (e.g. the mesh security every service shares)."""

    field: str
    """The config field the group's dataclass goes into."""
    cls: type
    options: tuple[Option, ...]


def split_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _default_text(f: Field[Any], extra: Mapping[str, Any]) -> str:
    """What --help shows as a field's default: extra's value, the dataclass default, or 'required'."""
    if f.name in extra:
        value = extra[f.name]
    elif f.default is not MISSING:
        value = f.default
    elif f.default_factory is not MISSING:
        value = f.default_factory()
    else:
        return "required"
    return f"default {_choice_name(value) if isinstance(value, enum.Enum) else repr(value)}"


def build_parser(
    config_cls: type,
    options: Sequence[Option],
    prog: str,
    description: str,
    extra: Mapping[str, Any] | None = None,
    groups: Sequence[OptionGroup] = (),
) -> argparse.ArgumentParser:
    """Every default is None, so that the environment and then the dataclass default apply."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    _add_options(parser, config_cls, options, extra or {})
    for group in groups:
        _add_options(parser, group.cls, group.options, {})
    return parser


def _add_options(
    parser: argparse.ArgumentParser, config_cls: type, options: Sequence[Option], extra: Mapping[str, Any]
) -> None:
    defaults = {f.name: _default_text(f, extra) for f in fields(config_cls)}
    for option in options:
        parser.add_argument(
            option.flag,
            dest=option.field,
            type=option.type,
            default=None,
            choices=option.choices,
            metavar="{" + ",".join(map(_choice_name, option.choices)) + "}" if option.choices else None,
            action="append" if option.repeat else "store",
            help=f"{option.help} (env {option.env}; {defaults.get(option.field, 'default None')})",
        )


def parse_config(
    config_cls: type[C],
    options: Sequence[Option],
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    prog: str,
    description: str = "",
    extra: Mapping[str, Any] | None = None,
    groups: Sequence[OptionGroup] = (),
) -> C:
    """Build ``config_cls`` from flags (argv, default sys.argv[1:]) and environ (default
    os.environ); a bad value exits with the parser's usage error naming it. Each group's flags
    build its own dataclass, passed as the field the group names."""
    parser = build_parser(config_cls, options, prog, description, extra, groups)
    args = parser.parse_args(argv)
    env = os.environ if environ is None else environ
    try:
        values: dict[str, Any] = dict(extra or {})
        values |= _values(parser, args, env, options)
        for group in groups:
            values[group.field] = group.cls(**_values(parser, args, env, group.options))
        return config_cls(**values)
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits


def _values(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    env: Mapping[str, str],
    options: Sequence[Option],
) -> dict[str, Any]:
    """The options given, by field: the flag, else the environment variable."""
    values: dict[str, Any] = {}
    for option in options:
        value = getattr(args, option.field)
        if value is None and env.get(option.env):
            raw = env[option.env]
            try:
                value = [option.type(v) for v in split_list(raw)] if option.repeat else option.type(raw)
            except ValueError:
                parser.error(f"{option.env}={raw!r} is not valid for {option.flag}")
            if option.choices is not None and value not in option.choices:
                parser.error(
                    f"{option.env}={raw!r}: choose from {', '.join(map(_choice_name, option.choices))}"
                )
        if value is not None and option.repeat:
            value = tuple(item for v in value for item in split_list(v))
        if value is not None:
            values[option.field] = value
    return values


def _choice_name(choice: Any) -> str:
    name = getattr(choice, "name", None)
    return name.lower() if isinstance(name, str) else str(getattr(choice, "value", choice))
