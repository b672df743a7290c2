"""Two models, one memory budget, bursts that take turns: elastic arbiter vs a static split.

Run: ``python -m elasticserve.bench.multi_model [--write-docs] [--out-json r.json] [--plots DIR]``

Model A bursts while model B idles, then B bursts while A idles, for a few rounds. The same
seeded workload is sent to two servers started one after the other on one budget:
``--memory-policy arbiter`` (pages move to the model that needs them) and
``--memory-policy static`` (the budget split in half, each half a fixed KV cache). The budget
is chosen so that one burst's KV peak does not fit in half the budget (after that half's
weights) but fits in the whole budget minus both models' weights and one spare page for the
idle model. Reports P99 TTFT and the requests served within a TTFT SLO, and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from elasticserve.bench.serve import alternating_profile, fit_lengths, warmup
from elasticserve.bench.serve_client import ClientConfig, run_benchmark
from elasticserve.bench.serve_process import serve_process
from elasticserve.bench.serve_report import MIB, SLO, RunResult, records_json, summarize
from elasticserve.server.cli_serve import parse_size
from elasticserve.sim.workload import ArrivalProcess, Fixed, ModelStream, RequestSpec, Workload

MODELS = ("model-a", "model-b")
PAGE = 2 << 20  # the arbiter's default page (DEFAULT_PAGE_SIZE)
SECTION = "multi-model"


@dataclass(frozen=True, slots=True)
class Scenario:
    """The workload: each burst sends ``burst_rate`` req/s for ``burst_s`` at the start of
    its model's ``slot_s`` slot; ``rounds`` rounds of A then B."""

    input_len: int = 256
    output_len: int = 128
    burst_rate: float = 4.0
    burst_s: float = 3.0
    slot_s: float = 15.0
    rounds: int = 3
    ttft_slo_s: float = 4.0
    seed: int = 0
    headroom: float = 1.1  # the arbiter's room over one burst's KV peak

    @property
    def duration_s(self) -> float:
        return self.rounds * len(MODELS) * self.slot_s

    def requests(self) -> list[RequestSpec]:
        streams = tuple(
            ModelStream(m, ArrivalProcess(alternating_profile(i, len(MODELS), self.burst_rate,
                                                              self.burst_s, self.duration_s,
                                                              self.slot_s)),
                        Fixed(self.input_len), Fixed(self.output_len))
            for i, m in enumerate(MODELS))
        return Workload(streams).generate(self.seed)


DEFAULT = Scenario()


@dataclass(frozen=True, slots=True)
class Budget:
    """The memory budget and what each policy can give one bursting model."""

    memory_bytes: int
    weights_bytes: int
    kv_bytes_per_token: int
    burst_peak_bytes: int  # KV one model's burst uses at its peak
    peak_source: str  # "measured" (calibration run) or "estimated" (all requests at full length)
    static_kv_bytes: int  # one model's fixed KV cache under the static split
    arbiter_room_bytes: int  # the most KV one model can get while the other idles


def kv_bytes_per_token(model_dir: str, dtype_bytes: int = 4) -> int:
    """K and V of every layer for one token (fp32 on CPU)."""
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    heads = cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return cfg["num_hidden_layers"] * 2 * heads * head_dim * dtype_bytes


def estimate_peak(model_dir: str, sc: Scenario, block_size: int = 16) -> int:
    """An upper bound of one burst's KV: every expected request at full length at once."""
    tokens = math.ceil((sc.input_len + sc.output_len) / block_size) * block_size
    return math.ceil(sc.burst_rate * sc.burst_s) * tokens * kv_bytes_per_token(model_dir)


def budget_for(model_dir: str, peak_bytes: int, source: str, headroom: float,
               memory_bytes: int | None = None) -> Budget:
    """The budget (given, or sized so the arbiter room is ``headroom`` x the peak plus the
    bursting model's spare page) and what it gives each policy. The idle model keeps its
    weights; its KV pages can all be reclaimed, one spare page is left for it anyway."""
    from elasticserve.engine.multi_model import checkpoint_bytes

    weights = checkpoint_bytes(model_dir)
    weights_held = 2 * math.ceil(weights / PAGE) * PAGE  # the arbiter counts whole pages
    if memory_bytes is None:
        memory_bytes = weights_held + PAGE + math.ceil(headroom * peak_bytes / PAGE) * PAGE + PAGE
    return Budget(memory_bytes, weights, kv_bytes_per_token(model_dir), peak_bytes, source,
                  memory_bytes // 2 - weights, memory_bytes - weights_held - PAGE)


def measured_peak(run: RunResult) -> int:
    """The most KV one model had in use in any ``/admin/memory`` sample."""
    used = [f.get("kv_used_bytes", 0.0) for s in run.memory for f in s.models.values()]
    if not used:
        raise RuntimeError(f"no KV samples from /admin/memory: {run.memory_note}")
    return int(max(used))


def run_policy(policy: str, model_dir: str, memory_bytes: int, specs: Sequence[RequestSpec],
               duration_s: float, threads: int, label: str | None = None) -> RunResult:
    """Start a server with ``policy``, warm it up, send ``specs``, stop it."""
    token = os.urandom(8).hex()
    argv = [arg for name in MODELS for arg in ("--model", f"{name}={model_dir}")]
    argv += ["--memory", str(memory_bytes), "--memory-policy", policy, "--admin-token", token,
             "--threads", str(threads)]
    with serve_process(argv) as url:
        asyncio.run(warmup(url, MODELS, 1))
        cfg = ClientConfig(url, max_concurrency=256, request_timeout_s=duration_s + 120,
                           time_limit_s=duration_s + 150, admin_token=token, label=label or policy,
                           progress=sys.stderr.isatty())
        return asyncio.run(run_benchmark(specs, cfg))


def compare(summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Requests within the TTFT SLO and P99 TTFT of both policies, and their ratios."""
    a, s = summaries["arbiter"]["overall"], summaries["static"]["overall"]
    return {
        "arbiter_within_slo": a["slo_met"], "static_within_slo": s["slo_met"],
        "within_slo_ratio": a["slo_met"] / s["slo_met"] if s["slo_met"] else math.inf,
        "arbiter_ttft_p99_ms": a["ttft_ms"]["p99"], "static_ttft_p99_ms": s["ttft_ms"]["p99"],
        "ttft_p99_ratio": (s["ttft_ms"]["p99"] / a["ttft_ms"]["p99"]
                           if a["ttft_ms"]["p99"] and s["ttft_ms"]["p99"] else None),
    }


_PEAK_SOURCE = {"measured": "the most KV one model used in a calibration run of the arbiter "
                             "on a larger budget",
                "estimated": "estimated: every request of a burst at full length at once"}


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def markdown_section(sc: Scenario, budget: Budget, summaries: dict[str, dict[str, Any]],
                     cmp: dict[str, Any]) -> str:
    """The docs section: setup, the comparison table, and the command."""
    rows = []
    for policy in ("arbiter", "static"):
        o = summaries[policy]["overall"]
        peaks = summaries[policy]["memory"]["models"]
        mapped = max((f.get("kv_mapped_bytes", {}).get("peak", 0.0) for f in peaks.values()),
                     default=0.0)
        rows.append(f"| {policy} | {o['completed']}/{o['requests']} | {o['slo_met']} "
                    f"({o['slo_attainment']:.0%}) | {_ms(o['ttft_ms']['p50'])} | "
                    f"{_ms(o['ttft_ms']['p99'])} | {_ms(o['tpot_ms']['p50'])} | "
                    f"{mapped / MIB:.0f} |")
    ratio = cmp["within_slo_ratio"]
    return "\n".join([
        f"Two `small` Llama models ({budget.weights_bytes / MIB:.0f} MiB of fp32 weights each) "
        f"on one {budget.memory_bytes / MIB:.0f} MiB budget. Bursts take turns: "
        f"{sc.burst_rate:g} req/s for {sc.burst_s:g} s at the start of each model's "
        f"{sc.slot_s:g} s slot, {sc.rounds} rounds (A, B, A, B, ...); prompts {sc.input_len} "
        f"tokens, outputs {sc.output_len} tokens. A burst's KV peak is "
        f"{budget.burst_peak_bytes / MIB:.0f} MiB ({_PEAK_SOURCE[budget.peak_source]}); "
        f"the budget's static half holds "
        f"{budget.static_kv_bytes / MIB:.0f} MiB of KV per model, the arbiter can give one model "
        f"{budget.arbiter_room_bytes / MIB:.0f} MiB. TTFT SLO {sc.ttft_slo_s:g} s.",
        "",
        "| memory policy | completed | within TTFT SLO | TTFT P50 ms | TTFT P99 ms "
        "| TPOT P50 ms | peak KV mapped, one model (MiB) |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"**Arbiter / static: {ratio:.2f}x the requests within the TTFT SLO**, P99 TTFT "
        f"{_ms(cmp['arbiter_ttft_p99_ms'])} ms vs {_ms(cmp['static_ttft_p99_ms'])} ms.",
        "",
        "Command: `python -m elasticserve.bench.multi_model --write-docs` (2-core CPU, "
        "one server at a time, `--threads 1`).",
    ]) + "\n"


def write_docs(section: str, path: str = "docs/BENCHMARKS.md") -> bool:
    """Update the ``multi-model`` section through ``elasticserve.bench.report``, if present."""
    try:
        report = importlib.import_module("elasticserve.bench.report")
    except ImportError:
        print("elasticserve/bench/report.py is missing: docs not written", file=sys.stderr)
        return False
    report.update_section(path, SECTION, section)
    return True


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m elasticserve.bench.multi_model",
                                description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", default=os.path.join("models", "small-llama"),
                   help="a `small` model (made there when missing); both names serve it")
    p.add_argument("--policies", default="arbiter,static")
    for name, help_ in (("input_len", "prompt tokens"), ("output_len", "output tokens"),
                        ("burst_rate", "req/s during a burst"), ("burst_s", "burst seconds"),
                        ("slot_s", "seconds per model turn"), ("rounds", "rounds of turns"),
                        ("ttft_slo_s", "TTFT SLO, seconds"), ("seed", "workload seed"),
                        ("headroom", "arbiter room / burst peak")):
        default = getattr(DEFAULT, name)
        p.add_argument("--" + name.replace("_", "-"), type=type(default), default=default,
                       help=f"{help_} (default {default})")
    p.add_argument("--memory", type=parse_size, default=None,
                   help="the budget (e.g. 320MiB); default: sized from a calibration run")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    p.add_argument("--write-docs", action="store_true", help="update docs/BENCHMARKS.md")
    p.add_argument("--out-json", default=None)
    p.add_argument("--plots", default=None, metavar="DIR")
    return p


def choose_budget(args: argparse.Namespace, model_dir: str, sc: Scenario,
                  specs: list[RequestSpec]) -> tuple[Budget, RunResult | None]:
    """``--memory`` as given, or sized from the burst peak measured in a calibration run of
    the arbiter on a generous budget (every request at full length at once)."""
    if args.memory is not None:
        return budget_for(model_dir, estimate_peak(model_dir, sc), "estimated", sc.headroom,
                          args.memory), None
    generous = budget_for(model_dir, estimate_peak(model_dir, sc), "estimated", 1.5)
    _log(f"calibration: arbiter on {generous.memory_bytes / MIB:.0f} MiB")
    calib = run_policy("arbiter", model_dir, generous.memory_bytes, specs, sc.duration_s,
                       args.threads, label="calibration")
    return budget_for(model_dir, measured_peak(calib), "measured", sc.headroom), calib


def _log(text: str) -> None:
    print(f"[multi-model] {text}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run both policies on the same workload; print the section (and write it on request)."""
    args = build_parser().parse_args(argv)
    from elasticserve.cli import ensure_model

    model_dir = ensure_model(args.model_dir, size="small")
    sc = Scenario(**{f: getattr(args, f) for f in Scenario.__dataclass_fields__})
    specs = fit_lengths(sc.requests(), {})
    budget, calib = choose_budget(args, model_dir, sc, specs)
    runs: dict[str, RunResult] = {}
    for policy in args.policies.split(","):
        _log(f"{policy}: {len(specs)} requests on {budget.memory_bytes / MIB:.0f} MiB")
        runs[policy] = run_policy(policy, model_dir, budget.memory_bytes, specs, sc.duration_s,
                                  args.threads)
    slo = SLO(ttft_s=sc.ttft_slo_s)
    summaries = {p: summarize(r, slo) for p, r in runs.items()}
    for policy, run in runs.items():
        summaries[policy]["requests"] = records_json(run)
    result: dict[str, Any] = {"scenario": asdict(sc), "budget": asdict(budget), "runs": summaries}
    if calib is not None:
        result["calibration"] = summarize(calib, slo)
    if {"arbiter", "static"} <= set(summaries):
        result["compare"] = compare(summaries)
        section = markdown_section(sc, budget, summaries, result["compare"])
        print(section)
        if args.write_docs:
            write_docs(section)
    if args.plots:
        from elasticserve.bench.serve_plots import write_plots

        result["plots"] = write_plots(args.plots, list(runs.values()), list(summaries.values()))
    if args.out_json:
        with open(args.out_json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
