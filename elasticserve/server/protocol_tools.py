"""Wire models of chat structured outputs and tool calling (OpenAI's shapes).

Requests: ``response_format`` (text, json_object, json_schema), ``tools`` (functions),
``tool_choice`` (none, auto, required or a named function), ``parallel_tool_calls``, and
assistant messages carrying ``tool_calls`` / tool messages with ``tool_call_id``. Responses:
``message.tool_calls`` and streamed ``delta.tool_calls``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict

StrictBool = Annotated[bool, Strict()]


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


# ---- requests ----------------------------------------------------------------------------------
class JsonSchemaSpec(_Lenient):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    # "schema" would shadow BaseModel.schema; the wire name is kept by the alias
    json_schema: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class FunctionDefinition(_Lenient):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None

    def parameters_schema(self) -> dict[str, Any]:
        # OpenAI: omitting parameters defines a function with an empty parameter list
        return self.parameters if self.parameters is not None else \
            {"type": "object", "properties": {}}


class ChatTool(_Lenient):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Lenient):
    name: str


class NamedToolChoice(_Lenient):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(BaseModel):
    """A called function: its name and its arguments as JSON text."""

    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


# ---- streamed deltas ---------------------------------------------------------------------------
class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    """One piece of a streamed tool call; pieces with the same index concatenate."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall
