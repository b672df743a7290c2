"""The simulated host KV tier ("tiered" policy): group offload through the core's HostBlocks and
layer-wise spill beyond the device, priced by the host link (sim/host_tier_sim.py)."""

from __future__ import annotations

import dataclasses

import pytest

from elasticserve.config import GiB
from elasticserve.core.arbiter import Arbiter, ArbiterPolicy
from elasticserve.core.block_pool import BlockPool
from elasticserve.outputs import ScheduledSeq
from elasticserve.sampling_params import SamplingParams
from elasticserve.sim.cost_model import CostModel
from elasticserve.sim.experiment import compare
from elasticserve.sim.gpu_specs import H100_80GB
from elasticserve.sim.host_tier_sim import LayerSpill
from elasticserve.sim.model_shapes import QWEN3_0_6B
from elasticserve.sim.report import docs_section
from elasticserve.sim.scenarios import get_scenario
from elasticserve.sim.simulator import SimConfig, SimResult, Simulator
from elasticserve.workload.generators import ModelStream, RequestSpec, Uniform, Workload, poisson
from tests.sim.sim_helpers import assert_clean, config, qwen_models

# Qwen3-0.6B on a 2 GiB device: ~0.6 GiB of KV (~5.6K tokens), so decodes contend for it
_TIGHT = config(2, gpu={"page_map_s": 0.0}, shrink_after_s=1e9)


def _chats(seed: int = 3) -> list[RequestSpec]:
    return Workload((ModelStream("a", poisson(50, 6), Uniform(100, 400), Uniform(50, 200)),)
                    ).generate(seed=seed)


def _run(cfg: SimConfig, policy: str, reqs: list[RequestSpec]) -> tuple[Simulator, SimResult]:
    sim = Simulator(qwen_models("a"), cfg, policy)  # type: ignore[arg-type]
    res = sim.run(reqs)
    assert_clean(sim, res)
    for m in sim.models:
        assert m.scheduler.kv.host_blocks.num_used == 0  # nothing left on host
    return sim, res


def test_zero_host_budget_is_elastic_exactly() -> None:
    reqs = _chats()
    _, elastic = _run(_TIGHT, "elastic", reqs)
    _, tiered = _run(dataclasses.replace(_TIGHT, host_kv_bytes=0, layer_offload_bytes=0),
                     "tiered", reqs)
    assert elastic.model_stats["a"]["preemptions"] > 0  # memory was tight
    assert [(r.first_token, r.finish) for r in tiered.records] == \
        [(r.first_token, r.finish) for r in elastic.records]
    assert tiered.model_stats == elastic.model_stats


def test_group_offload_replaces_recompute_and_counts_blocks() -> None:
    reqs = _chats()
    _, elastic = _run(_TIGHT, "elastic", reqs)
    cfg = dataclasses.replace(_TIGHT, host_kv_bytes=4 * GiB)
    _, tiered = _run(cfg, "tiered", reqs)
    e, t = elastic.model_stats["a"], tiered.model_stats["a"]
    assert e["recomputes"] > 0
    assert t["recomputes"] == 0 and t["preemptions"] > 0
    assert t["kv_offloaded_blocks"] > 0
    assert t["kv_onloaded_blocks"] == t["kv_offloaded_blocks"]  # every victim came back
    assert all(r.error is None and r.finish is not None for r in tiered.records)


def _long_among_chats(long_len: int = 20_000) -> list[RequestSpec]:
    chats = [RequestSpec(0.05 * i, "a", 300, 400) for i in range(8)]
    return sorted([*chats, RequestSpec(0.2, "a", long_len, 16)], key=lambda r: r.arrival)


def _spill_cfg(host_bw: float) -> SimConfig:
    return config(2, gpu={"host_bw": host_bw}, max_model_len=32768,
                  long_prefill_token_threshold=1024, layer_offload_bytes=8 * GiB)


def _long_ttft(res: SimResult) -> float:
    rec = max(res.records, key=lambda r: r.input_len)
    assert rec.error is None and rec.ttft is not None
    return rec.ttft


def test_layer_spill_runs_a_prompt_larger_than_the_device() -> None:
    reqs = _long_among_chats()
    _, elastic = _run(_spill_cfg(64e9), "elastic", reqs)
    long_rec = max(elastic.records, key=lambda r: r.input_len)
    assert long_rec.error is not None  # 20K tokens of KV (~2.2 GiB) exceed the device
    sim, tiered = _run(_spill_cfg(64e9), "tiered", reqs)
    _long_ttft(tiered)
    stats = tiered.model_stats["a"]
    assert stats["spill_peak_gib"] > 1.0 and stats["spill_streamed_gib"] > stats["spill_peak_gib"]
    assert all(r.error is None for r in tiered.records)


def test_more_host_bandwidth_means_a_faster_long_prompt() -> None:
    reqs = _long_among_chats()
    ttft = {bw: _long_ttft(_run(_spill_cfg(bw), "tiered", reqs)[1]) for bw in (4e9, 16e9, 64e9)}
    assert ttft[4e9] > ttft[16e9] > ttft[64e9]
    # the link dominates at 4 GB/s: a quarter of the bandwidth costs well over 2x the time
    assert ttft[4e9] > 2 * ttft[16e9] * 0.9


def test_infinite_link_spill_costs_only_compute() -> None:
    """With a free link, spilling is the same schedule as a device that is big enough."""
    reqs = _long_among_chats(long_len=4_000)
    free = _run(_spill_cfg(1e18), "tiered", reqs)[1]
    big = _run(dataclasses.replace(_spill_cfg(1e18), device=_spill_cfg(1e18).device.replace(
        memory_bytes=8 * GiB)), "elastic", reqs)[1]
    assert _long_ttft(free) == pytest.approx(_long_ttft(big), rel=0.05)


def test_bad_spill_budget_is_rejected() -> None:
    cfg = dataclasses.replace(_TIGHT, layer_offload_bytes=-1)
    with pytest.raises(ValueError, match="layer_offload_bytes"):
        Simulator(qwen_models("a"), cfg, "tiered")



class _Holds:
    """A reclaimer that gives nothing back."""

    def reclaimable(self) -> tuple[int, int]:
        return 0, 0

    def free_pages(self, n: int) -> int:
        return 0

    drop_cached = preempt = free_pages

    def sleep(self) -> int | None:
        return None

    def is_idle(self) -> bool:
        return False


class _Model:
    """A LayerSpill over a bare block pool, one 2 MiB block per page (no ElasticPages)."""

    def __init__(self, arb: Arbiter, host_pages: int) -> None:
        page = arb.page_size
        self.spill = LayerSpill(arb, "a", CostModel(H100_80GB, QWEN3_0_6B), page, 16, host_pages)
        self.pool = BlockPool(0)
        self.mapped = 0
        self.spill.pool, self.spill.mapped = self.pool, lambda: self.mapped

    def grow(self, n: int) -> int:
        got = self.spill.grant(n, n)
        self.mapped += got
        self.pool.resize(self.mapped)
        return got

    def shrink(self, n: int) -> None:
        self.mapped -= n
        self.pool.resize(self.mapped)
        self.spill.release(n)


def _read_step(table: list[int], start: int) -> ScheduledSeq:
    return ScheduledSeq(1, "r", [1], start, table, SamplingParams(), [1] * (start + 1), start)


def test_spill_grants_host_pages_only_past_the_device_and_promotes_them_back() -> None:
    page = 2 << 20
    arb = Arbiter(5 * page, page, ArbiterPolicy(True, True, False, False, False))
    arb.register("a", 0, reclaimer=_Holds())
    arb.register("b", 0, reclaimer=_Holds())
    assert arb.request("b", 1) == 1  # a neighbour holds one page
    m = _Model(arb, host_pages=3)
    assert m.grow(3) == 3 and (arb.kv_pages("a"), m.spill.host_pages) == (3, 0)
    assert m.grow(3) == 3  # one device page left, two from host
    assert (arb.kv_pages("a"), m.spill.host_pages, m.spill.device_rows) == (4, 2, 4)
    m.spill.check_integrity()
    assert m.grow(2) == 0 and arb.kv_pages("a") == 4  # one host page left: nothing granted
    blocks = m.pool.allocate_many(6)  # lowest first: rows 4 and 5 are host-backed
    assert m.spill.link_time([_read_step(blocks, start=96)]) == pytest.approx(
        H100_80GB.transfer_seconds(2 * page))  # the two host blocks of the context cross
    m.pool.free(blocks[5])
    m.shrink(1)  # the top page goes first: a host-backed one
    assert (arb.kv_pages("a"), m.spill.host_pages) == (4, 1)
    m.spill.try_promote()  # no free device page yet
    assert m.spill.host_pages == 1
    arb.release("b", 1)
    m.spill.try_promote()  # the live block in row 4 moves to the device
    assert (arb.kv_pages("a"), m.spill.host_pages, m.spill.promoted_blocks) == (5, 0, 1)
    m.spill.check_integrity()
    assert m.spill.link_time([]) == pytest.approx(H100_80GB.transfer_seconds(page))


def test_longctx_compares_tiered_and_judges_it_against_static() -> None:
    scn = get_scenario("longctx")
    assert "tiered" in scn.policies and scn.config.host_kv_bytes > 0
    small = dataclasses.replace(
        scn, name="longctx", models=qwen_models("a"),
        config=dataclasses.replace(_TIGHT, ttft_slo_s=0.5, host_kv_bytes=4 * GiB),
        workload=Workload((ModelStream("a", poisson(20, 3), Uniform(100, 400),
                                       Uniform(50, 200)),)),
        policies=("static", "tiered"), bisect_iters=1)
    comp = compare(small, seed=0)
    assert set(comp.outcomes) == {"static", "tiered"}
    text = docs_section(comp, "cmd", "today", "abc")
    verdict = "met" if comp.ratio("tiered") >= 2.0 else "missed"
    assert f"Target tiered / static >= 2x: **{verdict} ({comp.ratio('tiered'):.2f}x)**" in text
    assert "**tiered / static max-rate ratio:" in text
