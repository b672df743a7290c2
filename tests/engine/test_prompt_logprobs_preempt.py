"""Prompt logprobs survive a recompute preemption: the re-fed prompt overwrites its entries
instead of appending them a second time (lm-eval's loglikelihood reads them by position)."""

from __future__ import annotations

import pytest

from elasticserve import LLM, SamplingParams
from tests.engine.conftest import mixed_prompts
from tests.engine.test_parity import MODES


def test_prompt_logprobs_after_recompute_equal_an_unpreempted_run(tiny_llama: str) -> None:
    prompts = mixed_prompts(tiny_llama)
    params = SamplingParams(max_tokens=16, temperature=0.0, prompt_logprobs=1)
    inputs = [{"prompt_token_ids": p} for p in prompts]
    llm = LLM(tiny_llama, **MODES["preempt_recompute"])
    outs = llm.generate(inputs, params)
    assert llm.stats()["recomputes"] > 0
    ref = LLM(tiny_llama).generate(inputs, params)
    for prompt, out, want in zip(prompts, outs, ref, strict=True):
        assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(prompt)
        assert out.prompt_logprobs[0] is None
        for pos in range(1, len(prompt)):
            got, exp = out.prompt_logprobs[pos], want.prompt_logprobs[pos]
            assert got is not None and exp is not None
            assert got[prompt[pos]] == pytest.approx(exp[prompt[pos]], abs=1e-4)
