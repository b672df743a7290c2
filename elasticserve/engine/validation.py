"""Request validation: tokenize a prompt and check that the request can ever run here.

Reads only the tokenizer and fixed limits, so it is safe off the step thread (the server
validates in worker threads). Every refusal is an InvalidFieldError naming its field.
"""

from __future__ import annotations

from typing import Any

from elasticserve.config import SchedulerConfig
from elasticserve.errors import InvalidFieldError, PromptTooLargeError, check_unicode
from elasticserve.models.tokenizer import Tokenizer
from elasticserve.sampling_params import SamplingParams

PromptInput = str | dict[str, Any]


def tokenize_prompt(tokenizer: Tokenizer, prompt: PromptInput, vocab_size: int
                    ) -> tuple[str | None, list[int]]:
    """(text, token ids) of a text prompt or of {"prompt_token_ids": [...], "prompt": text}."""
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidFieldError("prompt", "prompt must not be empty")
        check_unicode("prompt", prompt)
        return prompt, tokenizer.encode(prompt)
    if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
        ids = prompt["prompt_token_ids"]
        if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
            raise InvalidFieldError("prompt_token_ids",
                                    "prompt_token_ids must be a list of integers")
        if not ids:
            raise InvalidFieldError("prompt_token_ids", "prompt_token_ids must not be empty")
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise InvalidFieldError(
                "prompt_token_ids",
                f"prompt_token_ids has ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
        return prompt.get("prompt"), list(ids)
    raise InvalidFieldError("prompt", "prompt must be a string or a dict with 'prompt_token_ids'")


def check_fits(token_ids: list[int], params: SamplingParams, sched: SchedulerConfig,
               block_size: int, max_blocks: int) -> None:
    """Refuse a request that could never be scheduled: wider than the batch, longer than
    max_model_len, or larger than the whole KV cache (the last two: PromptTooLargeError)."""
    check_group_width(params, sched.max_num_seqs)
    max_len = sched.max_model_len
    if len(token_ids) >= max_len:
        raise PromptTooLargeError(
            "prompt", f"prompt is {len(token_ids)} tokens, which does not leave room to "
            f"generate within max_model_len={max_len}")
    need = -(-(len(token_ids) + 1) // block_size) * params.actual_best_of
    if need > max_blocks:
        raise PromptTooLargeError(
            "prompt", f"prompt needs {need} KV blocks but the cache can never hold more than "
            f"{max_blocks} (raise kv_cache_max_bytes, or num_kv_blocks / kv_cache_bytes "
            f"for a static cache)")


def check_group_width(params: SamplingParams, max_num_seqs: int) -> None:
    """A group runs all its sequences in one step (admitted and preempted whole), so one
    wider than max_num_seqs could never be scheduled and would wait forever."""
    width = params.actual_best_of
    if width <= max_num_seqs:
        return
    field = "n" if params.n > max_num_seqs else \
        "beam_width" if params.use_beam_search else "best_of"
    raise InvalidFieldError(
        field, f"{field}={getattr(params, field)} asks for {width} sequences per request, "
               f"more than this model runs at once (max_num_seqs={max_num_seqs})")
