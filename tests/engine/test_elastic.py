"""Elastic KV memory under the engine: growth, give-back, compaction, run-time resize."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from elasticserve import LLM, SamplingParams
from elasticserve.engine.llm_engine import LLMEngine
from elasticserve.errors import InvalidFieldError
from elasticserve.models.make_model import make_model
from tests.engine.conftest import ARCHS, mixed_prompts
from tests.helpers import run_until_done, tokens_of

MiB = 1 << 20


def rss_shmem() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssShmem:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssShmem in /proc/self/status")


# tiny blocks are 16 KiB (2 layers x K/V x 16 tokens x 2 heads x 32 dims x fp32): 4 per page,
# so every step's growth maps pages and every shrink unmaps them
CHURN = {"page_size": 64 * 1024, "kv_reserve_pages": 0, "kv_shrink_after_s": 0.0,
         "kv_keep_peak_s": 0.0}


@pytest.mark.parametrize("arch", ARCHS)
def test_parity_when_growing_shrinking_and_compacting_every_step(
        arch: str, model_dirs: dict[str, str], hf_greedy: Callable[..., list[list[int]]]) -> None:
    model_dir = model_dirs[arch]
    prompts = mixed_prompts(model_dir, 8)
    # staggered lengths: early finishers leave holes below live blocks, so shrinking must compact
    lengths = [20 - 2 * i for i in range(len(prompts))]
    expected = [hf_greedy(model_dir, [p], n)[0] for p, n in zip(prompts, lengths, strict=True)]
    engine = LLMEngine.from_args(model_dir, **CHURN)
    ids = [engine.add_request({"prompt_token_ids": p}, SamplingParams(max_tokens=n, temperature=0.0))
           for p, n in zip(prompts, lengths, strict=True)]
    done = run_until_done(engine, max_steps=200, each_step=engine.check_integrity)
    assert tokens_of(done, ids) == expected
    stats = engine.kv.memory_stats()
    assert stats["grow_events"] >= 3 and stats["shrink_events"] >= 3
    assert stats["compactions"] >= 1
    assert stats["kv_mapped_bytes"] == 0  # reserve 0, no live blocks: everything given back


def test_burst_memory_comes_back_when_idle(tmp_path, steady_process: int) -> None:
    # RssShmem is process-wide: steady_process stops other engines' reclaimers meanwhile
    model_dir = make_model("llama", "widekv", str(tmp_path / "wide"))
    engine = LLMEngine.from_args(model_dir, kv_cache_max_bytes=1024 * MiB,
                                 kv_shrink_after_s=0.2, enable_prefix_caching=False,
                                 max_num_batched_tokens=8192)
    reserve = engine.kv.memory_stats()["page_size"] * engine.cache_config.kv_reserve_pages
    base_rss = rss_shmem()
    prompt = list(range(1, 257))
    for i in range(68):  # 68 x 288 tokens x 16 KiB per token ~ 306 MiB of live KV
        engine.add_request({"prompt_token_ids": [(t + i) % 500 + 1 for t in prompt]},
                           SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))
    peak = {"mapped": 0, "rss": 0}

    def sample() -> None:
        peak["mapped"] = max(peak["mapped"], engine.kv.memory_stats()["kv_mapped_bytes"])
        peak["rss"] = max(peak["rss"], rss_shmem())

    run_until_done(engine, max_steps=500, each_step=sample)
    peak_mapped, peak_rss = peak["mapped"], peak["rss"]
    assert peak_mapped >= 256 * MiB
    assert peak_rss - base_rss >= 0.9 * peak_mapped  # the pages were really touched
    deadline = time.monotonic() + 2.0
    while engine.kv.memory_stats()["kv_mapped_bytes"] > reserve and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.kv.memory_stats()["kv_mapped_bytes"] <= reserve
    assert peak_rss - rss_shmem() >= 0.9 * (peak_mapped - reserve)
    engine.check_integrity()


def test_resize_at_run_time_preempts_and_never_corrupts(
        tiny_llama: str, hf_greedy: Callable[..., list[list[int]]]) -> None:
    prompts = mixed_prompts(tiny_llama)
    expected = hf_greedy(tiny_llama, prompts, 16)
    llm = LLM(tiny_llama, page_size=64 * 1024, kv_reserve_pages=0)
    engine = llm.engine
    params = SamplingParams(max_tokens=16, temperature=0.0)
    ids = [engine.add_request({"prompt_token_ids": p}, params) for p in prompts]
    for _ in range(3):
        engine.step()
    used = engine.kv.memory_stats()["kv_used_bytes"]
    llm.resize_kv_cache(max(used // 2, 128 * 1024))  # below what is in use
    assert engine.kv.memory_stats()["kv_mapped_bytes"] <= max(used // 2, 128 * 1024)
    assert engine.stats()["preemptions"] >= 1
    engine.check_integrity()
    llm.resize_kv_cache(64 * MiB)
    assert tokens_of(run_until_done(engine, max_steps=300), ids) == expected
    with pytest.raises(ValueError, match="bytes"):
        llm.resize_kv_cache(0)


def test_static_mode_keeps_its_memory_and_refuses_resize(tiny_llama: str) -> None:
    llm = LLM(tiny_llama, kv_cache_mode="static", kv_cache_bytes=8 * MiB)
    stats = llm.memory_stats()
    assert stats["kv_mapped_bytes"] == 8 * MiB
    with pytest.raises(ValueError, match="elastic"):
        llm.resize_kv_cache(4 * MiB)


def test_memory_stats_keys(tiny_llama: str) -> None:
    llm = LLM(tiny_llama)
    llm.generate("hello", SamplingParams(max_tokens=4))
    stats = llm.memory_stats()
    for key in ("page_size", "kv_reserved_bytes", "kv_mapped_bytes", "kv_used_bytes",
                "kv_cached_bytes", "pages_mapped", "grow_events", "shrink_events", "compactions"):
        assert key in stats
    assert stats["kv_reserved_bytes"] >= stats["kv_mapped_bytes"] > 0


def test_lowered_ceiling_holds_requests_until_it_rises(tiny_llama: str) -> None:
    # issue 10 item 8: a request that outgrew a lowered ceiling failed ("outgrew the whole KV
    # cache") although it fits the reserved maximum; it must wait for the ceiling to rise
    prompts = mixed_prompts(tiny_llama)[:2]
    params = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
    reference = LLMEngine.from_args(tiny_llama)
    ref_ids = [reference.add_request({"prompt_token_ids": p}, params) for p in prompts]
    expected = tokens_of(run_until_done(reference), ref_ids)

    # 16 KiB blocks of 16 tokens: one 64 KiB page holds 64 tokens, less than 100 + prompt
    llm = LLM(tiny_llama, page_size=64 * 1024, kv_reserve_pages=0, kv_cache_max_bytes=4 * MiB)
    engine = llm.engine
    first = engine.add_request({"prompt_token_ids": prompts[0]}, params)
    engine.step()
    llm.resize_kv_cache(64 * 1024)
    second = engine.add_request({"prompt_token_ids": prompts[1]}, params)
    done: dict = {}
    for _ in range(150):  # far more steps than a 100-token run takes
        done.update({o.request_id: o for o in engine.step()})
        engine.check_integrity()
    assert not done, {rid: out.error for rid, out in done.items()}
    assert engine.has_unfinished_requests()
    assert engine.kv.memory_stats()["kv_mapped_bytes"] <= 64 * 1024

    llm.resize_kv_cache(4 * MiB)  # the reserved maximum itself is allowed
    done.update(run_until_done(engine, max_steps=400, each_step=engine.check_integrity))
    assert all(done[rid].error is None for rid in (first, second))
    assert tokens_of(done, [first, second]) == expected


def test_resize_refuses_sizes_outside_the_reserved_range(tiny_llama: str) -> None:
    llm = LLM(tiny_llama, page_size=64 * 1024, kv_cache_max_bytes=4 * MiB)
    for nbytes, words in ((4 * MiB + 64 * 1024, "kv_cache_max_bytes"), (1000, "one page"),
                          (-1, "one page")):
        with pytest.raises(InvalidFieldError, match=words) as info:
            llm.resize_kv_cache(nbytes)
        assert info.value.param == "nbytes"
    assert llm.memory_stats()["kv_reserved_bytes"] == 4 * MiB  # nothing changed
