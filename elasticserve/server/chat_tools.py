"""Chat ``response_format`` and ``tools``/``tool_choice``: the grammar a request's output must
follow, and its output turned back into OpenAI tool calls.

Tool-call format (what the grammar forces for ``required``, what ``auto`` recognizes, what the
default chat template shows the model): a JSON array ``[{"name": ..., "parameters": {...}}]``,
the format vLLM forces for ``tool_choice="required"``. ``auto`` also accepts one such object
(``arguments`` for ``parameters`` too) and Hermes/Qwen ``<tool_call>{...}</tool_call>`` blocks.
A named ``tool_choice`` forces the function's parameters object alone.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from elasticserve.sampling_params import StructuredOutputsParams
from elasticserve.server.errors import APIError
from elasticserve.server.protocol import ChatCompletionRequest, random_id
from elasticserve.server.protocol_tools import (
    DeltaFunctionCall,
    DeltaToolCall,
    FunctionCall,
    NamedToolChoice,
    ResponseFormat,
    ToolCall,
)

_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """How a chat request's output is read: ``mode`` is none (plain text), auto (text that may
    be a tool call), required (an array of calls) or named (the arguments of ``name``)."""

    mode: str = "none"
    name: str | None = None
    functions: frozenset[str] = field(default_factory=frozenset)
    single: bool = False  # parallel_tool_calls=false: several calls are not a tool call

    def calls(self, text: str) -> list[ToolCall] | None:
        """The tool calls ``text`` holds, or None when it is to be returned as content."""
        if self.mode == "named":
            assert self.name is not None
            return [_call(self.name, text)] if _is_json_object(text) else None
        if self.mode in ("required", "auto"):
            calls = parse_tool_calls(text, self.functions)
            return None if calls is None or (self.single and len(calls) > 1) else calls
        return None


def plan(req: ChatCompletionRequest) -> tuple[StructuredOutputsParams | None, ToolPlan]:
    """The grammar for the request's output (None: free text) and how to read it back.
    Raises APIError 400 naming the field for what is inconsistent or unsupported."""
    _refuse_deprecated(req)
    tools = req.tools or []
    choice = req.tool_choice if req.tool_choice is not None else ("auto" if tools else "none")
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise APIError(400, "tools must have distinct function names", "tools")
    if choice != "none" and not tools:
        raise APIError(400, f"tool_choice={_show(choice)} needs tools", "tool_choice")
    functions = frozenset(names)
    single = req.parallel_tool_calls is False
    if choice in ("none", "auto"):
        return response_format_params(req.response_format), ToolPlan(str(choice), None, functions, single)
    if req.response_format is not None and req.response_format.type != "text":
        raise APIError(400, "response_format cannot be combined with a tool_choice that forces "
                       "a tool call", "response_format")
    if isinstance(choice, NamedToolChoice):
        by_name = {t.function.name: t.function for t in tools}
        if choice.function.name not in by_name:
            raise APIError(400, f"tool_choice names function {choice.function.name!r}, which is "
                           "not in tools", "tool_choice")
        schema = by_name[choice.function.name].parameters_schema()
        return _structured(schema, "tools"), ToolPlan("named", choice.function.name, functions)
    variants = [{"type": "object", "properties": {
        "name": {"type": "string", "enum": [t.function.name]},
        "parameters": t.function.parameters_schema()},
        "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
    array: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": variants}}
    if req.parallel_tool_calls is False:
        array["maxItems"] = 1
    return _structured(array, "tools"), ToolPlan("required", None, functions, single)


def _refuse_deprecated(req: ChatCompletionRequest) -> None:
    for old in ("functions", "function_call"):
        if getattr(req, old) is not None:
            raise APIError(400, f"{old} is deprecated and not supported; use tools and "
                           "tool_choice", old)


def response_format_params(fmt: ResponseFormat | None) -> StructuredOutputsParams | None:
    """The grammar of a ``response_format`` (chat and completions); None for text."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return StructuredOutputsParams(json_object=True)
    if fmt.json_schema is None:
        raise APIError(400, "response_format of type json_schema needs json_schema",
                       "response_format")
    return _structured(fmt.json_schema.json_schema or {"type": "object"}, "response_format")


def _structured(schema: dict[str, Any], param: str) -> StructuredOutputsParams:
    try:
        return StructuredOutputsParams(json=schema)
    except ValueError as exc:
        raise APIError(400, str(exc), param) from exc


def _show(choice: object) -> str:
    return choice if isinstance(choice, str) else "a named function"


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def _call(name: str, arguments: str) -> ToolCall:
    return ToolCall(id=random_id("call"), function=FunctionCall(name=name, arguments=arguments))


def parse_tool_calls(text: str, functions: frozenset[str]) -> list[ToolCall] | None:
    """Tool calls in our JSON format or in Hermes ``<tool_call>`` blocks; None if ``text`` is
    anything else (or names a function not in ``functions``)."""
    blocks = _HERMES.findall(text)
    items: list[Any] = []
    try:
        if blocks:
            items = [json.loads(b) for b in blocks]
        else:
            parsed = json.loads(text)
            items = parsed if isinstance(parsed, list) else [parsed]
    except ValueError:
        return None
    calls = []
    for item in items:
        if not isinstance(item, dict) or item.get("name") not in functions:
            return None
        args = item.get("parameters", item.get("arguments", {}))
        if not isinstance(args, dict):
            return None
        calls.append(_call(item["name"], json.dumps(args, ensure_ascii=False)))
    return calls or None


def may_become_call(text: str) -> bool:
    """Whether an unfinished ``auto`` output could still turn out to be a tool call (its text
    is then held back from the stream until it is decided)."""
    head = text.lstrip()
    return not head or head[0] in "[{" or "<tool_call>".startswith(head[:11]) \
        or head.startswith("<tool_call>")


def finish_reason(reason: str | None, calls: list[ToolCall] | None) -> str | None:
    """OpenAI's finish_reason: "tool_calls" when a finished output is tool calls."""
    return "tool_calls" if calls and reason == "stop" else reason


@dataclass(slots=True)
class ToolStream:
    """Per-choice streaming of tool calls. ``named``: the output is the arguments, streamed as
    they come after a first piece carrying the id and name. ``required``: held to the end, then
    one piece per call. ``auto``: held while it may still become a call (``may_become_call``),
    else streamed as content from then on."""

    plan: ToolPlan
    _held: dict[int, str] = field(default_factory=dict)
    _content: set[int] = field(default_factory=set)  # auto choices decided to be plain text
    _started: set[int] = field(default_factory=set)  # named choices whose first piece is out
    _called: set[int] = field(default_factory=set)  # choices whose output went out as calls

    def update(self, index: int, text: str, finished: bool
               ) -> tuple[str | None, list[DeltaToolCall] | None]:
        """(content delta, tool-call deltas) for a choice's new ``text``."""
        mode = self.plan.mode
        if mode == "none" or index in self._content:
            return text, None
        if mode == "named":
            return None, [self._named_piece(index, text)]
        held = self._held[index] = self._held.get(index, "") + text
        if mode == "auto" and not finished and not may_become_call(held):
            self._content.add(index)
            return held, None
        if not finished:
            return None, None
        calls = self.plan.calls(held)
        if calls is None:
            return held, None
        self._called.add(index)
        return None, [DeltaToolCall(index=i, id=c.id, type="function", function=DeltaFunctionCall(
            name=c.function.name, arguments=c.function.arguments)) for i, c in enumerate(calls)]

    def _named_piece(self, index: int, text: str) -> DeltaToolCall:
        if index in self._started:
            return DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=text))
        self._started.add(index)
        return DeltaToolCall(index=0, id=random_id("call"), type="function",
                             function=DeltaFunctionCall(name=self.plan.name, arguments=text))

    def made_calls(self, index: int) -> bool:
        """Whether the choice's output went out as tool calls (named: always)."""
        return self.plan.mode == "named" or index in self._called
