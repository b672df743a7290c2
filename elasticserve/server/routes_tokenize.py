"""vLLM's /tokenize, /detokenize and /tokenizer_info: a model's tokenizer over HTTP, with the
chat template the chat endpoint uses (so a client can count a conversation's tokens before
sending it; lm-eval's remote tokenizer needs no local copy of the model)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

from fastapi import FastAPI

from elasticserve.engine.protocol import EngineClient
from elasticserve.server.errors import APIError, error_responses
from elasticserve.server.protocol import template_messages
from elasticserve.server.protocol_tokenize import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
)
from elasticserve.server.serving import render_chat, token_text

# a request's `model` -> its served name (APIError 400/404)
Resolve = Callable[[str | None], str]


def add_tokenize_routes(app: FastAPI, engines: Mapping[str, EngineClient], resolve: Resolve,
                        chat_template: str | None) -> None:
    """POST /tokenize and /detokenize, GET /tokenizer_info."""

    @app.get("/tokenizer_info", responses=error_responses(400, 404))
    async def tokenizer_info(model: str | None = None) -> TokenizerInfo:
        name = resolve(model)
        engine = engines[name]
        tok = engine.tokenizer
        return TokenizerInfo(model=name, bos_token=tok.bos_token, eos_token=tok.eos_token,
                             chat_template=chat_template or tok.chat_template,
                             vocab_size=tok.vocab_size, max_model_len=engine.max_model_len)

    @app.post("/tokenize", responses=error_responses(400, 404))
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        engine = engines[resolve(body.model)]
        return await asyncio.to_thread(_tokenize, engine, body, chat_template)

    @app.post("/detokenize", responses=error_responses(400, 404))
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        engine = engines[resolve(body.model)]
        vocab = engine.tokenizer.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token ids must be in [0, {vocab}), got {bad[:5]}", "tokens")
        text = await asyncio.to_thread(engine.tokenizer.decode, body.tokens, False)
        return DetokenizeResponse(prompt=text)


def _tokenize(engine: EngineClient, body: TokenizeRequest,
              chat_template: str | None) -> TokenizeResponse:
    tokenizer = engine.tokenizer
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give exactly one of prompt and messages", "prompt")
    if body.messages is not None:
        text = render_chat(tokenizer, template_messages(body.messages),
                           body.add_generation_prompt, chat_template)
        # the template already carries any BOS the model wants
        special = False if body.add_special_tokens is None else body.add_special_tokens
    else:
        assert body.prompt is not None
        text = body.prompt
        special = True if body.add_special_tokens is None else body.add_special_tokens
    ids = tokenizer.encode(text, add_special_tokens=special)
    strs = [token_text(tokenizer, t) for t in ids] if body.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=engine.max_model_len, tokens=ids,
                            token_strs=strs)
