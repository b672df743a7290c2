"""Elastic KV cache overhead: engine throughput with ``kv_cache_mode="elastic"`` (default growth:
pages mapped on demand, given back after ``kv_shrink_after_s``) vs a static cache of the same
size (``kv_cache_mode="static"``, ``kv_cache_bytes`` = the elastic ceiling), on the offline
benchmark's workload. Each pair of runs alternates its order (static then elastic, elastic then
static, ...: ``fairness.abba``) so drift in the machine's speed favours neither; every run is on
a fresh engine. Medians give the overhead, the run-to-run spread says whether it is more than
noise, and the <= 3% target is judged on the whole noise band.

    .venv/bin/python -m elasticserve.bench.elastic_overhead [--model-size small] [--requests 64]
        [--runs 5] [--seed 0] [--threads 2] [--write-docs]

A quicker run for side-by-side checks (flags the pre-restructure commit has too):
``--requests 64 --runs 4`` (8 runs, about 3 minutes on 2 quiet cores).
"""

from __future__ import annotations

import os

# before torch loads, like the offline benchmark (see there)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import gc  # noqa: E402
import statistics  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

from elasticserve.bench import report  # noqa
from elasticserve.bench.fairness import abba, noise_pct, target_verdict, verdict  # noqa: E402
from elasticserve.bench.offline import engine_run  # noqa: E402
from elasticserve.bench.report import Run, Workload, make_workload  # noqa: E402
from elasticserve.models.make_model import ensure_model  # noqa: E402

MODULE = "elasticserve.bench.elastic_overhead"
TARGET_OVERHEAD_PCT = 3.0
GIB = 1 << 30


@dataclass(slots=True)
class OverheadConfig:
    model_dir: str
    requests: int = 64
    seed: int = 0
    threads: int = 2
    runs: int = 5  # per mode = pairs, each pair's order alternating
    kv_cache_bytes: int = 2 * GIB  # the elastic ceiling and the static size
    prompt_lens: tuple[int, int] = (32, 512)
    output_lens: tuple[int, int] = (16, 256)


@dataclass(slots=True)
class OverheadResult:
    config: OverheadConfig
    workload: Workload
    runs: dict[str, list[Run]] = field(default_factory=lambda: {"static": [], "elastic": []})
    load: list[str] = field(default_factory=list)
    order: list[str] = field(default_factory=list)  # modes in the order they ran

    def median(self, mode: str) -> float:
        return statistics.median(r.tokens_per_s for r in self.runs[mode])

    @property
    def overhead_pct(self) -> float:
        """How much slower elastic is than static, in percent of static (negative: faster)."""
        return 100.0 * (self.median("static") / self.median("elastic") - 1.0)

    @property
    def cpu_overhead_pct(self) -> float:
        """The same in tokens per CPU-second of the process: what load from others distorts less."""
        static, elastic = (statistics.median(r.tokens_per_cpu_s for r in self.runs[m])
                           for m in ("static", "elastic"))
        return 100.0 * (static / elastic - 1.0)

    @property
    def pair_overheads_pct(self) -> list[float]:
        """The overhead of each pair of runs made back to back: less sensitive to drift."""
        pairs = zip(self.runs["static"], self.runs["elastic"], strict=False)
        return [100.0 * (s.tokens_per_s / e.tokens_per_s - 1.0) for s, e in pairs]

    @property
    def paired_overhead_pct(self) -> float:
        return statistics.median(self.pair_overheads_pct)

    @property
    def noise_pct(self) -> float:
        """The larger run-to-run spread of the two modes, in percent of its median."""
        return noise_pct(*([r.tokens_per_s for r in self.runs[m]] for m in ("static", "elastic")))

    @property
    def verdict(self) -> str:
        return verdict(self.overhead_pct, self.noise_pct, "elastic slower", "elastic faster")

    @property
    def target_verdict(self) -> str:
        return target_verdict(self.overhead_pct, self.noise_pct, TARGET_OVERHEAD_PCT)

    @property
    def outputs_match(self) -> bool:
        first = self.runs["static"][0].outputs
        return all(r.outputs == first for runs in self.runs.values() for r in runs)


def run_overhead(cfg: OverheadConfig, log: Callable[[str], None] = print) -> OverheadResult:
    """``cfg.runs`` pairs of runs, each pair's order alternating, each run on a fresh engine."""
    with report.torch_threads(cfg.threads):
        return _run_overhead(cfg, log)


def _run_overhead(cfg: OverheadConfig, log: Callable[[str], None]) -> OverheadResult:
    from elasticserve.models.hf_config import load_config

    vocab = load_config(cfg.model_dir).vocab_size
    res = OverheadResult(cfg, make_workload(cfg.requests, vocab, cfg.seed, cfg.prompt_lens,
                                            cfg.output_lens))
    res.load.append(report.load_average())
    for i, pair in enumerate(abba("static", "elastic", cfg.runs)):
        for mode in pair:
            run = engine_run(cfg.model_dir, res.workload, mode, kv_cache_mode=mode,
                             kv_cache_bytes=cfg.kv_cache_bytes)
            gc.collect()  # the finished engine's cache must not share the machine with the next
            res.runs[mode].append(run)
            res.order.append(mode)
            log(f"{mode} #{i + 1}: {run.tokens_per_s:.1f} tok/s over {run.seconds:.1f}s "
                f"(load {report.load_average()})")
    res.load.append(report.load_average())
    return res


def markdown(res: OverheadResult, argv: list[str] | None) -> str:
    cfg, mib = res.config, float(1 << 20)
    rows = []
    for mode in ("static", "elastic"):
        runs = res.runs[mode]
        rows.append([mode, ", ".join(f"{r.tokens_per_s:.1f}" for r in runs), f"{res.median(mode):.1f}",
                     f"{statistics.median(r.tokens_per_cpu_s for r in runs):.1f}",
                     f"{max(r.extra['peak_mapped_bytes'] for r in runs) / mib:.0f}"])
    last = res.runs["elastic"][-1].extra["memory"]
    pairs = res.pair_overheads_pct
    return "\n".join([
        f"### Elastic KV cache overhead ({os.path.basename(cfg.model_dir.rstrip('/'))})", "",
        f"- command: `{report.command_line(MODULE, argv)}`",
        f"- date: {report.today()}; machine: {report.machine_line(cfg.threads)}",
        f"- load average (1/5/15 min) at start and end: {', '.join(res.load)}",
        f"- workload: {res.workload.describe()}; elastic ceiling = static size "
        f"{cfg.kv_cache_bytes / GIB:g} GiB; {cfg.runs} pairs of runs on fresh engines, each "
        f"pair's order alternating: {' '.join(m[0].upper() for m in res.order)} "
        "(S static, E elastic)",
        "", *report.table(["KV cache", "output tokens/s, runs in order", "median tokens/s",
                           "median tokens per CPU-s", "peak mapped MiB"], rows, "llrrr"), "",
        f"- **elastic overhead: {res.overhead_pct:+.2f}%** (static median / elastic median - 1); "
        f"run-to-run spread (max - min over the median, the larger of the two modes): "
        f"{res.noise_pct:.1f}%; verdict: **{res.verdict}**",
        f"- target <= {TARGET_OVERHEAD_PCT:g}%, judged on overhead +- spread "
        f"({res.overhead_pct - res.noise_pct:+.1f}% .. {res.overhead_pct + res.noise_pct:+.1f}%): "
        f"**{res.target_verdict}**",
        f"- back-to-back pairs: {', '.join(f'{x:+.2f}%' for x in pairs)} (median "
        f"{res.paired_overhead_pct:+.2f}%); in tokens per CPU-second: {res.cpu_overhead_pct:+.2f}%",
        f"- greedy outputs of every run identical: {'yes' if res.outputs_match else 'NO'}",
        "- last elastic run's memory_stats: "
        + ", ".join(f"{k} {v}" for k, v in last.items()) + "; peak mapped is sampled after every "
        "engine step",
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="elasticserve bench elastic-overhead",
                                 description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--model-size", default="small", help="make_model size (llama)")
    ap.add_argument("--model", default=None, help="model directory (default models/<size>-llama)")
    ap.add_argument("--requests", type=int, default=64, help="requests per run")
    ap.add_argument("--runs", type=int, default=5,
                    help="runs per mode (pairs; an even count gives each mode the first slot "
                         "equally often)")
    ap.add_argument("--seed", type=int, default=0, help="workload seed")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--kv-cache-gib", type=float, default=2.0, help="elastic ceiling = static size")
    ap.add_argument("--write-docs", action="store_true", help="update docs/BENCHMARKS.md")
    ap.add_argument("--docs-path", default=None, help="the file --write-docs updates")
    args = ap.parse_args(argv)
    cfg = OverheadConfig(ensure_model(args.model, size=args.model_size), args.requests, args.seed,
                         args.threads, args.runs, int(args.kv_cache_gib * GIB))
    text = markdown(run_overhead(cfg), argv)
    print(text)
    if args.write_docs:
        print(f"wrote {report.update_section('elastic-overhead', text, args.docs_path)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
