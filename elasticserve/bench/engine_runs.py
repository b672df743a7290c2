"""The real engine's side of the calibration: build it, serve closed batches and an online
(wall-clock) workload, and time every ``engine.step()`` with the chunks it ran."""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from elasticserve.config import MiB
from elasticserve.workload.generators import RequestSpec

if TYPE_CHECKING:
    from elasticserve.engine.llm_engine import LLMEngine

Step = tuple[tuple[tuple[int, int], ...], float, float]  # (start, num_new) per seq, wall, CPU s


@dataclass(frozen=True, slots=True)
class EngineSettings:
    """The engine's settings; the simulator replays the held-out run with the same ones."""

    block_size: int = 16
    max_num_seqs: int = 48
    max_num_batched_tokens: int = 512
    kv_cache_bytes: int = 512 * MiB  # static: no page mapping in the timings, never preempts
    swap_space: int = 256 * MiB
    max_model_len: int = 2048


@dataclass(frozen=True, slots=True)
class Batch:
    """``n`` training requests, all at once or (``every`` > 0) one every ``every`` steps."""

    n: int
    prompt: tuple[int, int]
    output: tuple[int, int]
    every: int = 0


TRAIN_BATCHES = (Batch(1, (16, 512), (8, 128)), Batch(4, (16, 512), (8, 128)),
                 Batch(12, (16, 512), (8, 128)), Batch(48, (16, 160), (8, 128)),
                 Batch(24, (16, 512), (8, 128), every=4), Batch(32, (16, 256), (8, 64), every=2))


@dataclass(slots=True)
class EngineRun:
    """Steps; per-request TTFT and arrival -> finish latency in request order; run length."""

    steps: list[Step] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)
    seconds: float = 0.0
    idle_s: float = 0.0

    @property
    def slowdown(self) -> float:
        """Wall / CPU time of the steps: how much the other processes stretched them."""
        return sum(s[1] for s in self.steps) / max(sum(s[2] for s in self.steps), 1e-12)


def build_engine(model_dir: str, settings: EngineSettings, seed: int) -> LLMEngine:
    from elasticserve.engine.llm_engine import LLMEngine

    s = settings
    engine = LLMEngine.from_args(
        model_dir, block_size=s.block_size, max_num_seqs=s.max_num_seqs,
        max_num_batched_tokens=s.max_num_batched_tokens, kv_cache_mode="static",
        kv_cache_bytes=s.kv_cache_bytes, swap_space=s.swap_space, max_model_len=s.max_model_len,
        seed=seed, num_threads=1)
    engine.step_trace = []
    return engine


def timed_step(engine: LLMEngine, run: EngineRun) -> list[Any]:
    """One ``engine.step()`` timed whole, paired with the chunks it appended to the trace."""
    trace = engine.step_trace
    assert trace is not None, "build the engine with build_engine (step_trace on)"
    before = len(trace)
    wall, cpu = time.perf_counter(), time.thread_time()
    outputs = engine.step()
    cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
    if len(trace) > before:
        run.steps.append((trace[-1][0], wall, max(cpu, 1e-6)))
    return outputs


def _add(engine: LLMEngine, rid: str, prompt_len: int, output_len: int,
         rng: random.Random) -> None:
    from elasticserve.sampling_params import SamplingParams

    # random ids: no two prompts share a prefix block, as in the simulator
    ids = [rng.randrange(3, engine.model_config.vocab_size) for _ in range(prompt_len)]
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    engine.add_request({"prompt_token_ids": ids}, params, request_id=rid)


def run_batches(engine: LLMEngine, batches: Sequence[Batch], tag: str) -> EngineRun:
    """The training workload: each batch is served to completion before the next."""
    rng, run, start = random.Random(tag), EngineRun(), time.perf_counter()
    for b, batch in enumerate(batches):
        for i in range(batch.n):
            _add(engine, f"{tag}-{b}-{i}", rng.randint(*batch.prompt), rng.randint(*batch.output),
                 rng)
            for _ in range(batch.every):
                timed_step(engine, run)
        while engine.has_unfinished_requests():
            timed_step(engine, run)
    run.seconds = time.perf_counter() - start
    return run


def run_online(engine: LLMEngine, requests: Sequence[RequestSpec], seed: int) -> EngineRun:
    """Serve ``requests`` online, each added once its arrival time (wall clock, from the start)
    has come; latencies count from that arrival time, as the simulator's do."""
    rng, run = random.Random(f"{seed}:prompts"), EngineRun()
    ttft: dict[int, float] = {}
    e2e: dict[int, float] = {}
    t0, i = time.monotonic(), 0
    while i < len(requests) or engine.has_unfinished_requests():
        while i < len(requests) and t0 + requests[i].arrival <= time.monotonic():
            _add(engine, str(i), requests[i].input_len, requests[i].output_len, rng)
            i += 1
        if not engine.has_unfinished_requests():
            idle = max(0.0, t0 + requests[i].arrival - time.monotonic())
            time.sleep(idle)
            run.idle_s += idle
            continue
        for out in timed_step(engine, run):
            k = int(out.request_id)
            ttft[k] = out.metrics["first_token_time"] - t0 - requests[k].arrival
            e2e[k] = out.metrics["finished_time"] - t0 - requests[k].arrival
    run.seconds = time.monotonic() - t0
    run.ttft, run.e2e = [ttft[k] for k in sorted(ttft)], [e2e[k] for k in sorted(e2e)]
    return run
