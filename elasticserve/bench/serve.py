"""``elasticserve bench serve``: benchmark a running server with a seeded workload.

Run: ``python -m elasticserve.bench.serve --base-url http://127.0.0.1:8000 --preset gamma
--request-rate 2 --duration 30 --ttft-slo 500 --tpot-slo 200 [--sweep-rates 1,2,4]
[--admin-token T] [--out-json r.json] [--plots DIR]``

Workloads come from :mod:`elasticserve.workload.generators` (named presets below; rates are the mean
requests per second of all models together) or a trace file (:mod:`elasticserve.workload.trace`,
``--trace``; replayed at its own pace unless a rate is given). Prompts are random token ids and
every request generates exactly its output length (``ignore_eos``). Prints Markdown; writes JSON
and PNG plots on request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

import httpx

from elasticserve.bench.serve_client import ClientConfig, run_benchmark
from elasticserve.bench.serve_report import (
    SLO,
    goodput_rates,
    markdown_run,
    markdown_sweep,
    records_json,
    summarize,
)
from elasticserve.workload.generators import (
    ArrivalProcess,
    Fixed,
    LengthDist,
    LogNormal,
    ModelStream,
    RateProfile,
    RequestSpec,
    Uniform,
    Workload,
    zipf_mix,
)
from elasticserve.workload.trace import load_trace, scale_rate

PresetFn = Callable[[Sequence[str], float, LengthDist, LengthDist], Workload]


def _split(models: Sequence[str], duration: float, inp: LengthDist, out: LengthDist,
           profile: Callable[[int], RateProfile], cv: float = 1.0) -> Workload:
    return Workload(tuple(ModelStream(m, ArrivalProcess(profile(i), cv), inp, out)
                          for i, m in enumerate(models)))


def alternating_profile(index: int, num_models: int, rate: float, on_s: float,
                        duration: float, slot_s: float | None = None) -> RateProfile:
    """Model ``index`` of ``num_models`` takes turns: ``rate`` for ``on_s`` at the start of its
    slot (``slot_s``, default ``on_s``) of every round of ``num_models`` slots, else 0."""
    slot = max(slot_s or on_s, on_s)
    points: list[tuple[float, float]] = [(0.0, 0.0)]
    t = index * slot
    while t < duration:
        end = min(t + on_s, duration)
        points += [(t, 0.0), (t, rate), (end, rate), (end, 0.0)]
        t += num_models * slot
    points.append((max(duration, points[-1][0]), 0.0))
    return RateProfile(tuple(points))


def _preset_table(duration: float, burst_s: float) -> dict[str, PresetFn]:
    """Workloads whose total mean rate is 1 req/s (scaled by the requested rate)."""
    def const(n: int) -> Callable[[int], RateProfile]:
        return lambda i: RateProfile.constant(1.0 / n, duration)

    return {
        "poisson": lambda ms, d, i, o: _split(ms, d, i, o, const(len(ms))),
        "gamma": lambda ms, d, i, o: _split(ms, d, i, o, const(len(ms)), cv=2.0),
        "zipf": lambda ms, d, i, o: zipf_mix(ms, 1.0, d, 2.0, i, o),
        "ramp": lambda ms, d, i, o: _split(
            ms, d, i, o, lambda k: RateProfile(((0.0, 0.25 / len(ms)), (d, 1.75 / len(ms))))),
        "bursts": lambda ms, d, i, o: _split(
            ms, d, i, o, lambda k: RateProfile.on_off(4.0 / len(ms), burst_s, 3 * burst_s, d)),
        "alternating": lambda ms, d, i, o: _split(
            ms, d, i, o, lambda k: alternating_profile(k, len(ms), 1.0, burst_s, d)),
    }


PRESETS = ("poisson", "gamma", "zipf", "ramp", "bursts", "alternating")


def length_dist(kind: str, n: int) -> LengthDist:
    """``fixed`` n, ``uniform`` in [n/2, 3n/2], or ``lognormal`` with median n (chat-like)."""
    if kind == "fixed":
        return Fixed(n)
    if kind == "uniform":
        return Uniform(max(1, n // 2), max(1, n * 3 // 2))
    return LogNormal(n, 0.8, 1, 4 * n)


def fit_lengths(specs: list[RequestSpec], max_len: dict[str, int | None]) -> list[RequestSpec]:
    """Clip each request so prompt + output fits its model's context (at least 1 token each)."""
    out = []
    for s in specs:
        limit = max_len.get(s.model) or 1 << 30
        n_out = min(max(s.output_len, 1), max(limit // 2, 1))
        n_in = min(max(s.input_len, 1), max(limit - n_out, 1))
        out.append(RequestSpec(s.arrival, s.model, n_in, n_out))
    return out


def _trace_specs(args: argparse.Namespace, models: Sequence[str], rate: float | None
                 ) -> list[RequestSpec]:
    specs = load_trace(args.trace, model=models[0])
    names = list(dict.fromkeys(s.model for s in specs))
    rename = {n: n if n in models else models[i % len(models)] for i, n in enumerate(names)}
    specs = [RequestSpec(s.arrival, rename[s.model], s.input_len, s.output_len) for s in specs]
    if rate is not None and len(specs) > 1 and specs[-1].arrival > 0:
        specs = scale_rate(specs, rate * specs[-1].arrival / len(specs))
    return specs


def build_specs(args: argparse.Namespace, models: Sequence[str], max_len: dict[str, int | None],
                rate: float | None) -> list[RequestSpec]:
    """The requests of one run: a preset at ``rate`` (req/s) or the trace."""
    if args.trace:
        specs = _trace_specs(args, models, rate)
    else:
        preset = _preset_table(args.duration, args.burst_s)[args.preset]
        workload = preset(models, args.duration, length_dist(args.length_dist, args.input_len),
                          length_dist(args.length_dist, args.output_len))
        specs = workload.generate(args.seed, scale=rate or 1.0)
    if args.num_prompts is not None:
        specs = specs[:args.num_prompts]
    return fit_lengths(specs, max_len)


async def served_models(base_url: str) -> dict[str, int | None]:
    """``/v1/models``: name -> max_model_len."""
    async with httpx.AsyncClient(base_url=base_url, timeout=10.0) as client:
        resp = await client.get("/v1/models")
        resp.raise_for_status()
        return {m["id"]: m.get("max_model_len") for m in resp.json()["data"]}


async def warmup(base_url: str, models: Sequence[str], per_model: int) -> None:
    """A few short requests per model, not recorded (first steps are slower)."""
    if per_model <= 0:
        return
    async with httpx.AsyncClient(base_url=base_url, timeout=60.0) as client:
        for model in models:
            for _ in range(per_model):
                await client.post("/v1/completions", json={
                    "model": model, "prompt": list(range(4, 20)), "max_tokens": 4,
                    "ignore_eos": True})


def client_config(args: argparse.Namespace, rate: float | None) -> ClientConfig:
    return ClientConfig(base_url=args.base_url, max_concurrency=args.max_concurrency,
                        request_timeout_s=args.request_timeout, time_limit_s=args.time_limit,
                        admin_token=args.admin_token, memory_interval_s=args.memory_interval,
                        prompt_seed=args.seed, logprobs=args.logprobs,
                        progress=not args.no_progress, label=args.label, rate=rate)


async def run_cli(args: argparse.Namespace) -> dict[str, Any]:
    """Every run the arguments ask for; returns the JSON report."""
    served = await served_models(args.base_url)
    models = args.models.split(",") if args.models else list(served)
    unknown = [m for m in models if m not in served]
    if unknown:
        raise SystemExit(f"models not served: {unknown}; served: {sorted(served)}")
    await warmup(args.base_url, models, args.warmup)
    slo = SLO(None if args.ttft_slo is None else args.ttft_slo / 1e3,
              None if args.tpot_slo is None else args.tpot_slo / 1e3)
    rates: list[float | None] = list(args.sweep_rates or [args.request_rate])
    runs, summaries = [], []
    for k, rate in enumerate(rates):
        if k:
            await asyncio.sleep(args.cooldown)
        run = await run_benchmark(build_specs(args, models, served, rate), client_config(args, rate))
        runs.append(run)
        summaries.append(summarize(run, slo))
        if args.save_requests:
            summaries[-1]["requests"] = records_json(run)
    report: dict[str, Any] = {"args": {k: v for k, v in vars(args).items() if k != "admin_token"},
                              "runs": summaries}
    if args.sweep_rates:
        report["goodput"] = goodput_rates(summaries)
    if args.plots:
        from elasticserve.bench.serve_plots import write_plots

        report["plots"] = write_plots(args.plots, runs, summaries)
    return report


def _rates(text: str) -> list[float]:
    rates = sorted(float(x) for x in text.split(",") if x.strip())
    if not rates or rates[0] <= 0:
        raise argparse.ArgumentTypeError("rates must be > 0, e.g. 1,2,4")
    return rates


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``elasticserve bench serve``."""
    p = argparse.ArgumentParser(prog="elasticserve bench serve", description=__doc__.split("\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server under test")
    p.add_argument("--models", default=None, help="comma-separated; default: every served model")
    p.add_argument("--preset", choices=PRESETS, default="poisson", help="arrival pattern")
    p.add_argument("--trace", default=None, help=".jsonl or Azure .csv trace instead of a preset")
    p.add_argument("--request-rate", type=float, default=None,
                   help="mean req/s of all models (default: 1 for presets, the trace's own)")
    p.add_argument("--sweep-rates", type=_rates, default=None, help="e.g. 0.5,1,2,4")
    p.add_argument("--duration", type=float, default=30.0, help="preset length in seconds")
    p.add_argument("--burst-s", type=float, default=5.0, help="burst length of bursty presets")
    p.add_argument("--num-prompts", type=int, default=None, help="keep at most this many")
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens: the centre of --length-dist")
    p.add_argument("--output-len", type=int, default=32, help="output tokens: the centre of --length-dist")
    p.add_argument("--length-dist", choices=["fixed", "uniform", "lognormal"], default="uniform",
                   help="how lengths spread around the means")
    p.add_argument("--seed", type=int, default=0, help="workload seed")
    p.add_argument("--max-concurrency", type=int, default=64, help="requests in flight at most")
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument("--time-limit", type=float, default=600.0, help="seconds per run, at most")
    p.add_argument("--cooldown", type=float, default=2.0, help="seconds between swept runs")
    p.add_argument("--warmup", type=int, default=1, help="unrecorded requests per model first")
    p.add_argument("--ttft-slo", type=float, default=None, help="milliseconds")
    p.add_argument("--tpot-slo", type=float, default=None, help="milliseconds")
    p.add_argument("--admin-token", default=None, help="bearer token for /admin/memory")
    p.add_argument("--memory-interval", type=float, default=0.25, help="seconds; 0: off")
    p.add_argument("--logprobs", action="store_true", help="count tokens exactly via logprobs=0")
    p.add_argument("--label", default="run", help="name of the run in reports")
    p.add_argument("--out-json", default=None, help="write the results as JSON here")
    p.add_argument("--save-requests", action="store_true", help="every request in the JSON")
    p.add_argument("--plots", default=None, metavar="DIR", help="write PNG plots here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 when at least one request completed in every run."""
    args = build_parser().parse_args(argv)
    if args.request_rate is None and not args.trace:
        args.request_rate = 1.0
    try:
        report = asyncio.run(run_cli(args))
    except httpx.HTTPError as exc:
        print(f"cannot reach the server at {args.base_url}: {exc}", file=sys.stderr)
        return 2
    print("\n".join(markdown_run(s) for s in report["runs"]))
    if "goodput" in report:
        print(markdown_sweep(report["runs"]))
    if args.out_json:
        with open(args.out_json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
    return 0 if all(s["overall"]["completed"] for s in report["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
