"""Prefill/decode disaggregation between two engines in one process (engine/pd.py), KV moved by
the copy connector: outputs equal a colocated engine's for mixed prompts with prefix caching,
seeded n=2 sampling and a decode side forced to preempt; every block comes back."""

from __future__ import annotations

from typing import Any

import pytest

from elasticserve import LLM, SamplingParams
from elasticserve.engine.kv_connector import (
    CopyConnector,
    HandOffRefused,
    PageConnector,
    PageOwnershipError,
)
from elasticserve.engine.llm_engine import LLMEngine
from elasticserve.engine.pd import DecodeSide, PrefillSide
from tests.engine.conftest import mixed_prompts
from tests.helpers import run_until_done

KiB = 1 << 10
BLOCK = 16 * KiB  # one tiny-model block


def pd_pair(model: str, **decode_kwargs: Any) -> tuple[LLMEngine, LLMEngine]:
    prefill = LLM(model, page_size=BLOCK, enable_prefix_caching=True).engine
    decode = LLM(model, page_size=BLOCK, enable_prefix_caching=True, **decode_kwargs).engine
    prefill.pd = PrefillSide(prefill, CopyConnector(prefill.kv.tensor, "p"))
    decode.pd = DecodeSide(decode, CopyConnector(decode.kv.tensor, "d"))
    return prefill, decode


def run_pd(prefill: LLMEngine, decode: LLMEngine, prompts: list[list[int]],
           params: SamplingParams) -> tuple[dict[str, Any], list[str]]:
    """What the front does: prefill, hand over, decode, release; integrity after each step."""
    ids = [prefill.add_request({"prompt_token_ids": p}, params) for p in prompts]
    done: dict[str, Any] = {}
    assert isinstance(prefill.pd, PrefillSide) and isinstance(decode.pd, DecodeSide)
    for _ in range(2000):
        if not (prefill.has_unfinished_requests() or decode.has_unfinished_requests()):
            break
        if prefill.has_unfinished_requests():
            done.update({o.request_id: o for o in prefill.step() if o.finished})
        for handoff in prefill.handoffs:
            decode.pd.adopt(handoff)
        prefill.handoffs.clear()
        if decode.has_unfinished_requests():
            done.update({o.request_id: o for o in decode.step() if o.finished})
        for rid in decode.pd.pop_received():
            assert prefill.pd.release(rid)
        prefill.check_integrity()
        decode.check_integrity()
    assert not prefill.pd.held
    return done, ids


def colocated(model: str, prompts: list[list[int]], params: SamplingParams) -> list[Any]:
    engine = LLM(model, page_size=BLOCK, enable_prefix_caching=True).engine
    ids = [engine.add_request({"prompt_token_ids": p}, params) for p in prompts]
    done = run_until_done(engine, each_step=engine.check_integrity)
    engine.close()
    return [done[rid].outputs for rid in ids]


def completions(done: dict[str, Any], ids: list[str]) -> list[Any]:
    return [done[rid].outputs for rid in ids]


def same(a: list[Any], b: list[Any]) -> None:
    assert [[(c.token_ids, c.text, c.finish_reason) for c in outs] for outs in a] == \
        [[(c.token_ids, c.text, c.finish_reason) for c in outs] for outs in b]


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=20, temperature=0.0),
    SamplingParams(max_tokens=12, temperature=0.9, n=2, seed=7),
], ids=["greedy", "n2-seeded"])
def test_pd_equals_colocated(tiny_llama: str, params: SamplingParams) -> None:
    prompts = mixed_prompts(tiny_llama, 8)
    prefill, decode = pd_pair(tiny_llama)
    try:
        expected = colocated(tiny_llama, prompts, params)
        for wave in range(2):  # the second wave hits the prefill side's prefix cache
            done, ids = run_pd(prefill, decode, prompts, params)
            same(completions(done, ids), expected)
            assert (prefill.stats()["prefix_cache_hit_tokens"] > 0) == (wave == 1)
        assert prefill.pd is not None and decode.pd is not None
        handed = 2 * len(prompts) * params.n
        assert decode.pd.stats.sequences == prefill.pd.stats.sequences == handed
        assert decode.pd.stats.bytes_copied > 0  # the copy connector moved every block
        assert decode.stats()["prefix_cache_hit_tokens"] == 0  # it adopted KV, computed none
        for engine in (prefill, decode):
            assert engine.kv_manager.pool.num_used == 0
    finally:
        prefill.close()
        decode.close()


def test_pd_with_preemption_on_the_decode_side(tiny_llama: str) -> None:
    params = SamplingParams(max_tokens=40, temperature=0.0)
    prompts = [[(i * 31 + j * 7) % 400 + 3 for j in range(50)] for i in range(8)]
    prefill, decode = pd_pair(tiny_llama, kv_cache_max_bytes=20 * BLOCK, kv_reserve_pages=0)
    try:
        done, ids = run_pd(prefill, decode, prompts, params)
        same(completions(done, ids), colocated(tiny_llama, prompts, params))
        assert decode.stats()["preemptions"] > 0
        assert decode.kv_manager.pool.num_used == 0
    finally:
        prefill.close()
        decode.close()


def test_aborts_free_both_sides(tiny_llama: str) -> None:
    params = SamplingParams(max_tokens=30, temperature=0.0)
    prefill, decode = pd_pair(tiny_llama)
    try:
        assert isinstance(prefill.pd, PrefillSide) and isinstance(decode.pd, DecodeSide)
        for p in mixed_prompts(tiny_llama, 4):
            prefill.add_request({"prompt_token_ids": p}, params)
        prefill.step()  # every prompt fits one step: all handed over
        handoffs, prefill.handoffs = list(prefill.handoffs), []
        assert handoffs and prefill.kv_manager.pool.num_used > 0
        decode.pd.adopt(handoffs[0])
        decode.pd.adopt(handoffs[1])
        decode.abort_request(handoffs[0].request_id)  # aborted before its KV arrived
        decode.step()
        assert decode.pd.pop_received() == [handoffs[1].request_id]
        decode.abort_request(handoffs[1].request_id)  # aborted while decoding
        for h in handoffs:  # the front releases every hand-off, whatever became of it
            assert prefill.pd.release(h.request_id)
        assert not prefill.pd.release(handoffs[0].request_id)  # once only
        assert prefill.kv_manager.pool.num_used == decode.kv_manager.pool.num_used == 0
        prefill.check_integrity()
        decode.check_integrity()
    finally:
        prefill.close()
        decode.close()


class _Lender:
    """A page lender whose takes fail the way `take_error` says."""

    def __init__(self, take_error: Exception) -> None:
        self.take_error = take_error
        self.offered: list[str] = []

    def offer(self, handoff_id: str, indices: Any) -> None:
        self.offered.append(handoff_id)

    def take(self, peer: str, handoff_id: str, mine: Any) -> None:
        raise self.take_error

    def withdraw(self, handoff_id: str) -> int:
        return 0


@pytest.mark.parametrize("error", [HandOffRefused("offer gone"), OSError("mmap failed")],
                         ids=["refused", "half-done"])
def test_a_failed_take(tiny_llama: str, error: Exception) -> None:
    """Refused: that request ends with an error and the engine goes on. Failed half-way (the
    broker swapped, the remap failed): the step raises PageOwnershipError, so the worker ends
    and the broker takes its pages back, instead of serving from pages it no longer owns."""
    lender = _Lender(error)
    prefill, decode = pd_pair(tiny_llama)
    try:
        for engine, side in ((prefill, PrefillSide), (decode, DecodeSide)):
            engine.pd = side(engine, PageConnector(engine.kv.tensor, "w", lender, BLOCK, BLOCK))
        rid = prefill.add_request({"prompt_token_ids": list(range(3, 40))},
                                  SamplingParams(max_tokens=8, temperature=0.0))
        prefill.step()
        assert lender.offered == [rid] and prefill.handoffs
        assert isinstance(decode.pd, DecodeSide)
        decode.pd.adopt(prefill.handoffs[0])
        if isinstance(error, HandOffRefused):
            outs = decode.step()
            assert outs[0].finished and "KV hand-off" in str(outs[0].error)
            assert decode.kv_manager.pool.num_used == 0
            decode.check_integrity()
        else:
            with pytest.raises(PageOwnershipError):
                decode.step()
    finally:
        prefill.close()
        decode.close()


def test_a_lent_block_leaves_the_prefix_cache_when_it_is_offered(tiny_llama: str) -> None:
    """From the offer on the decode worker may own the page: a later prompt with the same
    prefix must not hit it (it would read a blank page once the offer is withdrawn)."""
    lender = _Lender(HandOffRefused("unused"))
    prefill, _decode = pd_pair(tiny_llama)
    try:
        prefill.pd = PrefillSide(prefill, PageConnector(prefill.kv.tensor, "p", lender, BLOCK,
                                                        BLOCK))
        prompt = list(range(3, 60))  # three full blocks and a partial one
        params = SamplingParams(max_tokens=8, temperature=0.0)
        prefill.add_request({"prompt_token_ids": prompt}, params)
        prefill.step()
        (handoff,) = prefill.handoffs
        lent = [b for b, _ in handoff.kv.pages]
        assert len(lent) == 4 and not any(prefill.kv_manager.pool.is_cached(b) for b in lent)
        prefill.add_request({"prompt_token_ids": prompt + [7, 8]}, params)
        prefill.step()  # the same prefix, while the first request's pages are on offer
        assert prefill.stats()["prefix_cache_hit_tokens"] == 0
        assert isinstance(prefill.pd, PrefillSide)
        assert prefill.pd.release_all() == 2
        prefill.check_integrity()
    finally:
        prefill.close()
        _decode.close()


def test_a_request_failed_before_its_kv_arrived_leaves_nothing_pending(tiny_llama: str) -> None:
    prefill, decode = pd_pair(tiny_llama)
    try:
        assert isinstance(prefill.pd, PrefillSide) and isinstance(decode.pd, DecodeSide)
        prefill.add_request({"prompt_token_ids": list(range(3, 30))},
                            SamplingParams(max_tokens=8, temperature=0.0))
        prefill.step()
        decode.pd.adopt(prefill.handoffs[0])
        decode.scheduler.fail_all("the model cannot run")  # e.g. its weights failed to load
        outs = decode.step()
        assert outs[0].finished and outs[0].error == "the model cannot run"
        assert not decode.pd.pending and decode.kv_manager.pool.num_used == 0
        assert prefill.pd.release_all() == 1
    finally:
        prefill.close()
        decode.close()


def test_roles_refuse_layerwise_residency(tiny_llama: str) -> None:
    engine = LLM(tiny_llama, host_kv_cache_bytes=1 << 20, layerwise_residency=True,
                 attention_backend="native").engine
    try:
        for side in (PrefillSide, DecodeSide):
            with pytest.raises(ValueError, match="layerwise_residency"):
                side(engine, CopyConnector(engine.kv.tensor, "x"))
    finally:
        engine.close()
