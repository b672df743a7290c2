"""Greedy outputs equal transformers' generate, token for token, under every engine mode."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from elasticserve import LLM, SamplingParams
from tests.engine.conftest import ARCHS, mixed_prompts

MAX_NEW = 16


def _engine_tokens(model_dir: str, prompts: list[list[int]], **kwargs: Any) -> list[list[int]]:
    llm = LLM(model_dir, **kwargs)
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    llm.engine.check_integrity()
    assert llm.stats()["blocks_used"] == 0
    return [o.outputs[0].token_ids for o in outs]


MODES: dict[str, dict[str, Any]] = {
    "prefix_cache_on": {"enable_prefix_caching": True},
    "prefix_cache_off": {"enable_prefix_caching": False},
    "chunked_prefill": {"max_num_batched_tokens": 16},
    "static_cache": {"kv_cache_mode": "static"},
    "preempt_recompute": {"num_kv_blocks": 20, "block_size": 4, "preemption_mode": "recompute",
                          "kv_cache_mode": "static"},
    "preempt_swap": {"num_kv_blocks": 20, "block_size": 4, "preemption_mode": "swap",
                     "kv_cache_mode": "static"},
    # the default ("auto") decodes with the C kernel where it builds: keep the torch path honest
    "torch_attention": {"attention_backend": "torch"},
}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", list(MODES))
def test_greedy_matches_transformers(arch: str, mode: str, model_dirs: dict[str, str],
                                     hf_greedy: Callable[..., list[list[int]]]) -> None:
    model_dir = model_dirs[arch]
    prompts = mixed_prompts(model_dir)
    expected = hf_greedy(model_dir, prompts, MAX_NEW)
    got = _engine_tokens(model_dir, prompts, **MODES[mode])
    assert got == expected


def test_triton_backend_matches_transformers(tiny_llama: str,
                                            hf_greedy: Callable[..., list[list[int]]]) -> None:
    """The Triton kernel for all attention (Triton's interpreter on a CPU: ~15 s, so one
    architecture), chunked prefill over cached prefixes included."""
    prompts = mixed_prompts(tiny_llama)
    got = _engine_tokens(tiny_llama, prompts, attention_backend="triton", max_num_batched_tokens=16)
    assert got == hf_greedy(tiny_llama, prompts, MAX_NEW)


def test_default_backend_is_native_where_it_builds(tiny_llama: str) -> None:
    from elasticserve.kernels import native

    engine = LLM(tiny_llama).engine
    assert engine.runner.native_decode is native.available()
    assert _native_ops_on(engine.model) is native.available()
    engine.sleep()
    assert engine.asleep and engine.wake()  # wake reloads the model: the ops come back too
    assert _native_ops_on(engine.model) is native.available()
    torch_engine = LLM(tiny_llama, attention_backend="torch").engine
    assert torch_engine.runner.native_decode is False
    assert _native_ops_on(torch_engine.model) is False


def _native_ops_on(model: Any) -> bool:
    flags = {m.native for m in model.modules() if hasattr(m, "native")}
    assert len(flags) == 1, "every fused-op module follows the engine's choice"
    return flags.pop()


def test_preemption_really_happens(tiny_llama: str) -> None:
    for mode in ("swap", "recompute"):
        llm = LLM(tiny_llama, **MODES[f"preempt_{mode}"])
        prompts = mixed_prompts(tiny_llama)
        llm.generate([{"prompt_token_ids": p} for p in prompts],
                     SamplingParams(max_tokens=MAX_NEW, temperature=0.0))
        stats = llm.stats()
        assert stats["preemptions"] > 0
        assert (stats["swaps_out"] > 0) == (mode == "swap")
        assert (stats["recomputes"] > 0) == (mode == "recompute")


def test_prefix_cache_hits_on_repeat(tiny_llama: str,
                                     hf_greedy: Callable[..., list[list[int]]]) -> None:
    prompts = mixed_prompts(tiny_llama)
    llm = LLM(tiny_llama)
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)
    first = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    hits_before = llm.stats()["prefix_cache_hit_tokens"]
    second = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    assert llm.stats()["prefix_cache_hit_tokens"] > hits_before
    assert [o.outputs[0].token_ids for o in first] == [o.outputs[0].token_ids for o in second]
    assert any(o.num_cached_tokens > 0 for o in second)


def test_n3_greedy_children_are_identical(tiny_llama: str,
                                          hf_greedy: Callable[..., list[list[int]]]) -> None:
    prompts = mixed_prompts(tiny_llama, 3)
    expected = hf_greedy(tiny_llama, prompts, MAX_NEW)
    llm = LLM(tiny_llama)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(n=3, max_tokens=MAX_NEW, temperature=0.0))
    for out, ref in zip(outs, expected, strict=True):
        assert len(out.outputs) == 3
        assert all(c.token_ids == ref for c in out.outputs)
    assert llm.stats()["blocks_used"] == 0


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_beam_search_matches_transformers(arch: str, model_dirs: dict[str, str],
                                          hf_greedy: Callable[..., list[list[int]]]) -> None:
    model_dir = model_dirs[arch]
    prompts = mixed_prompts(model_dir, 4)
    width = 3
    expected = hf_greedy(model_dir, prompts, 12, num_beams=width, num_return_sequences=width,
                         early_stopping=False, length_penalty=1.0)
    llm = LLM(model_dir)
    params = SamplingParams(n=width, best_of=width, use_beam_search=True, max_tokens=12,
                            temperature=0.0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    for i, out in enumerate(outs):
        got = [c.token_ids for c in out.outputs]
        eos = llm.get_tokenizer().eos_token_ids
        want = [_strip_pad(t, eos) for t in expected_for(expected, i, width)]
        assert got[0] == want[0], f"prompt {i}: best beam differs"
        assert got == want
    llm.engine.check_integrity()
    assert llm.stats()["blocks_used"] == 0


def expected_for(flat: list[list[int]], i: int, width: int) -> list[list[int]]:
    return flat[i * width:(i + 1) * width]


def _strip_pad(tokens: list[int], eos: frozenset[int]) -> list[int]:
    # transformers pads shorter finished beams after their eos; ours simply end there
    for i, tok in enumerate(tokens):
        if tok in eos:
            return tokens[: i + 1]
    return tokens
