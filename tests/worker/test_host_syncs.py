"""One host sync per step: the runner and sampler read nothing back from the device except
the sampled ids and logprobs, fetched together. Counted on the CPU through the same code by
wrapping every tensor method that reads a value back to the host."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from elasticserve import LLM, SamplingParams
from tests.engine.conftest import mixed_prompts

# each of these waits for the device and copies a value to the host
SYNCING = ("tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


class SyncCounter:
    def __init__(self) -> None:
        self.on = False
        self.calls: list[str] = []


@pytest.fixture
def syncs(monkeypatch: pytest.MonkeyPatch) -> Iterator[SyncCounter]:
    counter = SyncCounter()
    for name in SYNCING:
        original = getattr(torch.Tensor, name)

        def counted(self: torch.Tensor, *args: Any, _name: str = name, _orig: Any = original,
                    **kwargs: Any) -> Any:
            if counter.on:
                counter.calls.append(_name)
            return _orig(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    yield counter


def _count_per_step(llm: LLM, syncs: SyncCounter) -> list[tuple[int, int]]:
    """(syncs, samples) of every runner step; the model's forward pass is not counted (on a
    GPU the Triton kernels launch without syncs; on the CPU the interpreter reads tensors)."""
    runner = llm.engine.runner
    steps: list[tuple[int, int]] = []
    execute, forward = runner.execute, runner.model.forward

    def quiet_forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        syncs.on = False
        try:
            return forward(*args, **kwargs)
        finally:
            syncs.on = True

    def counted_execute(out: Any) -> Any:
        syncs.calls.clear()
        syncs.on = True
        try:
            result = execute(out)
        finally:
            syncs.on = False
        steps.append((len(syncs.calls), len(result.samples)))
        return result

    runner.execute = counted_execute  # type: ignore[method-assign]
    runner.model.forward = quiet_forward  # type: ignore[method-assign]
    return steps


@pytest.mark.parametrize("graphs", [False, True])
def test_a_step_reads_back_once(tiny_llama: str, device: str, syncs: SyncCounter,
                                graphs: bool) -> None:
    llm = LLM(tiny_llama, device=device, attention_backend="triton",  # type: ignore[arg-type]
              cuda_graphs=graphs, max_num_batched_tokens=32)
    steps = _count_per_step(llm, syncs)
    prompts = [{"prompt_token_ids": p} for p in mixed_prompts(tiny_llama, 4)]
    # greedy with logprobs, seeded random sampling with top-k, plain random: the common rows
    params = [SamplingParams(max_tokens=5, temperature=0.0, logprobs=2),
              SamplingParams(max_tokens=5, temperature=0.8, top_k=20, seed=3),
              SamplingParams(max_tokens=5, temperature=1.0),
              SamplingParams(max_tokens=5, temperature=0.0)]
    outs = llm.generate(prompts, params)
    assert all(len(o.outputs[0].token_ids) == 5 for o in outs)
    assert outs[0].outputs[0].logprobs and len(outs[0].outputs[0].logprobs[0]) >= 2
    sampled = [n for n, samples in steps if samples]
    assert sampled and all(n == 1 for n in sampled), steps
    assert all(n == 0 for n, samples in steps if not samples), steps
