"""Cost of the torch-free core per engine step: scheduler + KV cache manager.

256 running sequences in decode over a 100k-block pool; each step schedules every sequence,
advances it by one token (a new block every `block_size` steps) and publishes full blocks to the
prefix cache. Target: <= 1 ms per step.

    .venv/bin/python -m elasticserve.bench.core_step [--write-docs] [--blocks 100000] [--steps 400]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from elasticserve.config import CacheConfig, SchedulerConfig
from elasticserve.core.block_pool import BlockPool
from elasticserve.core.kv_cache_manager import KVCacheManager
from elasticserve.core.scheduler import Scheduler
from elasticserve.request import SequenceGroup
from elasticserve.sampling_params import SamplingParams


def build(num_seqs: int, num_blocks: int, block_size: int) -> Scheduler:
    pool = BlockPool(num_blocks)
    kv = KVCacheManager(pool, block_size, 0)
    cfg = SchedulerConfig(max_num_seqs=num_seqs, max_num_batched_tokens=1 << 20,
                          max_model_len=1 << 16)
    sched = Scheduler(cfg, CacheConfig(block_size=block_size), kv)
    params = SamplingParams(max_tokens=1 << 15, temperature=0.0)
    for i in range(num_seqs):
        prompt = [(i * 7919 + j) % 32000 for j in range(200 + i % 100)]
        sched.add(SequenceGroup.create(f"r{i}", None, prompt, params, 0.0))
    return sched


def step(sched: Scheduler, token: int) -> int:
    out = sched.schedule()
    sched.on_step_done(out)
    for item in out.scheduled:
        if item.sample_seq_ids:
            sched.seqs[item.seq_id].token_ids.append(token)
    return len(out.scheduled)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="elasticserve bench core",
                                 description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--seqs", type=int, default=256, help="running sequences in decode")
    ap.add_argument("--blocks", type=int, default=100_000, help="KV blocks in the pool")
    ap.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    ap.add_argument("--steps", type=int, default=400, help="engine steps per run")
    ap.add_argument("--repeats", type=int, default=5, help="runs; the median run is reported")
    ap.add_argument("--write-docs", action="store_true", help="update docs/BENCHMARKS.md")
    args = ap.parse_args(argv)
    load_before = os.getloadavg()
    runs = sorted((run_once(args) for _ in range(args.repeats)), key=lambda r: r[0])
    med, p99 = runs[len(runs) // 2]
    line = (f"| decode step, {args.seqs} seqs, {args.blocks} blocks | median {med:.3f} ms | "
            f"p99 {p99:.3f} ms | target 1 ms: {'met' if med <= 1.0 else 'MISSED'} "
            f"({1.0 / med:.2f}x headroom) |")
    print(line)
    if args.write_docs:
        from elasticserve.bench import report

        report.update_section("core-step", "\n\n".join([
            "Torch-free core cost per engine step: Scheduler.schedule + on_step_done + "
            "KVCacheManager work for every running sequence in decode (a new block every "
            "block_size steps, full blocks published to the prefix cache). Median of "
            f"{args.repeats} runs of {args.steps} steps.",
            "| workload | median | p99 | target |\n|---|---|---|---|\n" + line,
            f"Run {report.today()}, {os.cpu_count()} cores, pure Python; load average "
            f"{'/'.join(f'{x:.2f}' for x in load_before)} before.",
            f"Command: `{report.command_line('elasticserve.bench.core_step', argv)}`"]))
    return 0


def run_once(args: argparse.Namespace) -> tuple[float, float]:
    """(median, p99) step time in milliseconds of one fresh run."""
    sched = build(args.seqs, args.blocks, args.block_size)
    step(sched, 1)  # prefill every prompt
    times = []
    for t in range(args.steps):
        start = time.perf_counter()
        scheduled = step(sched, 2 + t % 1000)
        times.append(time.perf_counter() - start)
        assert scheduled == args.seqs
    sched.kv.check_integrity()
    times.sort()
    return statistics.median(times) * 1e3, times[int(len(times) * 0.99)] * 1e3


if __name__ == "__main__":
    raise SystemExit(main())
