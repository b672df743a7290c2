"""Chat structured outputs and tool calls over HTTP with the official `openai` client: even the
random-weight tiny model answers in the schema, because the grammar masks its logits."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import httpx
import pytest
from pydantic import BaseModel, Field

from elasticserve.server.chat_tools import ToolPlan, ToolStream, parse_tool_calls
from elasticserve.server.protocol import ChatCompletionRequest
from tests.json_schema_check import check

CHAT = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12},
                   "unit": {"enum": ["celsius", "fahrenheit"]},
                   "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "unit", "days"], "additionalProperties": False,
}
CLOCK: dict[str, Any] = {
    "type": "object", "properties": {"tz": {"type": "string", "maxLength": 8}},
    "required": ["tz"], "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": CLOCK}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": CLOCK}


class Person(BaseModel):
    name: str = Field(max_length=16)
    age: int = Field(ge=0, le=120)
    role: Literal["admin", "user", "guest"]
    tags: list[Annotated[str, Field(max_length=6)]] = Field(max_length=3)


def test_openai_parse_with_a_pydantic_model(client, engines, wait_idle):
    for temperature in (0.0, 1.0):
        resp = client.chat.completions.parse(
            model="tiny", messages=[{"role": "user", "content": "Describe a person."}],
            response_format=Person, max_tokens=300, temperature=temperature, seed=5)
        choice = resp.choices[0]
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, Person), choice.message.content
    wait_idle(engines["tiny"])


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_response_format_over_http(base_url, stream):
    schema = {"type": "array", "minItems": 2, "maxItems": 3,
              "items": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0,
                                                               "maximum": 9}},
                        "required": ["n"], "additionalProperties": False}}
    body = {"model": "tiny-b", "messages": CHAT, "max_tokens": 200, "temperature": 0,
            "stream": stream, "response_format": {"type": "json_schema", "json_schema": {
                "name": "numbers", "schema": schema, "strict": True}}}
    r = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    text = _streamed_text(r.text) if stream else r.json()["choices"][0]["message"]["content"]
    check(json.loads(text), schema)


def test_completions_take_response_format_too(client, base_url):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "ok", "schema": schema}}
    resp = client.completions.create(model="tiny", prompt="def main():", max_tokens=50,
                                      temperature=0, extra_body={"response_format": fmt})
    assert json.loads(resp.choices[0].text) in ({"ok": True}, {"ok": False})
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such"}}}
    r = httpx.post(f"{base_url}/v1/completions", timeout=30,
                   json={"model": "tiny", "prompt": "x", "response_format": bad})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format", r.text


def test_json_object_starts_an_object(client):
    resp = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=40,
                                          temperature=0, response_format={"type": "json_object"})
    text = resp.choices[0].message.content
    # a random model may not close a free-form object within max_tokens; it must open one
    assert text.startswith("{")
    if resp.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def _check_calls(calls) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id
        check(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_tool_choice_required_returns_valid_tool_calls(client, engines, wait_idle):
    resp = client.chat.completions.create(model="tiny", messages=CHAT, tools=TOOLS,
                                          tool_choice="required", parallel_tool_calls=False,
                                          max_tokens=400, temperature=0)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message.content
    assert choice.message.content is None
    _check_calls(choice.message.tool_calls)
    assert len(choice.message.tool_calls) == 1
    wait_idle(engines["tiny"])


def test_parallel_tool_calls_are_allowed_by_default(client):
    # the array has no bound: the greedy random model keeps calling until max_tokens cuts it
    # (then the text comes back as content, as an incomplete JSON); every call it made so far
    # is valid
    resp = client.chat.completions.create(model="tiny", messages=CHAT, tools=TOOLS,
                                          tool_choice="required", max_tokens=150, temperature=0)
    choice = resp.choices[0]
    if choice.finish_reason == "tool_calls":
        _check_calls(choice.message.tool_calls)
        return
    assert choice.finish_reason == "length" and choice.message.tool_calls is None
    text = choice.message.content
    closed = text[:text.rindex("}},") + 2] + "]"  # the calls completed before the cut
    calls = json.loads(closed)
    assert len(calls) >= 2
    for call in calls:
        check(call["parameters"], SCHEMAS[call["name"]])


def _reassemble(chunks) -> tuple[dict[int, dict[str, str]], list[str | None]]:
    calls: dict[int, dict[str, str]] = {}
    reasons = []
    for chunk in chunks:
        for c in chunk.choices:
            reasons.append(c.finish_reason)
            for piece in c.delta.tool_calls or []:
                call = calls.setdefault(piece.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += piece.id or ""
                call["name"] += piece.function.name or ""
                call["arguments"] += piece.function.arguments or ""
    return calls, reasons


@pytest.mark.parametrize("tool_choice", [
    "required", {"type": "function", "function": {"name": "get_weather"}}])
def test_streamed_tool_calls_reassemble_to_the_same_calls(client, tool_choice):
    kwargs = dict(model="tiny-b", messages=CHAT, tools=TOOLS, tool_choice=tool_choice,
                  parallel_tool_calls=False, max_tokens=400, temperature=0)
    whole = client.chat.completions.create(**kwargs).choices[0]
    calls, reasons = _reassemble(client.chat.completions.create(stream=True, **kwargs))
    assert [(c.function.name, c.function.arguments) for c in whole.message.tool_calls] == \
        [(calls[i]["name"], calls[i]["arguments"]) for i in sorted(calls)]
    assert all(c["id"] for c in calls.values())
    assert reasons[-1] == whole.finish_reason == "tool_calls"


def test_named_tool_choice_forces_that_function(client):
    resp = client.chat.completions.create(
        model="tiny", messages=CHAT, tools=TOOLS, max_tokens=300, temperature=1.0, seed=2,
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    calls = resp.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_time"]
    _check_calls(calls)


def test_tool_choice_auto_and_none_answer_in_text(client):
    for choice in ("auto", "none"):
        resp = client.chat.completions.create(model="tiny", messages=CHAT, tools=TOOLS,
                                              tool_choice=choice, max_tokens=8, temperature=0)
        message = resp.choices[0].message
        # the random model's text is no tool call: it comes back as content
        assert message.tool_calls is None and isinstance(message.content, str)
        assert resp.choices[0].finish_reason in ("stop", "length")


def test_auto_parser_reads_our_format_and_hermes_blocks():
    names = frozenset({"get_time"})
    calls = parse_tool_calls('[{"name": "get_time", "parameters": {"tz": "UTC"}}]', names)
    assert calls and calls[0].function.name == "get_time"
    assert json.loads(calls[0].function.arguments) == {"tz": "UTC"}
    hermes = '<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>'
    assert json.loads(parse_tool_calls(hermes, names)[0].function.arguments) == {"tz": "CET"}
    for text in ('{"name": "other", "parameters": {}}', "hello", '[{"name": "get_time"}, 3]'):
        assert parse_tool_calls(text, names) is None


def test_auto_stream_holds_back_only_what_may_be_a_call():
    plan = ToolPlan("auto", None, frozenset({"get_time"}))
    stream = ToolStream(plan)
    assert stream.update(0, "  Hel", False) == ("  Hel", None)  # plain text goes out at once
    assert stream.update(0, "lo", True) == ("lo", None)
    assert not stream.made_calls(0)
    pieces = ['[{"name": "get_time", ', '"parameters": {"tz": ', '"UTC"}}]']
    assert [stream.update(1, p, False) for p in pieces[:2]] == [(None, None)] * 2
    content, calls = stream.update(1, pieces[2], True)
    assert content is None and calls is not None and stream.made_calls(1)
    assert (calls[0].index, calls[0].function.name, json.loads(calls[0].function.arguments)) \
        == (0, "get_time", {"tz": "UTC"})
    # held, then not a call after all: everything held comes out as content
    assert stream.update(2, '{"a": 1', False) == (None, None)
    assert stream.update(2, "}", True) == ('{"a": 1}', None)
    single = ToolPlan("auto", None, frozenset({"get_time"}), single=True)
    two = '[{"name": "get_time", "parameters": {}}, {"name": "get_time", "parameters": {}}]'
    assert single.calls(two) is None and plan.calls(two) is not None


def test_tool_messages_reach_the_chat_template(client, engines):
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call-1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call-1", "content": "22C and sunny"},
    ]
    req = ChatCompletionRequest(model="tiny", messages=messages, tools=TOOLS)
    tokenizer = engines["tiny"].engine.tokenizer
    text = tokenizer.apply_chat_template(req.conversation(), tools=TOOLS)
    assert '[{"name": "get_weather", "parameters": {"city": "Paris"}}]' in text
    assert "<|im_start|>tool\n22C and sunny<|im_end|>" in text
    assert '"name": "get_time"' in text  # the tools are listed for the model
    resp = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS,
                                          max_tokens=4, temperature=0)
    assert resp.usage.prompt_tokens == len(tokenizer.encode(text, add_special_tokens=False))


@pytest.mark.parametrize(("extra", "param"), [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "json_schema",
                          "json_schema": {"name": "x", "schema": {"type": "no-such"}}}},
     "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f",
                                                  "parameters": {"type": "no-such"}}}],
      "tool_choice": "required"}, "tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format"),
    ({"tools": TOOLS + TOOLS[:1]}, "tools"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"tools": [{"type": "custom", "custom": {"name": "f"}}]}, "tools[0].type"),
    ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
])
def test_bad_structured_fields_are_400_naming_the_field(base_url, engines, wait_idle, extra,
                                                        param):
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 4, **extra}
    r = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text
    wait_idle(engines["tiny"])


def _streamed_text(body: str) -> str:
    text = ""
    for line in body.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            for c in json.loads(line[6:])["choices"]:
                text += c["delta"].get("content") or ""
    return text
