"""Offline inference shaped like vLLM's `LLM`, so users can switch without rewriting."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from elasticserve.engine.args import EngineArgs
from elasticserve.engine.llm_engine import LLMEngine, PromptInput
from elasticserve.outputs import RequestOutput
from elasticserve.sampling_params import SamplingParams


class LLM:
    """`LLM(model=DIR, ...)`; keyword arguments are those of EngineArgs."""

    def __init__(self, model: str, **kwargs: Any) -> None:
        unknown = set(kwargs) - set(EngineArgs.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown LLM argument(s): {sorted(unknown)}")
        self.engine = LLMEngine(EngineArgs(model=model, **kwargs))

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(self, prompts: PromptInput | Sequence[PromptInput],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in input order.

        All inputs are validated before any is queued: a bad one raises ValueError and the
        engine stays ready for the next call.
        """
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        params = self._params_list(sampling_params, len(prompts))
        checked = [self.engine.validate(prompt, p) for prompt, p in zip(prompts, params, strict=True)]
        ids = [self.engine.add_request({"prompt": text, "prompt_token_ids": token_ids}, p)
               for (text, token_ids), p in zip(checked, params, strict=True)]
        return self._run(ids)

    def chat(self, messages: list[dict[str, str]] | list[list[dict[str, str]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tokenizer = self.engine.tokenizer
        prompts: list[PromptInput] = [
            tokenizer.apply_chat_template(conv, add_generation_prompt=True)  # type: ignore[arg-type]
            for conv in conversations]
        return self.generate(prompts, sampling_params)

    def stats(self) -> dict[str, Any]:
        return self.engine.stats()

    def memory_stats(self) -> dict[str, int]:
        return self.engine.kv.memory_stats()

    def resize_kv_cache(self, nbytes: int) -> None:
        """Set the KV cache size at run time (elastic mode); shrinking preempts, never corrupts."""
        self.engine.resize_kv_cache(nbytes)

    def _params_list(self, params: SamplingParams | Sequence[SamplingParams] | None,
                     count: int) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams() for _ in range(count)]
        if isinstance(params, SamplingParams):
            return [params] * count
        params = list(params)
        if len(params) != count:
            raise ValueError(f"sampling_params has {len(params)} entries for {count} prompts")
        return params

    def _run(self, request_ids: list[str]) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        wanted = set(request_ids)
        while wanted - done.keys():
            for output in self.engine.step():
                done[output.request_id] = output
        return [done[rid] for rid in request_ids]
