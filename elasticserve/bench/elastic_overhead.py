"""Elastic KV cache overhead: engine throughput with ``kv_cache_mode="elastic"`` (default growth:
pages mapped on demand, given back after ``kv_shrink_after_s``) vs a static cache of the same
size (``kv_cache_mode="static"``, ``kv_cache_bytes`` = the elastic ceiling), on the offline
benchmark's workload. Runs alternate (static, elastic, static, elastic, ...), each on a fresh
engine; medians give the overhead. Target: <= 3%.

    .venv/bin/python -m elasticserve.bench.elastic_overhead [--model-size small] [--requests 64]
        [--runs 5] [--seed 0] [--threads 2] [--write-docs]
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
    runs: int = 5  # per mode
    kv_cache_bytes: int = 2 * GIB  # the elastic ceiling and the static size
    prompt_lens: tuple[int, int] = (32, 512)
    output_lens: tuple[int, int] = (16, 256)


@dataclass(slots=True)
class OverheadResult:
    config: OverheadConfig
    workload: Workload
    runs: dict[str, list[Run]] = field(default_factory=lambda: {"static": [], "elastic": []})
    load: list[str] = field(default_factory=list)

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
    def paired_overhead_pct(self) -> float:
        """Median over the (static, elastic) pairs run back to back: less sensitive to drift."""
        pairs = zip(self.runs["static"], self.runs["elastic"], strict=False)
        return statistics.median(100.0 * (s.tokens_per_s / e.tokens_per_s - 1.0) for s, e in pairs)

    @property
    def outputs_match(self) -> bool:
        first = self.runs["static"][0].outputs
        return all(r.outputs == first for runs in self.runs.values() for r in runs)


def run_overhead(cfg: OverheadConfig, log: Callable[[str], None] = print) -> OverheadResult:
    """``cfg.runs`` runs per mode, alternating static and elastic, each on a fresh engine."""
    with report.torch_threads(cfg.threads):
        return _run_overhead(cfg, log)


def _run_overhead(cfg: OverheadConfig, log: Callable[[str], None]) -> OverheadResult:
    from elasticserve.models.hf_config import load_config

    vocab = load_config(cfg.model_dir).vocab_size
    res = OverheadResult(cfg, make_workload(cfg.requests, vocab, cfg.seed, cfg.prompt_lens,
                                            cfg.output_lens))
    res.load.append(report.load_average())
    for i in range(cfg.runs):
        for mode in ("static", "elastic"):
            run = engine_run(cfg.model_dir, res.workload, mode, kv_cache_mode=mode,
                             kv_cache_bytes=cfg.kv_cache_bytes)
            gc.collect()  # the finished engine's cache must not share the machine with the next
            res.runs[mode].append(run)
            log(f"{mode} #{i + 1}: {run.tokens_per_s:.1f} tok/s over {run.seconds:.1f}s "
                f"(load {report.load_average()})")
    res.load.append(report.load_average())
    return res


def markdown(res: OverheadResult, argv: list[str] | None) -> str:
    cfg, mib = res.config, float(1 << 20)
    ok = res.overhead_pct <= TARGET_OVERHEAD_PCT
    rows = []
    for mode in ("static", "elastic"):
        runs = res.runs[mode]
        rows.append([mode, ", ".join(f"{r.tokens_per_s:.1f}" for r in runs), f"{res.median(mode):.1f}",
                     f"{statistics.median(r.tokens_per_cpu_s for r in runs):.1f}",
                     f"{max(r.extra['peak_mapped_bytes'] for r in runs) / mib:.0f}"])
    last = res.runs["elastic"][-1].extra["memory"]
    return "\n".join([
        f"### Elastic KV cache overhead ({os.path.basename(cfg.model_dir.rstrip('/'))})", "",
        f"- command: `{report.command_line(MODULE, argv)}`",
        f"- date: {report.today()}; machine: {report.machine_line(cfg.threads)}",
        f"- load average (1/5/15 min) at start and end: {', '.join(res.load)}",
        f"- workload: {res.workload.describe()}; elastic ceiling = static size "
        f"{cfg.kv_cache_bytes / GIB:g} GiB; runs alternate static, elastic, ... on fresh engines",
        "", *report.table(["KV cache", "output tokens/s, runs in order", "median tokens/s",
                           "median tokens per CPU-s", "peak mapped MiB"], rows, "llrrr"), "",
        f"- **elastic overhead: {res.overhead_pct:+.2f}%** (static median / elastic median - 1; "
        f"target <= {TARGET_OVERHEAD_PCT:g}%: {'met' if ok else 'MISSED'}); median of the "
        f"back-to-back pairs: {res.paired_overhead_pct:+.2f}%; in tokens per CPU-second: "
        f"{res.cpu_overhead_pct:+.2f}%",
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
    ap.add_argument("--runs", type=int, default=5, help="runs per mode")
    ap.add_argument("--seed", type=int, default=0, help="workload seed")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--kv-cache-gib", type=float, default=2.0, help="elastic ceiling = static size")
    ap.add_argument("--write-docs", action="store_true", help="update docs/BENCHMARKS.md")
    args = ap.parse_args(argv)
    cfg = OverheadConfig(ensure_model(args.model, size=args.model_size), args.requests, args.seed,
                         args.threads, args.runs, int(args.kv_cache_gib * GIB))
    text = markdown(run_overhead(cfg), argv)
    print(text)
    if args.write_docs:
        print(f"wrote {report.update_section('elastic-overhead', text)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
