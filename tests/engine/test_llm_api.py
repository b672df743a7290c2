"""The offline API: input checks, leaks, sharing, sampling features, stats."""

from __future__ import annotations

import pytest

from elasticserve import LLM, SamplingParams
from elasticserve.engine.llm_engine import LLMEngine
from tests.engine.conftest import mixed_prompts
from tests.helpers import run_until_done


@pytest.fixture(scope="module")
def llm(tiny_llama: str) -> LLM:
    return LLM(tiny_llama, max_model_len=256)


def _ids(p: list[int]) -> dict[str, list[int]]:
    return {"prompt_token_ids": p}


@pytest.mark.parametrize("prompt, params, field", [
    ("", SamplingParams(), "prompt"),
    ({"prompt_token_ids": []}, SamplingParams(), "prompt_token_ids"),
    ({"prompt_token_ids": [1] * 300}, SamplingParams(), "max_model_len"),
    ({"prompt_token_ids": [10**6]}, SamplingParams(), "prompt_token_ids"),
])
def test_bad_prompt_is_a_value_error_and_engine_keeps_serving(
        llm: LLM, prompt: object, params: SamplingParams, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        llm.generate([prompt, "good prompt"], params)  # type: ignore[list-item]
    out = llm.generate("still serving", SamplingParams(max_tokens=4, temperature=0))
    assert len(out[0].outputs[0].token_ids) >= 1
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("kwargs, field", [
    ({"max_tokens": 0}, "max_tokens"), ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
])
def test_bad_sampling_params_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_unknown_model_directory_is_a_value_error(tmp_path) -> None:
    with pytest.raises(ValueError, match="does-not-exist"):
        LLM(str(tmp_path / "does-not-exist"))


def test_abort_mid_generation_frees_every_block(tiny_llama: str) -> None:
    engine = LLMEngine.from_args(tiny_llama)
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    ids = [engine.add_request(_ids(p), params) for p in mixed_prompts(tiny_llama)]
    for _ in range(5):
        engine.step()
    assert engine.stats()["blocks_used"] > 0
    for rid in ids:
        engine.abort_request(rid)
    engine.check_integrity()
    assert engine.stats()["blocks_used"] == 0
    assert not engine.has_unfinished_requests()


def _peak_blocks(engine: LLMEngine) -> int:
    peak = [0]

    def sample() -> None:
        peak[0] = max(peak[0], engine.stats()["blocks_used"])

    run_until_done(engine, each_step=sample)
    return peak[0]


def test_parallel_sampling_and_beams_share_blocks(tiny_llama: str) -> None:
    prompt = _ids(mixed_prompts(tiny_llama)[4] * 2)  # a long prompt, short outputs
    sample = SamplingParams(n=4, max_tokens=8, temperature=1.0, seed=1, ignore_eos=True)
    beam = SamplingParams(n=4, best_of=4, use_beam_search=True, max_tokens=8, temperature=0.0,
                          ignore_eos=True)
    single = SamplingParams(max_tokens=8, temperature=1.0, seed=1, ignore_eos=True)

    def peak(requests: list[SamplingParams]) -> int:
        engine = LLMEngine.from_args(tiny_llama, enable_prefix_caching=False, block_size=4)
        for p in requests:
            engine.add_request(prompt, p)
        result = _peak_blocks(engine)
        engine.check_integrity()
        assert engine.stats()["blocks_used"] == 0
        return result

    independent = peak([single] * 4)
    assert peak([sample]) <= 0.5 * independent
    assert peak([beam]) <= 0.5 * independent


def test_seed_reproducible_and_children_differ(llm: LLM) -> None:
    params = SamplingParams(n=3, max_tokens=12, temperature=1.0, seed=1234, ignore_eos=True)
    a = llm.generate("def main():", params)[0]
    b = llm.generate("def main():", params)[0]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert len({tuple(c.token_ids) for c in a.outputs}) > 1


def test_stop_string_and_logprobs(llm: LLM) -> None:
    base = llm.generate("import os", SamplingParams(max_tokens=24, temperature=0,
                                                    ignore_eos=True))[0].outputs[0]
    stop = base.text[5:8]
    assert stop
    out = llm.generate("import os", SamplingParams(max_tokens=24, temperature=0, stop=[stop],
                                                   ignore_eos=True, logprobs=3))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == base.text[: base.text.find(stop)]
    assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids)
    for tok, entry in zip(out.token_ids, out.logprobs, strict=True):
        assert tok in entry and max(entry.values()) == entry[tok]  # greedy picks the top one


def test_max_tokens_min_tokens_and_stop_token_ids(llm: LLM) -> None:
    out = llm.generate("x = 1", SamplingParams(max_tokens=7, temperature=0, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 7 and out.outputs[0].finish_reason == "length"
    first = out.outputs[0].token_ids[2]
    stopped = llm.generate("x = 1", SamplingParams(max_tokens=7, temperature=0, ignore_eos=True,
                                                   stop_token_ids=[first]))[0].outputs[0]
    assert stopped.token_ids[-1] == first and stopped.finish_reason == "stop"
    forced = llm.generate("x = 1", SamplingParams(max_tokens=7, min_tokens=5, temperature=0,
                                                  stop_token_ids=[first]))[0].outputs[0]
    assert first not in forced.token_ids[:5]


def test_prompt_logprobs(llm: LLM) -> None:
    out = llm.generate("def f(x): return x", SamplingParams(max_tokens=2, prompt_logprobs=2))[0]
    assert out.prompt_logprobs is not None
    assert out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == len(out.prompt_token_ids)
    for tok, entry in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:], strict=True):
        assert entry is not None and tok in entry


def test_chat_and_stats(llm: LLM) -> None:
    outs = llm.chat([{"role": "user", "content": "hello"}], SamplingParams(max_tokens=4))
    assert outs[0].prompt is not None and "hello" in outs[0].prompt
    stats = llm.stats()
    for key in ("steps", "preemptions", "swaps_out", "prefix_cache_hit_tokens", "blocks_used",
                "blocks_total"):
        assert key in stats
    assert stats["steps"] > 0
