"""Layer-wise onload on the real engine: sequences forced through the host tier keep their
greedy outputs with the option on, layer 0 computes while later layers are still being copied,
and a failing or stuck copier fails the step instead of hanging it."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest
import torch

from elasticserve import LLM, SamplingParams
from elasticserve.worker.layer_onload import OnloadError, copy_layer
from tests.helpers import bounded, run_until_done, tokens_of

KiB, MiB = 1 << 10, 1 << 20
PAGE, BLOCK = 64 * KiB, 16 * KiB  # four 16 KiB tiny-model blocks per page
PARAMS = SamplingParams(max_tokens=24, temperature=0.0)
Spans = Sequence[tuple[int, int, int]]


def burst(count: int = 12, length: int = 60) -> list[list[int]]:
    """Distinct prompts, 12 x ~6 blocks at the end: three times the 24-block device budget."""
    return [[(i * 37 + j * 11 + j * j) % 500 + 3 for j in range(length)] for i in range(count)]


def tight(model: str, layerwise: bool, **kw: object) -> LLM:
    return LLM(model, page_size=PAGE, kv_reserve_pages=0, kv_cache_max_bytes=24 * BLOCK,
               layerwise_onload=layerwise, **kw)


def run(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    engine = llm.engine
    ids = [engine.add_request({"prompt_token_ids": p}, PARAMS) for p in prompts]
    return tokens_of(run_until_done(engine, each_step=engine.check_integrity), ids)


@pytest.mark.parametrize("where", [{"host_kv_cache_bytes": 2 * MiB},
                                   {"preemption_mode": "swap", "swap_space": 2 * MiB}],
                         ids=["tier", "swap-area"])
def test_greedy_parity_on_vs_off(tiny_llama: str, where: dict[str, object]) -> None:
    on, off = tight(tiny_llama, True, **where), tight(tiny_llama, False, **where)
    try:
        prompts = burst()
        assert run(on, prompts) == run(off, prompts)
        assert on.stats()["kv_onloaded_blocks"] > 0 and on.stats()["recomputes"] == 0
        assert on.engine.runner.layerwise is not None and on.engine.runner.layerwise.jobs > 0
        assert off.engine.runner.layerwise is None
    finally:
        on.engine.close()
        off.engine.close()


def test_a_host_prefix_hit_is_onloaded_layer_wise(tiny_llama: str) -> None:
    """The onloaded prefix blocks are read by the same step's prefill, layer by layer."""
    shared = [(j * 7 + 5) % 400 + 3 for j in range(64)]  # four full blocks
    fillers = [[(i * 53 + j * 13) % 450 + 3 for j in range(70)] for i in (1, 2)]
    phases = [[shared + [11] * 10], fillers[:1], fillers[1:], [shared + [23, 29, 31] * 4]]
    got: dict[bool, list[list[int]]] = {}
    for layerwise in (True, False):  # an 8-block device: the fillers evict the shared blocks
        llm = LLM(tiny_llama, page_size=PAGE, kv_reserve_pages=0, host_kv_cache_bytes=2 * MiB,
                  kv_cache_mode="static", num_kv_blocks=8, layerwise_onload=layerwise)
        try:
            got[layerwise] = [out for prompts in phases for out in run(llm, prompts)]
            assert llm.stats()["host_prefix_onloaded_blocks"] == len(shared) // 16
            copier = llm.engine.runner.layerwise
            assert (copier is not None and copier.jobs > 0) == layerwise
        finally:
            llm.engine.close()
    assert got[True] == got[False]


def test_layer0_computes_before_the_last_layer_is_copied(tiny_llama: str) -> None:
    llm = tight(tiny_llama, True, host_kv_cache_bytes=2 * MiB)
    engine, runner = llm.engine, llm.engine.runner
    layers = engine.model_config.num_hidden_layers
    assert runner.layerwise is not None and layers >= 2
    log: list[str] = []
    layer0_started = threading.Event()

    def slow_copy(dst: torch.Tensor, src: torch.Tensor, spans: Spans, layer: int) -> None:
        if layer == layers - 1:  # held back until layer 0 computes (a blocking onload never does)
            layer0_started.wait(timeout=5.0)
        copy_layer(dst, src, spans, layer)
        log.append(f"copied {layer}")

    def computing(i: int) -> None:
        log.append(f"compute {i}")
        if i == 0 and any(e.startswith("copied") for e in log):
            layer0_started.set()

    runner.layerwise.copy_layer = slow_copy
    runner.layerwise.steal = False  # every copy on the helper: the overlap is the helper's
    hooks = [layer.register_forward_pre_hook(lambda *_, i=i: computing(i))
             for i, layer in enumerate(engine.model.model.layers)]
    try:
        for p in burst():
            engine.add_request({"prompt_token_ids": p}, PARAMS)
        for _ in bounded(500, lambda: str(engine.stats())):
            log.clear()
            layer0_started.clear()
            engine.step()
            if any(e.startswith("copied") for e in log):
                break
        at = {e: k for k, e in enumerate(log)}
        assert at["compute 0"] < at[f"copied {layers - 1}"], log  # the overlap is real
        for i in range(layers):  # and no layer computes before its own copies landed
            assert at[f"copied {i}"] < at[f"compute {i}"], log
    finally:
        for h in hooks:
            h.remove()
        engine.close()


def test_copier_error_fails_the_step(tiny_llama: str) -> None:
    llm = tight(tiny_llama, True, host_kv_cache_bytes=2 * MiB)
    engine = llm.engine
    assert engine.runner.layerwise is not None

    def broken(dst: torch.Tensor, src: torch.Tensor, spans: Spans, layer: int) -> None:
        if layer == 1:
            raise OSError("link down")
        copy_layer(dst, src, spans, layer)

    engine.runner.layerwise.copy_layer = broken
    try:
        for p in burst():
            engine.add_request({"prompt_token_ids": p}, PARAMS)
        with pytest.raises(OnloadError, match="OSError: link down"):
            for _ in bounded(500, lambda: str(engine.stats())):
                engine.step()
    finally:
        engine.close()


def test_stuck_copier_misses_its_deadline(tiny_llama: str) -> None:
    llm = tight(tiny_llama, True, host_kv_cache_bytes=2 * MiB)
    engine = llm.engine
    copier = engine.runner.layerwise
    assert copier is not None
    release = threading.Event()

    def stuck(dst: torch.Tensor, src: torch.Tensor, spans: Spans, layer: int) -> None:
        if layer == 1:
            release.wait(timeout=30.0)
            return  # released after the step failed: the rows may be gone, copy nothing
        copy_layer(dst, src, spans, layer)

    copier.copy_layer, copier.deadline_s, copier.steal = stuck, 0.5, False
    try:
        for p in burst():
            engine.add_request({"prompt_token_ids": p}, PARAMS)
        with pytest.raises(OnloadError, match="waited 0.5s for layer 1"):
            for _ in bounded(500, lambda: str(engine.stats())):
                engine.step()
        assert copier._pool is None  # the stuck thread is abandoned, the next step gets another
    finally:
        release.set()
        engine.close()
