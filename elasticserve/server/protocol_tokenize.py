"""Pydantic models of vLLM's /tokenize and /detokenize wire format."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from elasticserve.server.protocol import ChatMessage, StrictBool, TokenIds


class TokenizeRequest(BaseModel):
    """`prompt` (completion style) or `messages` (chat style, rendered by the chat template)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: StrictBool = True
    # default: True for a prompt, False for messages (the template carries any BOS)
    add_special_tokens: StrictBool | None = None
    return_token_strs: StrictBool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: TokenIds


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    """GET /tokenizer_info (vLLM's route, which lm-eval's remote tokenizer reads)."""

    model: str
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None = None
    chat_template: str | None  # the one /v1/chat/completions renders
    vocab_size: int
    max_model_len: int
