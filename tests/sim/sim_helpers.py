"""Small, fast simulator setups shared by the simulator tests."""

from __future__ import annotations

from elasticserve.config import GiB
from elasticserve.sim.gpu_specs import H100_80GB, GpuSpec
from elasticserve.sim.model_shapes import QWEN3_0_6B
from elasticserve.sim.runtime import ModelSpec
from elasticserve.sim.simulator import SimConfig, SimResult, Simulator
from elasticserve.workload.generators import ArrivalProcess, ModelStream, RateProfile, Uniform, Workload


def small_gpu(mem_gib: float, **changes: float) -> GpuSpec:
    """An H100 with less memory, so that a few small models contend for it."""
    return H100_80GB.replace(memory_bytes=int(mem_gib * GiB), **changes)


def config(mem_gib: float, **kw: object) -> SimConfig:
    gpu_changes = kw.pop("gpu", {})
    return SimConfig(small_gpu(mem_gib, **gpu_changes), max_num_seqs=256,  # type: ignore[arg-type]
                     max_num_batched_tokens=2048, **kw)  # type: ignore[arg-type]


def qwen_models(*names: str, priorities: tuple[int, ...] = ()) -> list[ModelSpec]:
    prios = priorities or (0,) * len(names)
    return [ModelSpec(n, QWEN3_0_6B, priority=p) for n, p in zip(names, prios, strict=True)]


def alternating_bursts(names: tuple[str, str], rate: float, on_s: float, periods: int,
                       in_len: tuple[int, int] = (200, 300),
                       out_len: tuple[int, int] = (200, 300)) -> Workload:
    """Model 0 bursts while model 1 is silent, then the other way round."""
    duration = 2 * on_s * periods
    streams = tuple(
        ModelStream(n, ArrivalProcess(RateProfile.on_off(rate, on_s, on_s, duration,
                                                         start=i * on_s)),
                    Uniform(*in_len), Uniform(*out_len))
        for i, n in enumerate(names))
    return Workload(streams)


def assert_clean(sim: Simulator, result: SimResult) -> None:
    """Every pool is consistent and empty, every grant matches its mapping."""
    for m in sim.models:
        m.storage.check_integrity()
        assert m.scheduler.kv.pool.num_used == 0, m.name
        assert not m.has_work, m.name
    sim.arbiter.check_integrity()
    snap = sim.arbiter.snapshot()
    assert snap.used_pages == sum(s.kv_pages + (s.weights_pages if s.awake else 0)
                                  for s in snap.models.values())
    if not result.stopped_early:
        assert result.end_time >= max((r.arrival for r in result.records), default=0.0)
