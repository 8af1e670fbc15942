"""StructuredOutput: a constraint every generated token must keep (JSON, a JSON Schema, a regex, a
grammar, or one of a list of choices), enforced by the engine's grammar engine token by token.

Torch-free and engine-free: this only checks what can be checked without the model's vocabulary
(the spec is present, a schema is a JSON object); the engine compiles it for its vocabulary and
reports a spec its grammar engine refuses as InvalidParameter on 'structured_output'.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from scalellm.types.errors import InvalidParameter

MAX_SPEC_CHARS = 64 * 1024
"""Longest schema, regex or grammar text."""

FIELD = "structured_output"


class StructuredKind(enum.Enum):
    JSON_OBJECT = "json_object"
    """Any JSON object (OpenAI's response_format json_object)."""
    JSON_SCHEMA = "json_schema"
    """A JSON value valid under ``spec``, a JSON Schema as JSON text."""
    REGEX = "regex"
    """Text matching ``spec`` as a whole."""
    LARK = "lark"
    """Text of the grammar ``spec``: Lark (llguidance's dialect: start rule ``start``), or GBNF
    (llama.cpp's, ``root ::= ...``; what vLLM's grammar examples are written in)."""


@dataclass(frozen=True)
class StructuredOutput:
    kind: StructuredKind
    spec: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.kind, StructuredKind):
            raise InvalidParameter(FIELD, f"kind must be a StructuredKind, got {self.kind!r}")
        if not isinstance(self.spec, str):
            raise InvalidParameter(FIELD, f"spec must be a string, got {type(self.spec).__name__}")
        if len(self.spec) > MAX_SPEC_CHARS:
            raise InvalidParameter(FIELD, f"spec must be at most {MAX_SPEC_CHARS} characters")
        if self.kind is StructuredKind.JSON_OBJECT:
            if self.spec:
                raise InvalidParameter(FIELD, "json_object takes no spec")
            return
        if not self.spec.strip():
            raise InvalidParameter(FIELD, f"{self.kind.value} needs a non-empty spec")
        if self.kind is StructuredKind.JSON_SCHEMA:
            try:
                schema = json.loads(self.spec)
            except ValueError as exc:
                raise InvalidParameter(FIELD, f"json_schema is not valid JSON: {exc}") from None
            if not isinstance(schema, dict):
                raise InvalidParameter(FIELD, "json_schema must be a JSON object")

    @classmethod
    def json_object(cls) -> StructuredOutput:
        return cls(StructuredKind.JSON_OBJECT)

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any] | str) -> StructuredOutput:
        """A schema as a mapping (serialised, key order kept) or as JSON text."""
        return cls(StructuredKind.JSON_SCHEMA, schema if isinstance(schema, str) else json.dumps(schema))

    @classmethod
    def regex(cls, pattern: str) -> StructuredOutput:
        return cls(StructuredKind.REGEX, pattern)

    @classmethod
    def lark(cls, grammar: str) -> StructuredOutput:
        return cls(StructuredKind.LARK, grammar)

    @classmethod
    def choice(cls, options: Sequence[str]) -> StructuredOutput:
        """The output is exactly one of ``options`` (vLLM's guided choice): a grammar of them."""
        if isinstance(options, str) or not isinstance(options, Sequence) or not options:
            raise InvalidParameter(FIELD, "choice must be a non-empty array of strings")
        if not all(isinstance(o, str) for o in options):
            raise InvalidParameter(FIELD, "choice must hold only strings")
        return cls(StructuredKind.LARK, "start: " + " | ".join(json.dumps(o) for o in options))
