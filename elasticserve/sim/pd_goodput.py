"""Goodput of P/D layouts against colocated instances on the same GPUs, as DistServe reports it.

Goodput is the highest request rate at which at least ``target`` (90%) of the requests meet
BOTH the TTFT and the TPOT target. Each layout runs the same seeded Poisson workload over a
grid of rates; the rate at the target is interpolated linearly between the last grid rate that
meets it and the next one. Every run is evaluated against each SLO of the scenario, so a tight
and a loose TPOT target come from the same runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from elasticserve.sim.gpu_specs import H100_80GB
from elasticserve.sim.metrics import Slo, summarize
from elasticserve.sim.model_shapes import LLAMA_3_1_8B
from elasticserve.sim.pd import PdLayout, simulate_pd
from elasticserve.sim.runtime import ModelSpec
from elasticserve.sim.simulator import SimConfig
from elasticserve.workload.generators import ModelStream, RequestSpec, Uniform, Workload, poisson


@dataclass(slots=True)
class PdScenario:
    """One model, its workload at rate 1 req/s (scaled), the layouts and SLOs to compare."""

    name: str
    description: str
    spec: ModelSpec
    config: SimConfig
    workload: Workload
    layouts: list[PdLayout]
    slos: list[Slo]
    rates: list[float]
    target: float = 0.9

    def requests(self, seed: int, rate: float) -> list[RequestSpec]:
        return self.workload.generate(seed, rate)


def pd_chat(link_gbps: float = 400.0, splits: Sequence[tuple[int, int]] = ((1, 1), (1, 2)),
            duration: float = 60.0, shares: Sequence[float] = (0.5,)) -> PdScenario:
    """Llama-3.1-8B on H100-80GBs: prompts of 512-4096 tokens, outputs of 64-512; each P:D
    split against as many colocated instances (one GPU each), and each share a 1:1 pair on
    one GPU against one colocated instance."""
    model = "llama8b"
    wl = Workload((ModelStream(model, poisson(1.0, duration), Uniform(512, 4096),
                               Uniform(64, 512)),))
    cfg = SimConfig(H100_80GB, max_num_seqs=256, max_num_batched_tokens=2048,
                    max_model_len=8192)
    layouts: list[PdLayout] = []
    for p, d in splits:
        layouts += [PdLayout(0, p + d, link_gbps), PdLayout(p, d, link_gbps)]
    if shares:
        layouts.append(PdLayout(0, 1))
    layouts += [PdLayout(1, 1, gpu_share=share) for share in shares]
    return PdScenario(
        "pd", "Llama-3.1-8B on H100-80GBs; Poisson arrivals, prompts U(512, 4096), "
              "outputs U(64, 512) tokens; chunked prefill, 2048-token step budget",
        ModelSpec(model, LLAMA_3_1_8B), cfg, wl, layouts,
        [Slo(1.0, 0.020), Slo(1.0, 0.040)], [float(r) for r in range(2, 33, 2)])


@dataclass(frozen=True, slots=True)
class RatePoint:
    """One run: attainment of each SLO and the latency percentiles (seconds)."""

    rate: float
    attainment: tuple[float, ...]
    ttft_p50: float
    ttft_p99: float
    tpot_p50: float
    tpot_p99: float
    kv_gib_moved: float
    kv_gib_copied: float
    decode_recomputes: int


@dataclass(slots=True)
class LayoutSweep:
    layout: PdLayout
    points: list[RatePoint] = field(default_factory=list)

    def goodput(self, slo_index: int, target: float) -> float:
        """Highest rate with attainment >= target, interpolated to the next grid rate."""
        best = 0.0
        prev: RatePoint | None = None
        for pt in self.points:
            att = pt.attainment[slo_index]
            if att < target:
                if prev is not None:
                    a0 = prev.attainment[slo_index]
                    best = prev.rate + (pt.rate - prev.rate) * (a0 - target) / (a0 - att)
                return best
            best, prev = pt.rate, pt
        return best


def run_point(scn: PdScenario, layout: PdLayout, rate: float, seed: int) -> RatePoint:
    """Simulate ``layout`` at ``rate`` req/s."""
    res = simulate_pd(scn.spec, scn.requests(seed, rate), scn.config, layout)
    s = summarize(res.records, scn.slos[0])
    atts = tuple(summarize(res.records, slo).slo_attainment for slo in scn.slos)
    recomputes = sum(int(v["recomputes"]) for k, v in res.instance_stats.items()
                     if k.startswith("decode"))
    return RatePoint(rate, atts, s.ttft.p50, s.ttft.p99, s.tpot.p50, s.tpot.p99,
                     res.kv_bytes_moved / 2**30, res.kv_bytes_copied / 2**30, recomputes)


def sweep(scn: PdScenario, seed: int = 0) -> list[LayoutSweep]:
    """Every layout over the rate grid, up to the first rate where no SLO is met any more."""
    out = []
    for layout in scn.layouts:
        sw = LayoutSweep(layout)
        for rate in scn.rates:
            pt = run_point(scn, layout, rate, seed)
            sw.points.append(pt)
            if max(pt.attainment) < scn.target:
                break
        out.append(sw)
    return out


def _slo_label(slo: Slo) -> str:
    return f"TTFT {slo.ttft_s:g} s + TPOT {slo.tpot_s * 1e3:g} ms"


def markdown(scn: PdScenario, sweeps: list[LayoutSweep], seed: int) -> str:
    """Goodput per layout and SLO, then latencies at the highest rate every layout ran."""
    pct = f"{scn.target:.0%}"
    lines = [f"## P/D vs colocated: {scn.description}", "",
             f"Goodput = the highest rate (req/s) at which {pct} of the requests meet both "
             f"targets (per GPU in brackets); seed {seed}, rates {scn.rates[0]:g}-"
             f"{scn.rates[-1]:g} req/s.", "",
             "| layout | GPUs | " + " | ".join(_slo_label(s) for s in scn.slos) + " |",
             "|---|---:|" + "---:|" * len(scn.slos)]
    for sw in sweeps:
        gpus = sw.layout.gpus * scn.config.num_gpus
        cells = [f"{(g := sw.goodput(i, scn.target)):.1f} ({g / gpus:.1f})"
                 for i in range(len(scn.slos))]
        lines.append(f"| {sw.layout.label} | {gpus} | " + " | ".join(cells) + " |")
    lines += ["", "Latencies (s; TPOT in ms), attainment of each SLO, and KV handed over (GiB; "
              "copied over a link in brackets) at every rate run:", "",
              "| layout | req/s | TTFT P50 | TTFT P99 | TPOT P50 | TPOT P99 | attainment | "
              "KV GiB |", "|---|---:|---:|---:|---:|---:|---|---:|"]
    for sw in sweeps:
        for pt in sw.points:
            att = " / ".join(f"{a:.2f}" for a in pt.attainment)
            lines.append(f"| {sw.layout.label} | {pt.rate:g} | {pt.ttft_p50:.3f} | "
                         f"{pt.ttft_p99:.3f} | {pt.tpot_p50 * 1e3:.1f} | {pt.tpot_p99 * 1e3:.1f} "
                         f"| {att} | {pt.kv_gib_moved:.0f} ({pt.kv_gib_copied:.0f}) |")
    return "\n".join(lines) + "\n"
