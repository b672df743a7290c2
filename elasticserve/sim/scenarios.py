"""Named scenarios: models, device, SLOs and a workload whose rate can be scaled.

* ``ramp3``: three Llama-3.1-8B on one H100-80GB. 256-token prompts, outputs of 256 or 400
  tokens (equally likely). One model at a time ramps 0 -> 12 -> 1 req/s (piecewise linear)
  and holds 1 req/s while the other two get nothing; then the next model takes its turn.
* ``zipf16``: sixteen models (6x Qwen3-0.6B, 7x Llama-3.1-8B, 3x Qwen2.5-14B) on four H100s'
  memory, each model tensor-parallel over the four GPUs (one execution resource, 4x the
  bandwidth and FLOP/s). Zipf(1) popularity over an interleaved size order; every model has
  its own Gamma renewal arrivals with CV 3; chat-like log-normal lengths.
* ``longctx``: one Llama-3.1-8B on one H100: 128K-token prompts mixed with short chat requests;
  prefill chunks are capped at 2048 tokens per sequence so short requests are not starved. Also
  runs the ``tiered`` policy: 64 GiB of host KV tier and 64 GiB of layer-wise spill.

* ``trace``: a recorded trace (JSONL or Azure CSV, see ``workload/trace.py``) replayed on a chosen
  device; every distinct model name runs a built-in shape. Built by :func:`trace_scenario`.

The rate scale multiplies every rate profile (divides a trace's arrival times);
``rate_at(scale)`` turns it into the req/s figure the report prints (peak rate for ramp3, mean
total rate otherwise).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from elasticserve.sim.gpu_specs import H100_80GB, get_gpu
from elasticserve.sim.model_shapes import (
    LLAMA_3_1_8B,
    QWEN2_5_14B,
    QWEN3_0_6B,
    ModelShape,
    get_shape,
)
from elasticserve.sim.runtime import ModelSpec
from elasticserve.sim.simulator import POLICIES, Policy, SimConfig
from elasticserve.workload.generators import (
    CHAT_INPUT,
    CHAT_OUTPUT,
    ArrivalProcess,
    Choice,
    Fixed,
    ModelStream,
    RateProfile,
    RequestSpec,
    Workload,
    poisson,
    zipf_mix,
)
from elasticserve.workload.trace import TraceReplay, TraceSource, load_traces


class RequestSource(Protocol):
    """Seeded synthetic workloads and replayed traces alike: requests at a rate scale."""

    def generate(self, seed: int, scale: float = 1.0) -> list[RequestSpec]: ...


@dataclass(slots=True)
class Scenario:
    """Everything one comparison needs; ``workload.generate(seed, scale)`` gives requests."""

    name: str
    description: str
    models: list[ModelSpec]
    config: SimConfig
    workload: RequestSource
    rate_label: str
    rate_at: Callable[[float], float]
    start_scale: float = 1.0  # first bisection probe
    bisect_iters: int = 3
    notes: list[str] = field(default_factory=list)
    policies: tuple[Policy, ...] = POLICIES  # compared by default

    def requests(self, seed: int, scale: float = 1.0) -> list[RequestSpec]:
        return self.workload.generate(seed, scale)


def ramp_profile(offset: float, up_s: float, down_s: float, hold_s: float, peak: float = 12.0,
                 low: float = 1.0) -> RateProfile:
    """0 -> ``peak`` over ``up_s``, -> ``low`` over ``down_s``, ``low`` for ``hold_s``, then 0."""
    t1, t2, t3 = offset + up_s, offset + up_s + down_s, offset + up_s + down_s + hold_s
    pts = [(offset, 0.0), (t1, peak), (t2, low), (t3, low), (t3, 0.0)]
    return RateProfile(tuple(([(0.0, 0.0)] if offset > 0 else []) + pts))


def ramp3(up_s: float = 10.0, down_s: float = 10.0, hold_s: float = 5.0) -> Scenario:
    names = [f"llama8b-{i}" for i in range(3)]
    phase = up_s + down_s + hold_s
    streams = tuple(
        ModelStream(n, ArrivalProcess(ramp_profile(i * phase, up_s, down_s, hold_s)),
                    Fixed(256), Choice((256, 400)))
        for i, n in enumerate(names))
    cfg = SimConfig(H100_80GB, max_num_seqs=1024, max_num_batched_tokens=8192,
                    ttft_slo_s=1.0, tpot_slo_s=0.1)
    return Scenario(
        "ramp3", "3x Llama-3.1-8B on one H100-80GB; one model at a time ramps 0->12->1 req/s",
        [ModelSpec(n, LLAMA_3_1_8B) for n in names], cfg, Workload(streams),
        rate_label="peak req/s", rate_at=lambda s: 12.0 * s, start_scale=2.0)


_ZIPF16_ORDER: tuple[ModelShape, ...] = (
    LLAMA_3_1_8B, QWEN3_0_6B, QWEN2_5_14B, LLAMA_3_1_8B, QWEN3_0_6B, LLAMA_3_1_8B,
    QWEN2_5_14B, QWEN3_0_6B, LLAMA_3_1_8B, QWEN3_0_6B, LLAMA_3_1_8B, QWEN2_5_14B,
    QWEN3_0_6B, LLAMA_3_1_8B, QWEN3_0_6B, LLAMA_3_1_8B,
)


def zipf16(total_rate: float = 8.0, duration: float = 40.0, cv: float = 3.0) -> Scenario:
    names = [f"{shape.name.lower()}-{rank:02d}" for rank, shape in enumerate(_ZIPF16_ORDER)]
    models = [ModelSpec(n, shape) for n, shape in zip(names, _ZIPF16_ORDER, strict=True)]
    cfg = SimConfig(H100_80GB, num_gpus=4, max_num_seqs=1024, max_num_batched_tokens=8192,
                    ttft_slo_s=1.0, tpot_slo_s=0.1)
    return Scenario(
        "zipf16", "16 mixed models on 4x H100-80GB memory; Zipf(1) popularity, Gamma CV 3",
        models, cfg, zipf_mix(names, total_rate, duration, cv, CHAT_INPUT, CHAT_OUTPUT),
        rate_label="mean req/s", rate_at=lambda s: total_rate * s, start_scale=4.0,
        notes=["the 4 GPUs are modelled as one tensor-parallel device (tp=4 for every model)"])


def longctx(short_rate: float = 2.0, long_rate: float = 0.05, duration: float = 120.0,
            long_len: int = 128 * 1024) -> Scenario:
    model = "llama8b"
    streams = (
        ModelStream(model, poisson(short_rate, duration), CHAT_INPUT, CHAT_OUTPUT),
        ModelStream(model, poisson(long_rate, duration), Fixed(long_len), Fixed(256)),
    )
    # A 128K prefill takes ~11 s on an H100 whatever the memory policy. Capping one sequence's
    # prefill chunk at 2048 tokens leaves ~6K tokens of every step's budget to the short
    # requests behind it, so they no longer wait for the whole prefill and a user-facing SLO
    # holds: 1 s plus 0.1 ms per prompt token (a 128K prompt gets ~14 s).
    cfg = SimConfig(H100_80GB, max_num_seqs=1024, max_num_batched_tokens=8192,
                    max_model_len=long_len + 4096, long_prefill_token_threshold=2048,
                    ttft_slo_s=1.0, tpot_slo_s=0.1, ttft_slo_per_token_s=1e-4,
                    host_kv_bytes=64 << 30, layer_offload_bytes=64 << 30)
    return Scenario(
        "longctx", "1x Llama-3.1-8B on one H100-80GB; 128K-token prompts among short chats",
        [ModelSpec(model, LLAMA_3_1_8B)], cfg, Workload(streams),
        rate_label="mean req/s", rate_at=lambda s: (short_rate + long_rate) * s,
        notes=["TTFT SLO = 1 s + 0.1 ms per prompt token; a prefill chunk is capped at 2048 "
               "tokens per sequence (long_prefill_token_threshold), so short requests share "
               "the steps of a 128K prefill (~11 s) instead of queueing behind it",
               "tiered = elastic + 64 GiB host KV tier (preempted groups offloaded, not "
               "recomputed) + 64 GiB layer-wise spill (KV beyond the device streamed over "
               "the host link, overlapped with compute)"],
        policies=(*POLICIES, "tiered"))


DEFAULT_TRACE_SHAPE = LLAMA_3_1_8B.name


def trace_scenario(traces: str | Path | Sequence[TraceSource],
                   shapes: Mapping[str, str] | None = None,
                   default_shape: str = DEFAULT_TRACE_SHAPE, device: str = "H100-80GB",
                   num_gpus: int = 1) -> Scenario:
    """Replay one trace file, or several merged (``(csv_model_name | None, path)`` pairs);
    ``shapes`` maps a trace model name to a built-in shape name, other models run
    ``default_shape``. Raises ValueError on any bad input (a bad row names its line)."""
    sources = [(None, traces)] if isinstance(traces, (str, Path)) else list(traces)
    replay = TraceReplay(tuple(load_traces(sources)))
    label = " + ".join(Path(path).name for _, path in sources)
    if not replay.requests:
        raise ValueError(f"{label}: the trace has no requests")
    models = replay.models
    shapes = dict(shapes or {})
    unknown = sorted(set(shapes) - set(models))
    if unknown:
        raise ValueError(f"--model-shape names model(s) not in the trace: {', '.join(unknown)} "
                         f"(the trace has: {', '.join(models)})")
    if num_gpus <= 0:
        raise ValueError(f"num_gpus must be > 0, got {num_gpus}")
    try:
        specs = [ModelSpec(m, get_shape(shapes.get(m, default_shape))) for m in models]
        gpu = get_gpu(device)
    except KeyError as e:
        raise ValueError(e.args[0]) from None
    longest = max(max(1, r.input_len) + max(1, r.output_len) for r in replay.requests)
    cfg = SimConfig(gpu, num_gpus=num_gpus, max_num_seqs=1024, max_num_batched_tokens=8192,
                    max_model_len=max(32768, longest), long_prefill_token_threshold=2048,
                    ttft_slo_s=1.0, tpot_slo_s=0.1, ttft_slo_per_token_s=1e-4)
    rate = replay.mean_rate
    desc = (f"{label}: {len(replay.requests)} requests, {len(models)} model(s) "
            f"on {num_gpus}x {gpu.name}")
    notes = ["models: " + ", ".join(f"{s.name}={s.shape.name}" for s in specs),
             "the rate scale divides the trace's arrival times; the seed does not change a trace",
             "TTFT SLO = 1 s + 0.1 ms per prompt token; prefill chunks capped at 2048 tokens"]
    if num_gpus > 1:
        notes.append(f"the {num_gpus} GPUs are modelled as one tensor-parallel device "
                     f"(tp={num_gpus} for every model)")
    return Scenario("trace", desc, specs, cfg, replay, rate_label="mean req/s",
                    rate_at=lambda s: rate * s, notes=notes)


SCENARIOS: dict[str, Callable[[], Scenario]] = {"ramp3": ramp3, "zipf16": zipf16,
                                                "longctx": longctx}


def get_scenario(name: str) -> Scenario:
    if name == "trace":
        raise KeyError("the trace scenario is built from a file: trace_scenario(path), or "
                       "cli_sim trace --trace FILE")
    try:
        return SCENARIOS[name]()
    except KeyError:
        raise KeyError(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}") from None
