"""P/D disaggregation in the simulator: decode-only batches, transfer time in TTFT, KV bytes
accounted, nothing leaked; and the goodput sweep and its CLI."""

from __future__ import annotations

import math

import pytest

from elasticserve.sim import cli_pd
from elasticserve.sim.gpu_specs import H100_80GB
from elasticserve.sim.metrics import Slo, summarize
from elasticserve.sim.model_shapes import LLAMA_3_1_8B
from elasticserve.sim.pd import PdLayout, PdSimulator, parse_pd, simulate_pd
from elasticserve.sim.pd_goodput import LayoutSweep, RatePoint, pd_chat, sweep
from elasticserve.sim.runtime import ModelSpec
from elasticserve.sim.simulator import SimConfig
from elasticserve.workload.generators import ModelStream, RequestSpec, Uniform, Workload, poisson

SPEC = ModelSpec("m", LLAMA_3_1_8B)
CFG = SimConfig(H100_80GB, max_num_seqs=256, max_num_batched_tokens=2048, max_model_len=8192)


def mixed(rate: float = 12.0, duration: float = 20.0, seed: int = 1) -> list[RequestSpec]:
    """Long prompts arriving among running decodes."""
    wl = Workload((ModelStream("m", poisson(rate, duration), Uniform(512, 4096),
                               Uniform(64, 512)),))
    return wl.generate(seed)


def run(layout: PdLayout, reqs: list[RequestSpec]) -> tuple[PdSimulator, object]:
    sim = PdSimulator(SPEC, CFG, layout)
    return sim, sim.run(reqs)


def assert_clean(sim: PdSimulator) -> None:
    for inst in sim.instances:
        inst.rt.storage.check_integrity()
        inst.sim.arbiter.check_integrity()
        assert inst.rt.scheduler.kv.pool.num_used == 0, inst.name  # holds freed too
        assert not inst.rt.has_work, inst.name
    assert not sim.pending and not sim.inflight


def test_pd_removes_prefill_interference_from_tpot() -> None:
    reqs = mixed()
    slo = Slo(1.0, 0.02)
    co_sim, co = run(PdLayout(0, 2), reqs)
    pd_sim, pd = run(PdLayout(1, 1, 400.0), reqs)
    co_s, pd_s = summarize(co.records, slo), summarize(pd.records, slo)  # type: ignore[attr-defined]
    assert co_s.finished == pd_s.finished == len(reqs)
    assert pd_s.tpot.p99 < 0.85 * co_s.tpot.p99, (pd_s.tpot, co_s.tpot)
    assert_clean(co_sim)
    assert_clean(pd_sim)
    # the decode instance never ran a prefill: no recompute there, every hand-off moved
    stats = pd.instance_stats  # type: ignore[attr-defined]
    assert stats["decode1"]["recomputes"] == 0
    assert len(pd.handoffs) == sum(r.output_len > 1 for r in reqs)  # type: ignore[attr-defined]


def test_decode_batches_hold_one_token_per_sequence() -> None:
    sim = PdSimulator(SPEC, CFG, PdLayout(1, 1))
    decode = sim.decoders[0].rt
    seen: list[int] = []
    step = decode.scheduler.schedule

    def spy():  # type: ignore[no-untyped-def]
        out = step()
        seen.extend(len(item.token_ids) for item in out.scheduled)
        return out

    decode.scheduler.schedule = spy  # type: ignore[method-assign]
    sim.run(mixed(rate=6.0, duration=5.0))
    assert seen and set(seen) == {1}


def test_transfer_time_appears_in_ttft_and_bytes_are_blocks() -> None:
    reqs = [RequestSpec(0.0, "m", 3000, 8)]
    fast = simulate_pd(SPEC, reqs, CFG, PdLayout(1, 1, 1e6))
    slow = simulate_pd(SPEC, reqs, CFG, PdLayout(1, 1, 10.0))
    [h] = slow.handoffs
    block_bytes = LLAMA_3_1_8B.kv_block_bytes(CFG.block_size)
    assert h.blocks == math.ceil(3000 / CFG.block_size) == 188
    assert h.nbytes == h.blocks * block_bytes == slow.kv_bytes_moved
    transfer = h.nbytes * 8 / 10e9
    assert h.end - h.start == pytest.approx(transfer)
    ttft_slow, ttft_fast = slow.records[0].ttft, fast.records[0].ttft
    assert ttft_slow is not None and ttft_fast is not None
    assert ttft_slow - ttft_fast == pytest.approx(transfer - fast.handoffs[0].nbytes * 8 / 1e15)
    assert slow.records[0].finish is not None and slow.records[0].error is None


def test_single_token_outputs_finish_on_the_prefill_instance() -> None:
    reqs = [RequestSpec(0.0, "m", 100, 1), RequestSpec(0.0, "m", 100, 3)]
    sim, res = run(PdLayout(1, 1), reqs)
    assert len(res.handoffs) == 1  # type: ignore[attr-defined]
    assert all(r.finish is not None for r in res.records)  # type: ignore[attr-defined]
    assert_clean(sim)


def test_layout_and_pd_parsing_reject_bad_input() -> None:
    assert parse_pd("2:1") == (2, 1)
    for bad in ("2", "a:1", "1:0", "-1:2"):
        with pytest.raises(ValueError, match="--pd"):
            parse_pd(bad)
    with pytest.raises(ValueError, match="link_gbps"):
        PdLayout(1, 1, 0.0)
    with pytest.raises(ValueError, match="decode"):
        PdLayout(1, 0)
    assert PdLayout(0, 3).label == "colocated x3"


def test_goodput_interpolates_between_grid_rates() -> None:
    sw = LayoutSweep(PdLayout(0, 2), [RatePoint(r, (a,), 0, 0, 0, 0, 0, 0, 0) for r, a in
                                      ((2, 1.0), (4, 0.95), (6, 0.85))])
    assert sw.goodput(0, 0.9) == pytest.approx(5.0)
    assert LayoutSweep(PdLayout(0, 2), sw.points[:2]).goodput(0, 0.9) == 4


def test_sweep_and_cli_write_docs(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    scn = pd_chat(splits=[(1, 1)], duration=4.0, shares=[])
    scn.rates = [2.0, 4.0]
    out = sweep(scn)
    assert [s.layout.label for s in out] == ["colocated x2", "P/D 1:1 @ 400 Gbps"]
    assert all(len(s.points) == 2 for s in out)
    docs = tmp_path / "B.md"
    docs.write_text("# x\n")
    assert cli_pd.main(["--pd", "1:1", "--duration", "3", "--max-rate", "2", "--rate-step",
                        "2", "--write-docs", "--docs-path", str(docs)]) == 0
    text = docs.read_text()
    assert "<!-- bench:sim-pd -->" in text and "elasticserve.sim.cli_pd --pd 1:1" in text
    assert "| P/D 1:1 @ 400 Gbps | 2 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli_pd.main(["--pd", "0:2"])


def test_same_gpu_hand_off_moves_page_ownership_not_bytes() -> None:
    reqs = [RequestSpec(0.0, "m", 3000, 8)]
    sim = PdSimulator(SPEC, CFG, PdLayout(1, 1, gpu_share=0.25))
    prefill, decode = (x.sim.config.device for x in sim.instances)
    assert prefill.bf16_flops == pytest.approx(0.25 * H100_80GB.bf16_flops)
    assert decode.hbm_bw == pytest.approx(0.75 * H100_80GB.hbm_bw)
    res = sim.run(reqs)
    [h] = res.handoffs
    assert h.copied == 0 == res.kv_bytes_copied and h.nbytes == h.blocks * sim.block_bytes
    pages = math.ceil(h.nbytes / CFG.page_size)
    assert h.end - h.start == pytest.approx(2 * pages * H100_80GB.page_map_s)
    assert res.records[0].first_token == h.end
    assert_clean(sim)
    assert PdLayout(1, 1, gpu_share=0.25).gpus == 1 and PdLayout(2, 1).gpus == 3
    with pytest.raises(ValueError, match="gpu_share"):
        PdLayout(2, 1, gpu_share=0.5)
