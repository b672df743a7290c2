"""Render a :class:`Comparison`: a Markdown table, a docs section, a JSON document, and optional
PNG plots.

matplotlib is optional and imported only inside :func:`write_plots`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from elasticserve.sim.experiment import Comparison, PolicyOutcome
from elasticserve.sim.metrics import Summary

PLOT_NAMES = ("memory", "ttft_cdf", "attainment")
# arbiter / static max-rate targets of the project's goals (README), per built-in scenario
TARGET_RATIOS = {"ramp3": 3.0, "zipf16": 3.0}
# other policies judged against static: scenario -> (policy, target) (issue 13: the host tier)
TARGET_POLICY_RATIOS = {"longctx": ("tiered", 2.0)}


def _f(x: float, digits: int = 2) -> str:
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return "-" if math.isnan(x) else "inf"
    return f"{x:.{digits}f}"


def markdown(comp: Comparison) -> str:
    """Headline table (one row per policy) and a per-model table at the reference load."""
    scn, cfg = comp.scenario, comp.scenario.config
    static = comp.outcomes.get("static")
    lines = [f"## {scn.name}: {scn.description}", "",
             f"seed {comp.seed}; TTFT SLO {cfg.ttft_slo_s:g} s"
             + (f" + {cfg.ttft_slo_per_token_s * 1e3:g} ms/prompt token"
                if cfg.ttft_slo_per_token_s else "")
             + f"; max rate = highest {scn.rate_label} with >= {comp.target:.0%} TTFT attainment; "
             f"latencies at the reference load {_f(scn.rate_at(comp.ref_scale))} "
             f"{scn.rate_label} (static's max); {comp.wall_s:.0f} s wall", ""]
    lines += [f"note: {n}" for n in scn.notes] + ([""] if scn.notes else [])
    lines += ["| policy | max " + scn.rate_label + " | x static | TTFT P50 s | TTFT P99 s | "
              "TTFT attain | TPOT P50 ms | TPOT P99 ms | e2e P99 s | tok/s | preempt | sleeps |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, out in comp.outcomes.items():
        s = out.summary
        assert s is not None
        ratio = out.max_rate / static.max_rate if static and static.max_rate > 0 else math.nan
        pre = sum(int(v["preemptions"]) for v in _stats(out).values())
        sleeps = out.reference.arbiter_stats.get("sleeps", 0) if out.reference else 0
        lines.append(f"| {name} | {_f(out.max_rate, 1)} | {_f(ratio)} | {_f(s.ttft.p50, 3)} | "
                     f"{_f(s.ttft.p99, 3)} | {_f(s.ttft_attainment, 3)} | {_f(s.tpot.p50 * 1e3, 1)} | "
                     f"{_f(s.tpot.p99 * 1e3, 1)} | {_f(s.e2e.p99, 1)} | {_f(s.throughput_tok_s, 0)} | "
                     f"{pre} | {sleeps} |")
    if "arbiter" in comp.outcomes and static:
        lines += ["", f"**arbiter / static max-rate ratio: {_f(comp.ratio())}x**"]
    if "tiered" in comp.outcomes and static:
        lines += ["", f"**tiered / static max-rate ratio: {_f(comp.ratio('tiered'))}x**"]
    lines += _ceiling_lines(comp)
    lines += ["", *_per_model(comp)]
    return "\n".join(lines) + "\n"


def docs_section(comp: Comparison, command: str, when: str, commit: str) -> str:
    """The docs/BENCHMARKS.md section of one scenario: how it was made (command, date, commit,
    the device's assumed efficiencies), the verdict against its target, then :func:`markdown`.
    Every number in it comes from ``comp``; the results depend on the code and the seed only
    (no wall-clock input), so the commit is what reproduces them."""
    scn, dev = comp.scenario, comp.scenario.config.device
    eff = (f"assumed {dev.flops_eff:.0%} of peak bf16 FLOP/s and {dev.bw_eff:.0%} of HBM "
           "bandwidth" if hasattr(dev, "flops_eff") and hasattr(dev, "bw_eff") else "CPU spec")
    lines = [f"Simulated (`elasticserve.sim`): the real scheduler, KV manager, block pools, page "
             f"policy and arbiter, with a roofline cost model of {dev.name} ({eff}, "
             f"{dev.page_map_s * 1e6:g} us per page map). Policies compared in one run: "
             f"{', '.join(comp.outcomes)}.", "",
             f"Command: `{command}`; run {when} at commit {commit}.", ""]
    if scn.name == "trace":
        lines += [f"At the trace's recorded rate: {_f(scn.rate_at(1.0))} {scn.rate_label}.", ""]
    lines += _target_lines(comp) + _policy_target_lines(comp)
    body = markdown(comp).replace("\n## ", "\n### ")
    return "\n".join([*lines, "#" + body if body.startswith("## ") else body])


def _target_lines(comp: Comparison) -> list[str]:
    """The scenario's arbiter / static target, judged on this run (deterministic: no noise)."""
    target = TARGET_RATIOS.get(comp.scenario.name)
    if target is None or not {"arbiter", "static"} <= set(comp.outcomes):
        return []
    ratio = comp.ratio()
    text = (f"Target arbiter / static >= {target:g}x: **{'met' if ratio >= target else 'missed'} "
            f"({_f(ratio)}x)**")
    return [text + _reach(comp, target) + ".", ""]


def _reach(comp: Comparison, target: float) -> str:
    """Whether the unbounded-memory ceiling (when searched) leaves ``target`` within reach."""
    top, static = comp.ceiling, comp.outcomes["static"]
    if top is None or static.max_rate <= 0:
        return ""
    bound = top.max_rate / static.max_rate
    reach = "out of reach on this cost model" if bound < target else "within reach"
    return f"; memory ceiling {_f(bound)}x static: the target is {reach}"


def _policy_target_lines(comp: Comparison) -> list[str]:
    """A non-arbiter policy's target against static (e.g. longctx: tiered >= 2x)."""
    policy, target = TARGET_POLICY_RATIOS.get(comp.scenario.name, ("", 0.0))
    if not policy or not {policy, "static"} <= set(comp.outcomes):
        return []
    ratio = comp.ratio(policy)
    return [f"Target {policy} / static >= {target:g}x: **{'met' if ratio >= target else 'missed'} "
            f"({_f(ratio)}x)**{_reach(comp, target)}.", ""]


def _ceiling_lines(comp: Comparison) -> list[str]:
    """The unbounded-memory ceiling, as a rate and as a multiple of static's max rate."""
    top = comp.ceiling
    if top is None:
        return []
    static = comp.outcomes.get("static")
    label = comp.scenario.rate_label
    ratio = top.max_rate / static.max_rate if static and static.max_rate > 0 else math.nan
    stats = top.at_max.model_stats.values() if top.at_max else []
    pre = sum(int(v["preemptions"]) for v in stats)
    return ["", f"**memory ceiling ({top.policy}, KV never runs out): max {_f(top.max_rate, 1)} "
                f"{label} = {_f(ratio)}x static** ({pre} preemptions at that rate); no memory "
                "policy can serve more on this cost model"]


def _stats(out: PolicyOutcome) -> dict[str, dict[str, float]]:
    return out.reference.model_stats if out.reference else {}


def _per_model(comp: Comparison, limit: int = 8) -> list[str]:
    """Per-model rows for the models with the most requests (all of them when few)."""
    first = next(iter(comp.outcomes.values()))
    models = sorted(first.by_model, key=lambda m: -first.by_model[m].requests)[:limit]
    head = "| model | requests | " + " | ".join(
        f"{p} TTFT P99 s | {p} attain | {p} peak KV GiB" for p in comp.outcomes) + " |"
    lines = [f"Per model at the reference load (top {len(models)} by requests):", "", head,
             "|---|---|" + "---|---|---|" * len(comp.outcomes)]
    for m in models:
        cells = [m, str(first.by_model[m].requests)]
        for out in comp.outcomes.values():
            s = out.by_model.get(m)
            ref = out.reference
            peak = max(ref.timeline_pages.get(m, [0]), default=0) * ref.page_size / 2**30 \
                if ref else math.nan
            cells += [_f(s.ttft.p99, 3) if s else "-", _f(s.ttft_attainment, 3) if s else "-",
                      _f(peak, 1)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _summary_json(s: Summary | None) -> dict[str, Any] | None:
    return None if s is None else s.to_dict()


def to_json(comp: Comparison) -> dict[str, Any]:
    """Everything in the tables, plus every bisection probe and the KV timelines."""
    scn = comp.scenario
    doc: dict[str, Any] = {
        "scenario": scn.name, "description": scn.description, "seed": comp.seed,
        "target_attainment": comp.target, "rate_label": scn.rate_label,
        "reference_scale": comp.ref_scale, "reference_rate": scn.rate_at(comp.ref_scale),
        "ttft_slo_s": scn.config.ttft_slo_s, "tpot_slo_s": scn.config.tpot_slo_s,
        "wall_s": comp.wall_s, "policies": {},
    }
    if "arbiter" in comp.outcomes and "static" in comp.outcomes:
        doc["arbiter_over_static"] = comp.ratio()
    if comp.ceiling is not None:
        top = comp.ceiling
        doc["ceiling"] = {"policy": top.policy, "max_scale": top.max_scale,
                          "max_rate": top.max_rate,
                          "probes": [dataclasses.asdict(p) for p in top.probes]}
    for name, out in comp.outcomes.items():
        ref = out.reference
        doc["policies"][name] = {
            "max_scale": out.max_scale, "max_rate": out.max_rate,
            "probes": [{"scale": p.scale, "rate": p.rate, "requests": p.requests,
                        "attainment": p.attainment, "passed": p.passed,
                        "stopped_early": p.stopped_early, "wall_s": p.wall_s} for p in out.probes],
            "summary": _summary_json(out.summary),
            "by_model": {m: s.to_dict() for m, s in out.by_model.items()},
            "arbiter_stats": ref.arbiter_stats if ref else {},
            "model_stats": ref.model_stats if ref else {},
            "timeline": {"t": ref.timeline_t, "kv_pages": ref.timeline_pages,
                         "page_size": ref.page_size} if ref else {},
        }
    return doc


def write_plots(comp: Comparison, outdir: str) -> list[str]:
    """PNG plots into ``outdir``; [] when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    os.makedirs(outdir, exist_ok=True)
    name = comp.scenario.name
    return [_save(_memory_plot(plt, comp), outdir, f"{name}_memory.png"),
            _save(_ttft_cdf_plot(plt, comp), outdir, f"{name}_ttft_cdf.png"),
            _save(_attainment_plot(plt, comp), outdir, f"{name}_attainment.png")]


def _memory_plot(plt: Any, comp: Comparison) -> Any:
    """KV GiB per model over time, one panel per policy, each at that policy's max rate."""
    pols = list(comp.outcomes.items())
    fig, axes = plt.subplots(len(pols), 1, figsize=(9, 2.6 * len(pols)), sharex=True,
                             squeeze=False)
    for ax, (pol, out) in zip(axes[:, 0], pols, strict=True):
        run = out.at_max or out.reference  # memory is most telling at the policy's own limit
        if run is not None:
            gib = run.page_size / 2**30
            for m, pages in run.timeline_pages.items():
                ax.plot(run.timeline_t, [p * gib for p in pages], lw=1, label=m)
        rate = out.max_rate if out.at_max else comp.scenario.rate_at(comp.ref_scale)
        ax.set_title(f"{pol}: KV memory per model at {_f(rate, 1)} {comp.scenario.rate_label}")
        ax.set_ylabel("GiB")
    axes[-1, 0].set_xlabel("simulated time (s)")
    if len(comp.scenario.models) <= 6:
        axes[0, 0].legend(fontsize=7)
    return fig


def _ttft_cdf_plot(plt: Any, comp: Comparison) -> Any:
    fig, ax = plt.subplots(figsize=(6, 4))
    for pol, out in comp.outcomes.items():
        ttfts = sorted(r.ttft for r in (out.reference.records if out.reference else [])
                       if r.ttft is not None)
        ax.plot(ttfts, [(i + 1) / len(ttfts) for i in range(len(ttfts))], label=pol)
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (s)")
    ax.set_ylabel("CDF")
    ax.legend()
    ax.set_title(f"{comp.scenario.name}: TTFT at {_f(comp.scenario.rate_at(comp.ref_scale))} "
                 f"{comp.scenario.rate_label}")
    return fig


def _attainment_plot(plt: Any, comp: Comparison) -> Any:
    """Every bisection probe; a probe cut short shows a lower bound on its attainment."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for pol, out in comp.outcomes.items():
        pts = sorted((p.rate, p.attainment) for p in out.probes)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=pol)
    ax.axhline(comp.target, color="grey", ls="--", lw=1)
    ax.set_xlabel(comp.scenario.rate_label)
    ax.set_ylabel("TTFT SLO attainment")
    ax.legend()
    ax.set_title(f"{comp.scenario.name}: attainment vs rate (probes)")
    return fig


def _save(fig: Any, outdir: str, filename: str) -> str:
    path = os.path.join(outdir, filename)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
