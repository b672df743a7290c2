"""Two models, one memory budget, bursts that take turns: elastic arbiter vs a static split.

Run: ``python -m elasticserve.bench.multi_model [--write-docs] [--out-json r.json] [--plots DIR]``

Model A bursts while model B idles, then B bursts while A idles, for a few rounds. The same
seeded workload goes to servers started one after the other (child processes on free loopback
ports, never two at once): ``--memory-policy arbiter`` (pages move to the model that needs
them) and ``--memory-policy static`` (the budget split in half, each half a fixed KV cache).
Which policy runs first alternates from one pair of runs to the next (``fairness.abba``), so
drift in the shared machine's speed favours neither.

Calibration: both policies on a generous budget, where even the static half holds a burst,
measure one burst's KV peak and the TTFT of a burst admitted at once. Then, per ``--idle``
case, one budget and both policies on it:

- ``awake``: the peak fits the budget minus both models' weights (times ``headroom``) but not
  the static half (which gets about half of it);
- ``sleep``: the static half holds about a quarter of the peak; the arbiter fits the burst
  only by putting the idle model to sleep (its weights leave the budget until it wakes).

Reports P99 TTFT and the requests within a TTFT SLO for both policies, and their ratio. The
SLO is given (``--ttft-slo-s``) or ``slo_factor`` x the larger P99 TTFT of the two calibration
runs: the latency either policy reaches when memory is not short, not one side's own result.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from elasticserve.bench.fairness import abba
from elasticserve.bench.multi_model_report import compare, markdown_section
from elasticserve.bench.serve import alternating_profile, fit_lengths, warmup
from elasticserve.bench.serve_client import ClientConfig, run_benchmark
from elasticserve.bench.serve_process import serve_process
from elasticserve.bench.serve_report import MIB, SLO, RunResult, records_json, summarize
from elasticserve.docs_section import update_section
from elasticserve.workload.generators import ArrivalProcess, Fixed, ModelStream, RequestSpec, Workload

MODELS = ("model-a", "model-b")
PAGE = 2 << 20  # the arbiter's default page (DEFAULT_PAGE_SIZE)
SECTION = "multi-model"
IDLE_CASES = ("awake", "sleep")


@dataclass(frozen=True, slots=True)
class Scenario:
    """The workload: each burst sends ``burst_rate`` req/s for ``burst_s`` at the start of
    its model's ``slot_s`` turn; ``rounds`` rounds of A then B. ``arrival_cv`` is the gaps'
    coefficient of variation inside a burst (1: Poisson; below 1: more even)."""

    input_len: int = 384
    output_len: int = 48
    burst_rate: float = 16.0
    burst_s: float = 0.5
    slot_s: float = 10.0
    rounds: int = 3
    ttft_slo_s: float = 0.0  # 0: slo_factor x the larger calibration P99 TTFT of both policies
    slo_factor: float = 1.25
    arrival_cv: float = 0.25
    seed: int = 0
    headroom: float = 1.1  # the arbiter's room over one burst's KV peak
    sleep_static_share: float = 0.25  # the static half's share of the peak in the sleep case

    @property
    def duration_s(self) -> float:
        return self.rounds * len(MODELS) * self.slot_s

    def requests(self) -> list[RequestSpec]:
        streams = tuple(
            ModelStream(m, ArrivalProcess(alternating_profile(i, len(MODELS), self.burst_rate,
                                                              self.burst_s, self.duration_s,
                                                              self.slot_s), self.arrival_cv),
                        Fixed(self.input_len), Fixed(self.output_len))
            for i, m in enumerate(MODELS))
        return Workload(streams).generate(self.seed)


DEFAULT = Scenario()


@dataclass(frozen=True, slots=True)
class Budget:
    """A memory budget and what each policy can give one bursting model."""

    idle: str  # "awake" or "sleep": what the arbiter must do with the idle model
    memory_bytes: int
    weights_bytes: int
    kv_bytes_per_token: int
    burst_peak_bytes: int  # KV one model's burst uses at its peak
    peak_source: str
    static_kv_bytes: int  # one model's fixed KV cache under the static split
    arbiter_room_bytes: int  # the most KV the bursting model can get from the arbiter


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


def _pages(n: float) -> int:
    return math.ceil(n / PAGE) * PAGE


def budget_for(model_dir: str, peak_bytes: int, source: str, sc: Scenario, idle: str = "awake",
               memory_bytes: int | None = None) -> Budget:
    """The budget of an ``idle`` case (or ``memory_bytes`` as given) and what it gives each
    policy. The arbiter counts weights in whole pages; one spare page is kept for the idle
    model when it stays awake and one for the bursting model's reserve."""
    weights = _weights(model_dir)
    held = _pages(weights)
    if memory_bytes is None:
        if idle == "awake":
            memory_bytes = 2 * held + PAGE + _pages(sc.headroom * peak_bytes) + PAGE
        else:
            memory_bytes = 2 * _pages(weights + sc.sleep_static_share * peak_bytes)
            memory_bytes = max(memory_bytes, held + _pages(sc.headroom * peak_bytes) + PAGE)
    room = memory_bytes - (2 * held + PAGE if idle == "awake" else held) - PAGE
    return Budget(idle, memory_bytes, weights, kv_bytes_per_token(model_dir), peak_bytes, source,
                  memory_bytes // 2 - weights, room)


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


def _log(text: str) -> None:
    print(f"[multi-model] {text}", file=sys.stderr, flush=True)


def calibrate(model_dir: str, sc: Scenario, specs: list[RequestSpec], threads: int,
              order: tuple[str, str]) -> tuple[int, dict[str, RunResult]]:
    """One burst's KV peak (the most either policy used) and both policies' runs, on a budget
    where even the static half holds 1.5x the estimated burst: nobody waits for memory."""
    memory = generous_memory(model_dir, sc)
    runs = {}
    for policy in order:
        _log(f"calibration: {policy} on {memory / MIB:.0f} MiB")
        runs[policy] = run_policy(policy, model_dir, memory, specs, sc.duration_s, threads,
                                  label=f"calibration, {policy}")
    return max(measured_peak(r) for r in runs.values()), runs


def generous_memory(model_dir: str, sc: Scenario, factor: float = 1.5) -> int:
    """A budget whose static half holds ``factor`` x the estimated burst besides the weights
    (so the arbiter, which can give one model more than half, holds it too)."""
    return 2 * _pages(_weights(model_dir) + factor * estimate_peak(model_dir, sc))


def _weights(model_dir: str) -> int:
    from elasticserve.engine.multi_model import checkpoint_bytes

    return checkpoint_bytes(model_dir)


def run_case(model_dir: str, budget: Budget, specs: list[RequestSpec], sc: Scenario,
             threads: int, order: tuple[str, str]) -> tuple[dict[str, Any], list[RunResult]]:
    """Both policies on one budget, in ``order``: their summaries (with every request) and the
    comparison."""
    slo = SLO(ttft_s=sc.ttft_slo_s)
    runs, summaries = [], {}
    for policy in order:
        _log(f"idle {budget.idle}, {policy}: {len(specs)} requests on "
             f"{budget.memory_bytes / MIB:.0f} MiB")
        run = run_policy(policy, model_dir, budget.memory_bytes, specs, sc.duration_s, threads,
                         label=f"{policy}, idle {budget.idle}")
        runs.append(run)
        summaries[policy] = summarize(run, slo) | {"requests": records_json(run)}
    return {"budget": asdict(budget), "summaries": summaries, "order": list(order),
            "compare": compare(summaries)}, runs


def provenance(argv: list[str] | None, threads: int, load_before: str) -> list[str]:
    """Date, machine, load and the command."""
    from elasticserve.bench import report  # torch, for the machine line: only once it ran

    return ["", f"Run {report.today()} on {report.machine_line(threads)}; load average "
                f"{load_before} before, {report.load_average()} after.", "",
            f"Command: `{report.command_line('elasticserve.bench.multi_model', argv)}`"]


def write_docs(section: str, path: str | None = None) -> None:
    """Update the ``multi-model`` section of docs/BENCHMARKS.md."""
    _log(f"wrote section {SECTION!r} of {update_section(SECTION, section, path)}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="elasticserve bench multi-model",
                                description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", default=os.path.join("models", "small-llama"),
                   help="a `small` model (made there when missing); both names serve it")
    p.add_argument("--idle", default=",".join(IDLE_CASES), help="budget cases: awake,sleep")
    for name in Scenario.__dataclass_fields__:
        default = getattr(DEFAULT, name)
        p.add_argument("--" + name.replace("_", "-"), type=type(default), default=default,
                       help=f"(default {default})")
    p.add_argument("--peak-mib", type=float, default=None,
                   help="one burst's KV peak; default: measured by a calibration run")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    p.add_argument("--write-docs", action="store_true", help="update docs/BENCHMARKS.md")
    p.add_argument("--docs-path", default=None, help="the file --write-docs updates")
    p.add_argument("--out-json", default=None, help="write the results as JSON here")
    p.add_argument("--plots", default=None, metavar="DIR", help="write PNG plots here")
    return p


def peak_and_slo(args: argparse.Namespace, model_dir: str, sc: Scenario, specs: list[RequestSpec],
                 result: dict[str, Any], runs: list[RunResult], order: tuple[str, str]
                 ) -> tuple[Scenario, int, str]:
    """The burst peak (given, or calibrated) and the scenario with its SLO set; records the
    calibration runs in ``result`` and ``runs``."""
    slo_note = "given"
    if args.peak_mib is not None:
        peak, source = int(args.peak_mib * MIB), "given"
    else:
        peak, calib = calibrate(model_dir, sc, specs, args.threads, order)
        source = ("measured: the most KV one model used in the calibration runs of both "
                  "policies on a larger budget")
        result["calibration"] = {p: summarize(r, SLO()) for p, r in calib.items()}
        result["calibration_order"] = list(order)
        runs += calib.values()
        if not sc.ttft_slo_s:
            p99s = {p: c["overall"]["ttft_ms"]["p99"] for p, c in result["calibration"].items()}
            # up to a whole 0.1 s: rounding could reach 0 s on a fast machine (no SLO at all)
            slo_s = math.ceil(sc.slo_factor * max(p99s.values()) / 100) / 10
            sc = replace(sc, ttft_slo_s=slo_s)
            slo_note = (f"{sc.slo_factor:g} x the larger P99 TTFT of the two calibration runs, "
                        "where every burst is admitted at once: "
                        + ", ".join(f"{p} {v:,.0f} ms" for p, v in p99s.items()))
    if not sc.ttft_slo_s:
        raise SystemExit("--ttft-slo-s is needed with --peak-mib (no calibration run)")
    result["scenario"] = asdict(sc) | {"ttft_slo_note": slo_note,
                                       "model": os.path.basename(model_dir.rstrip("/"))}
    return sc, peak, source


def main(argv: list[str] | None = None) -> int:
    """Calibrate, run both policies per budget case, print the section (write it on request)."""
    args = build_parser().parse_args(argv)
    load_before = "/".join(f"{x:.2f}" for x in os.getloadavg())
    from elasticserve.models.make_model import ensure_model

    model_dir = ensure_model(args.model_dir, size="small")
    sc = Scenario(**{f: getattr(args, f) for f in Scenario.__dataclass_fields__})
    specs = fit_lengths(sc.requests(), {})
    result: dict[str, Any] = {"cases": {}}
    all_runs: list[RunResult] = []
    idles = args.idle.split(",")
    orders = abba("static", "arbiter", 1 + len(idles))  # calibration, then one pair per case
    sc, peak, source = peak_and_slo(args, model_dir, sc, specs, result, all_runs, orders[0])
    for idle, order in zip(idles, orders[1:], strict=True):
        budget = budget_for(model_dir, peak, source, sc, idle)
        result["cases"][idle], runs = run_case(model_dir, budget, specs, sc, args.threads, order)
        all_runs += runs
    first = next(iter(result["cases"].values()))["budget"]
    section = markdown_section(result["scenario"], first, result["cases"],
                               provenance(argv, args.threads, load_before), args.threads,
                               result.get("calibration_order"))
    print(section)
    if args.write_docs:
        write_docs(section, args.docs_path)
    if args.plots:
        from elasticserve.bench.serve_plots import write_plots

        result["plots"] = write_plots(args.plots, all_runs, [])
    if args.out_json:
        with open(args.out_json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
