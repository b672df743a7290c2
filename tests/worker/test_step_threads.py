"""One torch thread for small steps, the configured count for large ones."""

from __future__ import annotations

import pytest
import torch

from elasticserve.worker.step_threads import StepThreads


def test_small_steps_run_on_one_thread_and_large_ones_on_all() -> None:
    before = torch.get_num_threads()
    try:
        threads = StepThreads(max_threads=2, small_step_tokens=64)
        assert threads.apply(8) == 1 and torch.get_num_threads() == 1
        assert threads.apply(64) == 1
        assert threads.apply(65) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="small_step_tokens"):
        StepThreads(2, -1)
    with pytest.raises(ValueError, match="max_threads"):
        StepThreads(0, 8)


def test_the_engine_switches_threads_per_step_and_keeps_greedy_tokens(tiny_llama: str) -> None:
    from elasticserve.engine.llm import LLM
    from elasticserve.sampling_params import SamplingParams

    before = torch.get_num_threads()
    try:
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        prompts = ["one", "two three four"]
        plain = LLM(tiny_llama, num_threads=2, small_step_tokens=0)
        assert plain.engine.runner.step_threads is None
        want = [o.outputs[0].token_ids for o in plain.generate(prompts, params)]
        adaptive = LLM(tiny_llama, num_threads=2, small_step_tokens=4)
        assert adaptive.engine.runner.step_threads is not None
        got = [o.outputs[0].token_ids for o in adaptive.generate(prompts, params)]
        assert got == want
        assert adaptive.engine.runner.step_threads.current == 1  # the last steps were decodes
        # the decode attention may still split over the configured threads (native kernel)
        runner = adaptive.engine.runner
        if runner.native_decode:
            seq = type("S", (), {"token_ids": [5], "start_pos": 3, "block_table": [0]})()
            _, _, meta = runner._prepare([seq])
            assert meta.native_decode is not None and meta.native_decode.threads == 2
    finally:
        torch.set_num_threads(before)
