"""`serve`'s worker-process flags: replicas, prefill/decode split, and starting the pool."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # parsing the command line loads no engine
    from elasticserve.engine.args import EngineArgs
    from elasticserve.engine.multi_model import ModelSpec
    from elasticserve.engine.protocol import EngineClient


def add_worker_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--replicas", action="append", default=[], metavar="NAME=N",
                   help="run N worker processes of model NAME (they share one copy of its "
                        "weights); default 1")
    p.add_argument("--pd", action="append", default=[], metavar="NAME=P:D",
                   help="serve model NAME disaggregated: P prefill and D decode worker "
                        "processes (one copy of the weights); KV goes from one to the other "
                        "by page ownership (see --kv-handoff)")
    p.add_argument("--kv-handoff", choices=["pages", "copy"], default="pages",
                   help="P/D hand-off: lend whole KV pages (zero-copy; the default page size "
                        "becomes one KV block) or copy the blocks' bytes")
    p.add_argument("--in-process", action="store_true",
                   help="run every model inside the server process instead of one worker "
                        "process per replica (no --replicas, no --pd)")


def parse_replicas(specs: list[str]) -> dict[str, int]:
    """['a=2'] -> {'a': 2}: worker processes per model."""
    out: dict[str, int] = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not sep or not value.isdigit() or int(value) < 1:
            raise ValueError(f"--replicas must be NAME=N with N >= 1, got {spec!r}")
        out[name] = int(value)
    return out


def parse_pd(specs: list[str]) -> dict[str, tuple[int, int]]:
    """['a=1:2'] -> {'a': (1, 2)}: prefill and decode workers per model."""
    out: dict[str, tuple[int, int]] = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        p, colon, d = value.partition(":")
        if not (sep and colon and p.isdigit() and d.isdigit() and int(p) >= 1 and int(d) >= 1):
            raise ValueError(f"--pd must be NAME=P:D with P, D >= 1, got {spec!r}")
        out[name] = (int(p), int(d))
    return out


def start_workers(args: argparse.Namespace, specs: list[ModelSpec],
                  base: EngineArgs) -> tuple[Any, dict[str, EngineClient]]:
    """The started `WorkerPool` and its routers, one `EngineClient` per model."""
    from elasticserve.procs.worker_pool import WorkerPool

    if args.pd and base.layerwise_residency:
        raise ValueError("--layerwise-residency does not work with --pd yet (a streamed "
                         "sequence's KV is in the host tier, which the hand-off does not read)")
    pool = WorkerPool(specs, args.memory, base, replicas=parse_replicas(args.replicas),
                      max_queue=args.max_queue, policy=args.memory_policy,
                      idle_sleep_s=args.idle_sleep_s, pd=parse_pd(args.pd),
                      kv_handoff=args.kv_handoff)
    try:
        pool.start()
    except BaseException:
        pool.close()
        raise
    return pool, dict(pool.routers)
