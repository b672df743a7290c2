"""Every LLMEngine step leaves plain per-step numbers for metrics (StepStats), also for requests
that are not streamed and return nothing until they finish."""

from __future__ import annotations

import pickle

from elasticserve.engine.args import EngineArgs
from elasticserve.engine.llm_engine import LLMEngine
from elasticserve.outputs import StepStats
from elasticserve.sampling_params import SamplingParams
from tests.helpers import bounded, engine_state


def test_each_step_reports_its_tokens_before_the_request_finishes(tiny_llama: str) -> None:
    engine = LLMEngine(EngineArgs(model=tiny_llama))
    try:
        prompt = list(range(5, 45))  # 40 tokens: two full blocks of 16
        params = SamplingParams(max_tokens=6, n=2, temperature=1.0, seed=1, ignore_eos=True)
        first = engine.add_request({"prompt_token_ids": prompt}, params)
        steps: list[StepStats] = []
        outputs = []
        for _ in bounded(50, lambda: engine_state(engine)):
            if not engine.has_unfinished_requests():
                break
            outputs += engine.step()
            stats = engine.step_stats.pop()
            assert stats is not None and engine.step_stats.pop() is None  # once per step
            steps.append(stats)
        assert [o.request_id for o in outputs] == [first]  # nothing until the end...
        # ...but every step reported its tokens: the prompt's step samples both choices
        assert [s.new_tokens[first] for s in steps] == [2] * 6
        assert sum(s.num_generation_tokens for s in steps) == 12
        assert [s.num_prompt_tokens for s in steps] == [40, 0, 0, 0, 0, 0]
        assert [s.num_batched_tokens for s in steps] == [40] + [2] * 5
        assert steps[0].prefix_cache_queries == 40 and steps[0].prefix_cache_hits == 0
        assert all(s.scheduled_at <= s.finished_at for s in steps)
        assert pickle.loads(pickle.dumps(steps[0])) == steps[0]  # crosses a process boundary

        # the same prompt again hits the two cached blocks
        engine.add_request({"prompt_token_ids": prompt}, SamplingParams(max_tokens=1))
        engine.step()
        again = engine.step_stats.pop()
        assert again is not None
        assert (again.prefix_cache_queries, again.prefix_cache_hits) == (40, 32)
        assert again.num_batched_tokens == 8
    finally:
        engine.close()
