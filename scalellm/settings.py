"""Flags with environment-variable fallbacks, for every service's frozen config dataclass.

Precedence: the flag, then the environment variable, then the dataclass default. Nothing is read
at import time: ``parse_config`` reads argv and the environment when a service starts.

    OPTIONS = (Option("--listen", "listen", str, "host:port to bind", env="SCALELLM_KVSTORE_ADDR"), ...)
    config = parse_config(KvstoreConfig, OPTIONS, argv, prog="python -m services.kvstore")

An option may set a field of a nested config dataclass ("engine.dtype": the `dtype` of the config's
`engine` field), so a service embeds another room's config instead of re-declaring its fields.
Options written once for a shared config are nested into each service's with ``nested``:

    OPTIONS = (..., *nested("security", SECURITY_OPTIONS))   # --mesh-token -> config.security.mesh_token
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import os
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, Field, dataclass, fields
from typing import Any, TypeVar

C = TypeVar("C")


@dataclass(frozen=True, slots=True)
class Option:
    flag: str
    field: str
    """The config dataclass field it sets ("engine.dtype": a field of a nested config)."""
    type: Callable[[str], Any]
    help: str
    env: str
    repeat: bool = False
    """Repeatable flag (a tuple field); its environment variable takes a comma-separated list."""
    choices: tuple[Any, ...] | None = None
    """Allowed values after conversion (enum members are shown by their lower-case name)."""


def nested(field: str, options: Sequence[Option]) -> tuple[Option, ...]:
    """Options of a nested config dataclass as options of the config that holds it in ``field``:
    the mesh security flags, written once for SecurityConfig, become "security.mesh_token", ..."""
    return tuple(dataclasses.replace(option, field=f"{field}.{option.field}") for option in options)


def split_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _default_text(name: str, f: Field[Any], extra: Mapping[str, Any]) -> str:
    """What --help shows as a field's default: extra's value, the dataclass default, or 'required'."""
    if name in extra:
        value = extra[name]
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
) -> argparse.ArgumentParser:
    """Every default is None, so that the environment and then the dataclass default apply."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    defaults = {name: _default_text(name, f, extra or {}) for name, f in _fields(config_cls)}
    for option in options:
        parser.add_argument(
            option.flag,
            dest=option.field,
            type=option.type,
            default=None,
            choices=option.choices,
            metavar=(
                "{" + ",".join(map(_choice_name, option.choices)) + "}"
                if option.choices
                else option.field.rpartition(".")[2].upper()  # "engine.dtype" shows as DTYPE
            ),
            action="append" if option.repeat else "store",
            help=f"{option.help} (env {option.env}; {defaults.get(option.field, 'default None')})",
        )
    return parser


def parse_config(
    config_cls: type[C],
    options: Sequence[Option],
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    prog: str,
    description: str = "",
    extra: Mapping[str, Any] | None = None,
) -> C:
    """Build ``config_cls`` from flags (argv, default sys.argv[1:]) and environ (default
    os.environ); a bad value, in the config or in a nested one, exits with the parser's usage
    error naming it."""
    parser = build_parser(config_cls, options, prog, description, extra)
    args = parser.parse_args(argv)
    env = os.environ if environ is None else environ
    values: dict[str, Any] = dict(extra or {})
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
    try:
        return _build(config_cls, values)
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits


def _nested(config_cls: type) -> dict[str, type]:
    """The fields of config_cls that are config dataclasses themselves, with their classes."""
    hints = typing.get_type_hints(config_cls)
    return {f.name: hints[f.name] for f in fields(config_cls) if dataclasses.is_dataclass(hints[f.name])}


def _fields(config_cls: type) -> list[tuple[str, Field[Any]]]:
    """Every settable field by option name: plain ones, and "outer.inner" for nested configs."""
    nested_classes = _nested(config_cls)
    out: list[tuple[str, Field[Any]]] = []
    for f in fields(config_cls):
        if f.name in nested_classes:
            out.extend((f"{f.name}.{name}", inner) for name, inner in _fields(nested_classes[f.name]))
        else:
            out.append((f.name, f))
    return out


def _build(config_cls: type[C], values: Mapping[str, Any]) -> C:
    """config_cls(**values), building nested configs from their "outer.inner" values; a nested
    config none of whose options was given keeps the field's default."""
    nested_classes = _nested(config_cls)
    flat: dict[str, Any] = {}
    inner: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        outer, dot, name = key.partition(".")
        if dot:
            inner.setdefault(outer, {})[name] = value
        else:
            flat[key] = value
    for outer, kwargs in inner.items():
        flat[outer] = _build(nested_classes[outer], kwargs)
    return config_cls(**flat)


def _choice_name(choice: Any) -> str:
    name = getattr(choice, "name", None)
    return name.lower() if isinstance(name, str) else str(getattr(choice, "value", choice))
