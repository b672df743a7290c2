"""A request the scheduler gives up on ends as a finished output with an error; the engine
keeps serving and holds nothing of it."""

from __future__ import annotations

from elasticserve import SamplingParams
from elasticserve.engine.llm_engine import LLMEngine
from elasticserve.request import FinishReason


def test_request_that_outgrows_a_static_cache_ends_with_an_error(tiny_llama: str) -> None:
    # 4 blocks of 16 tokens: the prompt fits, its 100 generated tokens never can
    engine = LLMEngine.from_args(tiny_llama, kv_cache_mode="static", num_kv_blocks=4,
                                 swap_space=0)
    grow = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
    big = engine.add_request({"prompt_token_ids": [5, 6, 7]}, grow)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    [out] = [o for o in outputs if o.request_id == big]
    assert out.finished and out.error is not None and "outgrew" in out.error
    assert out.outputs[0].finish_reason is FinishReason.ERROR
    assert out.outputs[0].finish_reason == "error"  # the API string is unchanged
    assert big not in engine.groups and engine.stats()["blocks_used"] == 0
    engine.check_integrity()
    small = engine.add_request({"prompt_token_ids": [5, 6, 7]},
                               SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert [o.outputs[0].finish_reason for o in outputs if o.request_id == small] == ["length"]
