"""Body: typed, named reads of a JSON object, so every bad value is a 400 that names its field.

Each read marks the field as known; ``finish()`` then rejects whatever the client sent that no read
asked for, by name. ``null`` counts as absent, as in OpenAI's API. Booleans are never numbers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any, overload

from services.gateway.errors import GatewayError, invalid

_MISSING = object()
_TYPE_NAMES = {
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "an array",
    dict: "an object",
}


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The request body as a dict; 400 for malformed JSON, NaN/Infinity, or a non-object."""

    def reject_constant(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    try:
        data = json.loads(raw, parse_constant=reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise invalid(f"the request body must be a JSON object, got {kind_of(data)}", code="invalid_json")
    return data


def kind_of(value: Any) -> str:
    """A JSON type name for error messages."""
    if value is None:
        return "null"
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def unsupported(name: str, why: str = "") -> GatewayError:
    return invalid(f"'{name}' is not supported by this server{why}", name, "unsupported_parameter")


class Body:
    """Reads of one JSON object; ``prefix`` qualifies names in messages ("messages[2].")."""

    def __init__(self, data: Mapping[str, Any], prefix: str = "") -> None:
        self.data = data
        self.prefix = prefix
        self._seen: set[str] = set()

    def name(self, key: str) -> str:
        return self.prefix + key

    def raw(self, key: str) -> Any:
        """The value (None when absent or null); marks the field known."""
        self._seen.add(key)
        return self.data.get(key)

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def _typed(self, key: str, types: tuple[type, ...], what: str, default: Any) -> Any:
        value = self.raw(key)
        if value is None:
            return default
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            raise invalid(
                f"'{self.name(key)}' must be {what}, got {kind_of(value)}", self.name(key), "invalid_type"
            )
        return value

    def boolean(self, key: str, default: bool = False) -> bool:
        return self._typed(key, (bool,), "a boolean", default)

    def string(self, key: str, default: str | None = None) -> str | None:
        return self._typed(key, (str,), "a string", default)

    @overload
    def integer(self, key: str, default: int) -> int: ...

    @overload
    def integer(self, key: str, default: None = None) -> int | None: ...

    def integer(self, key: str, default: int | None = None) -> int | None:
        value = self._typed(key, (int,), "an integer", _MISSING)
        return default if value is _MISSING else value

    def number(self, key: str, default: float, lo: float | None = None, hi: float | None = None) -> float:
        """A finite number (ints become floats), within [lo, hi] when given."""
        value = self._typed(key, (int, float), "a number", _MISSING)
        if value is _MISSING:
            return default
        value = float(value)
        in_range = (lo is None or value >= lo) and (hi is None or value <= hi)
        if not (math.isfinite(value) and in_range):
            raise invalid(_range_message(self.name(key), value, lo, hi), self.name(key), "invalid_value")
        return value

    def reject(self, key: str, is_noop: Callable[[Any], bool], why: str = "") -> None:
        """Refuse a known-but-unsupported field unless its value changes nothing."""
        value = self.raw(key)
        if value is not None and not is_noop(value):
            raise unsupported(self.name(key), why)

    def finish(self) -> None:
        """Reject every field no read asked for."""
        unknown = [k for k in self.data if k not in self._seen]
        if unknown:
            name = self.name(unknown[0])
            raise invalid(f"unknown parameter '{name}'", name, "unknown_parameter")


def _range_message(name: str, value: float, lo: float | None, hi: float | None) -> str:
    if lo is not None and hi is not None:
        return f"'{name}' must be in [{lo:g}, {hi:g}], got {value:g}"
    if lo is not None:
        return f"'{name}' must be >= {lo:g}, got {value:g}"
    if hi is not None:
        return f"'{name}' must be <= {hi:g}, got {value:g}"
    return f"'{name}' must be a finite number, got {value:g}"
