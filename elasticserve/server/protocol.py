"""Pydantic models of the OpenAI completions and chat completions wire format.

Requests accept the OpenAI fields we implement plus vLLM's extras (top_k, min_p, ...). A field
we do not implement is never dropped silently: `unsupported_fields()` names the extras the
routes answer with 400, except the few that cannot change an output (`HARMLESS_FIELDS`, e.g.
`user`, which OpenAI clients send). Integer and boolean fields are strict: "5" is not a
max_tokens, and true is not an n.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict

from elasticserve.sampling_params import SamplingParams
from elasticserve.server.protocol_tools import (
    ChatTool,
    DeltaToolCall,
    ResponseFormat,
    ToolCall,
    ToolChoice,
)

StrictInt = Annotated[int, Strict()]
StrictBool = Annotated[bool, Strict()]
# a float field takes ints too (JSON has one number type), but not strings
Number = Annotated[float, Strict()]
TokenIds = list[StrictInt]


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


# request fields accepted and ignored: none of them changes what the model generates
HARMLESS_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "request_id"})


# ---- errors ------------------------------------------------------------------------------------
class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# ---- models list -------------------------------------------------------------------------------
class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "elasticserve"
    root: str | None = None  # the served model an alias names (vLLM's field)
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- requests ----------------------------------------------------------------------------------
class StreamOptions(OpenAIModel):
    include_usage: StrictBool = False


class SamplingFields(OpenAIModel):
    """Fields shared by both endpoints; `sampling_params` turns them into engine parameters."""

    # extras are kept (not dropped) so that unsupported_fields() can name them
    model_config = ConfigDict(extra="allow")

    # optional when one model is served (the route resolves it)
    model: str | None = None
    n: StrictInt = 1
    temperature: Number | None = None
    top_p: Number | None = None
    seed: StrictInt | None = None
    stop: str | list[str] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    logit_bias: dict[str, Number] | None = None
    # vLLM extras
    top_k: StrictInt | None = None
    min_p: Number | None = None
    repetition_penalty: Number | None = None
    min_tokens: StrictInt | None = None
    ignore_eos: StrictBool | None = None
    stop_token_ids: list[StrictInt] | None = None
    skip_special_tokens: StrictBool | None = None
    include_stop_str_in_output: StrictBool | None = None
    use_beam_search: StrictBool | None = None
    length_penalty: Number | None = None
    early_stopping: StrictBool | None = None
    # latency targets (vLLM-style extra fields; the model's --slo-* defaults otherwise)
    slo_ttft_ms: Number | None = None
    slo_tpot_ms: Number | None = None

    def base_params(self) -> dict[str, Any]:
        """The SamplingParams keyword arguments given by this request (None means default)."""
        names = ("n", "temperature", "top_p", "seed", "stop", "presence_penalty",
                 "frequency_penalty", "top_k", "min_p", "repetition_penalty", "min_tokens",
                 "ignore_eos", "stop_token_ids", "skip_special_tokens",
                 "include_stop_str_in_output", "use_beam_search", "length_penalty",
                 "early_stopping", "slo_ttft_ms", "slo_tpot_ms")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}

    def unsupported_fields(self) -> list[str]:
        """Fields of the body that no route reads and that could change the output."""
        extra = self.model_extra or {}
        return sorted(k for k, v in extra.items() if k not in HARMLESS_FIELDS and v is not None)

    @property
    def served_model(self) -> str:
        """The served name to report, set into `model` by the route that resolved it."""
        assert self.model is not None, "the route resolves model before serving"
        return self.model

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | TokenIds | list[TokenIds]
    max_tokens: StrictInt | None = 16
    best_of: StrictInt | None = None
    logprobs: StrictInt | None = None
    echo: StrictBool = False
    suffix: str | None = None
    response_format: ResponseFormat | None = None
    # vLLM extra: logprobs of the prompt tokens, returned as choices[i].prompt_logprobs
    prompt_logprobs: StrictInt | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of prompts (text or token ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            return []
        if isinstance(p[0], int):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]

    def sampling_params(self) -> SamplingParams:
        kwargs = self.base_params()
        kwargs.update(max_tokens=self.max_tokens, logprobs=self.logprobs,
                      prompt_logprobs=self.prompt_logprobs)
        if self.echo and self.logprobs is not None:
            # echoed prompt tokens carry logprobs too (lm-eval's loglikelihood reads them)
            kwargs["prompt_logprobs"] = max(self.logprobs, self.prompt_logprobs or 0)
        if self.echo and self.max_tokens == 0:
            # the prompt alone: the engine samples one token, which the response drops
            kwargs["max_tokens"] = 1
        if self.best_of is not None:
            kwargs["best_of"] = self.best_of
        return SamplingParams(**kwargs)


class TextPart(OpenAIModel):
    type: Literal["text"]
    text: str


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None
    response_format: ResponseFormat | None = None
    tools: list[ChatTool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    # OpenAI's deprecated predecessors of tools: refused by name, not silently ignored
    functions: list[Any] | None = None
    function_call: Any = None

    def conversation(self) -> list[dict[str, Any]]:
        """The messages as chat templates take them (tool calls' arguments as objects)."""
        return template_messages(self.messages)

    def sampling_params(self) -> SamplingParams:
        kwargs = self.base_params()
        limit = self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens
        # no limit: the engine stops at EOS or max_model_len, as OpenAI does for chat
        kwargs["max_tokens"] = limit
        if self.logprobs:
            kwargs["logprobs"] = self.top_logprobs or 0
        return SamplingParams(**kwargs)


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as chat templates take them (/v1/chat/completions and /tokenize alike)."""
    return [_template_message(m) for m in messages]


def _template_message(m: ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m.role, "content": m.text()}
    if m.tool_calls:
        # templates (HF's, ours) render arguments with tojson: give them the object (as vLLM)
        out["tool_calls"] = [
            {"id": c.id, "type": c.type,
             "function": {"name": c.function.name, "arguments": _json_or_text(c.function.arguments)}}
            for c in m.tool_calls]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if m.name is not None:
        out["name"] = m.name
    return out


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


# ---- responses ---------------------------------------------------------------------------------
class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> UsageInfo:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: random_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None
