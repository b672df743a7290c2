"""Half-precision weights and KV on every device: the cache takes the weights' dtype, and
greedy decoding stays close to fp32 (the first token of every prompt identical)."""

from __future__ import annotations

import pytest
import torch

from elasticserve import LLM, SamplingParams
from tests.engine.conftest import mixed_prompts


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_follows_fp32(tiny_llama: str, device: str, dtype: str) -> None:
    prompts = [{"prompt_token_ids": p} for p in mixed_prompts(tiny_llama, 4)]
    params = SamplingParams(max_tokens=8, temperature=0.0)
    ref = [o.outputs[0].token_ids for o in LLM(tiny_llama).generate(prompts, params)]
    llm = LLM(tiny_llama, device=device, dtype=dtype)  # type: ignore[arg-type]
    engine = llm.engine
    want = getattr(torch, dtype)
    assert engine.kv.tensor.dtype == want and engine.kv.tensor.device.type == device
    assert engine.model.model.embed_tokens.weight.dtype == want
    assert engine.model.model.embed_tokens.weight.device.type == device
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert [g[0] for g in got] == [r[0] for r in ref]
    agree = sum(a == b for g, r in zip(got, ref, strict=True) for a, b in zip(g, r, strict=True))
    assert agree >= 0.6 * sum(len(r) for r in ref)
    engine.check_integrity()
