"""``elasticserve bench weights-sharing``: memory of two replicas of one model, each in its own
worker process, with the weights shared (``arbiter``: one broker-owned copy mapped read-only by
both) and not shared (``static``: each worker loads its own), side by side.

Reads /proc/PID/status and /proc/PID/smaps_rollup of each worker after a few requests: RssShmem
(shared pages resident in the process, counted whole), Pss (every page divided by the processes
mapping it: summed over processes it counts each page once) and its anonymous/shared split.

Run: ``python -m elasticserve.bench.weights_sharing --model-size small --write-docs``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

from elasticserve import docs_section
from elasticserve.engine.args import EngineArgs
from elasticserve.engine.multi_model import ModelSpec
from elasticserve.procs.worker_pool import WorkerPool
from elasticserve.sampling_params import SamplingParams

MiB = 1 << 20
FIELDS = ("Pss", "Pss_Anon", "Pss_Shmem")


def _kib(path: str, names: tuple[str, ...]) -> dict[str, int]:
    out: dict[str, int] = {}
    with open(path, encoding="ascii") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in names:
                out[key] = int(line.split()[1]) * 1024
    return out


def measure(pid: int) -> dict[str, int]:
    """RssShmem and the Pss fields of one process, in bytes."""
    return {**_kib(f"/proc/{pid}/status", ("RssShmem",)),
            **_kib(f"/proc/{pid}/smaps_rollup", FIELDS)}


def run_policy(model: str, policy: str, memory: int, replicas: int) -> dict[str, Any]:
    pool = WorkerPool([ModelSpec("m", model)], memory, EngineArgs(model=model, num_threads=1),
                      replicas={"m": replicas}, policy=policy)
    try:
        pool.start()
        router = pool.routers["m"]
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)

        async def load() -> None:
            async def one(i: int) -> None:
                async for _ in router.generate(f"prompt {i}", params):
                    pass
            await asyncio.gather(*(one(i) for i in range(4 * replicas)))

        asyncio.run(load())
        workers = pool.workers_report()
        per = [measure(int(w["pid"])) for w in workers]
        return {"policy": policy, "weights": int(workers[0]["weights_bytes"]), "per": per,
                "kv": sum(r.memory_stats()["kv_mapped_bytes"] for r in router.replicas)}
    finally:
        pool.close()


def markdown(results: list[dict[str, Any]]) -> list[str]:
    rows = ["| policy | weights MiB | RssShmem per worker MiB | sum Pss_Shmem MiB | "
            "sum Pss_Anon MiB | sum Pss MiB | KV mapped MiB |", "|---|---|---|---|---|---|---|"]
    for r in results:
        per = r["per"]
        rss = ", ".join(f"{x['RssShmem'] / MiB:.1f}" for x in per)
        rows.append(
            f"| {r['policy']} | {r['weights'] / MiB:.1f} | "
            f"{rss} | "
            f"{sum(p['Pss_Shmem'] for p in per) / MiB:.1f} | "
            f"{sum(p['Pss_Anon'] for p in per) / MiB:.1f} | "
            f"{sum(p['Pss'] for p in per) / MiB:.1f} | {r['kv'] / MiB:.1f} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="elasticserve bench weights-sharing", description=__doc__)
    p.add_argument("--model-size", default="small", help="models/make_model.py size")
    p.add_argument("--replicas", type=int, default=2, help="worker processes of the model")
    p.add_argument("--memory", type=int, default=1 << 30, help="budget in bytes")
    p.add_argument("--write-docs", action="store_true", help="write docs/BENCHMARKS.md")
    args = p.parse_args(argv)
    from elasticserve.models.make_model import ensure_model

    model = ensure_model(size=args.model_size)
    results = [run_policy(model, pol, args.memory, args.replicas)
               for pol in ("static", "arbiter")]
    shared = results[1]
    pss = sum(x["Pss_Shmem"] for x in shared["per"])
    cmd = docs_section.command_line("elasticserve.bench.weights_sharing", argv or sys.argv[1:])
    lines = [f"Command: `{cmd}`",
             f"- date: {docs_section.today()}; commit: {docs_section.git_commit()}; CPU: "
             f"{docs_section.cpu_model()} x {os.cpu_count()}; model: {args.model_size}; "
             f"{args.replicas} replicas, 4 requests each, then /proc of every worker", "",
             *markdown(results), "",
             f"Shared: the workers' Pss_Shmem sums to {pss / MiB:.1f} MiB = "
             f"{(pss - shared['kv']) / shared['weights']:.2f} copies of the weights beside "
             f"{shared['kv'] / MiB:.1f} MiB of KV pages (also memfd, so also Shmem)."]
    body = "\n".join(lines)
    print(body)
    if args.write_docs:
        docs_section.update_section("weights-sharing",
                                    "## Weights shared between replicas (issue 11)\n\n" + body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
