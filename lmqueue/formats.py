"""`response_format` (chat, completions) and the Responses API's `text.format`: what structured
output a request asks for. The worker compiles it into a grammar (worker/structured.py)."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_SCHEMA_CHARS = 64_000  # a compiled grammar is cached per schema: keep each one small


class JsonSchemaSpec(BaseModel):
    """OpenAI's `json_schema` object: name, optional description, the schema, strict."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    # `schema` shadows a BaseModel attribute, hence the alias.
    json_schema: dict[str, Any] = Field(alias="schema", default_factory=dict)
    strict: bool | None = None

    @model_validator(mode="after")
    def _size(self) -> JsonSchemaSpec:
        if len(json.dumps(self.json_schema)) > MAX_SCHEMA_CHARS:
            raise ValueError(f"schema: at most {MAX_SCHEMA_CHARS} characters of JSON")
        return self


class ResponseFormat(BaseModel):
    """{"type": "text"} | {"type": "json_object"} | {"type": "json_schema", "json_schema": {...}}"""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _pair(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with (and only with) type json_schema")
        return self


class TextFormat(BaseModel):
    """The Responses API's flattened `text.format`: {"type": "json_schema", "name", "schema"}."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(default=None, min_length=1, max_length=64)
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(alias="schema", default=None)
    strict: bool | None = None

    @model_validator(mode="after")
    def _pair(self) -> TextFormat:
        if self.type == "json_schema" and (self.json_schema is None or not self.name):
            raise ValueError("name and schema are required with type json_schema")
        return self

    def as_response_format(self) -> ResponseFormat:
        if self.type != "json_schema":
            return ResponseFormat(type=self.type)
        spec = JsonSchemaSpec(name=self.name or "schema", schema=self.json_schema or {})
        return ResponseFormat(type="json_schema", json_schema=spec)


def grammar_key(fmt: ResponseFormat | None) -> str | None:
    """What the worker compiles: None (free text), "json" (any JSON object) or the schema as
    canonical JSON (the key of the compiled-grammar cache)."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object" or fmt.json_schema is None:
        return "json"
    # Key order is kept: a schema's property order is the order the output is generated in.
    return json.dumps(fmt.json_schema.json_schema, separators=(",", ":"))
