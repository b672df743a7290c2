"""elasticserve against vLLM's CPU build online: both OpenAI servers, one client, one workload.

Each repeat starts each server in turn (ABBA order, so drift in the machine's load hits both):
ours (``elasticserve serve``, the model in its worker process) and vLLM's
(``.venv-vllm/bin/python -m vllm.entrypoints.openai.api_server``, its CPU defaults) on the same
model directory, fp32, the same ``max_model_len`` and KV size. Every level is driven by the
same client (``bench/serve_client.run_benchmark``, streamed completions of random token-id
prompts, greedy, ``ignore_eos``) on the same seeded workload: prompts 32-512 tokens, outputs
16-256, all requests queued at once with at most ``c`` in flight (a closed loop at concurrency
``c``). Reported per level: output tok/s (median and range over repeats), tokens per CPU-second
of the server's process tree, TTFT and TPOT P50/P99 (pooled over repeats), ours / vLLM.

    .venv/bin/python -m elasticserve.bench.peer_online [--concurrency 1,8,32] [--repeats 2]
        [--peer-python .venv-vllm/bin/python] [--write-docs]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from elasticserve import docs_section
from elasticserve.bench.fairness import abba
from elasticserve.bench.peer import OURS, PEER, add_peer_args, child_env, parse_peer_env
from elasticserve.bench.peer_child import proc_tree_cpu_seconds
from elasticserve.bench.peer_online_report import LevelRun, markdown
from elasticserve.bench.report import make_workload
from elasticserve.bench.serve_client import ClientConfig, run_benchmark
from elasticserve.workload.generators import RequestSpec

MODULE = "elasticserve.bench.peer_online"
ROOT = Path(__file__).resolve().parents[2]
ServerCommand = Callable[["OnlineConfig", int], list[str]]


def ours_command(cfg: OnlineConfig, port: int) -> list[str]:
    """``elasticserve serve``: one worker process, the same thread count, KV + weights budget."""
    return [sys.executable, "-m", "elasticserve.cli", "serve",
            "--model", f"{cfg.served_name}={cfg.model_dir}", "--threads", str(cfg.threads),
            "--max-model-len", str(cfg.max_model_len),
            "--memory", f"{cfg.kv_gib * 1024 + 256}MiB",  # KV as vLLM's + room for the weights
            "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
            "--shutdown-timeout", "5"]


def vllm_command(cfg: OnlineConfig, port: int) -> list[str]:
    """vLLM's OpenAI server with its CPU defaults; KV size comes by VLLM_CPU_KVCACHE_SPACE."""
    return [cfg.peer_python, "-m", "vllm.entrypoints.openai.api_server",
            "--model", cfg.model_dir, "--served-model-name", cfg.served_name,
            "--dtype", "float32", "--max-model-len", str(cfg.max_model_len), "--seed", "0",
            "--host", "127.0.0.1", "--port", str(port), "--uvicorn-log-level", "warning",
            "--disable-log-stats"]


@dataclass(slots=True)
class OnlineConfig:
    model_dir: str
    concurrency: tuple[int, ...] = (1, 8, 32)
    repeats: int = 2
    requests_per_slot: int = 3  # a level sends this many requests per slot (c=1: at least 4)
    seed: int = 0
    threads: int = 2
    kv_gib: int = 2
    max_model_len: int = 1024
    served_name: str = "small"
    peer_python: str = str(ROOT / ".venv-vllm" / "bin" / "python")
    peer_env: dict[str, str] = field(default_factory=dict)
    start_timeout_s: float = 900.0
    request_timeout_s: float = 600.0
    # engine -> (config, port) -> argv of its server (the test swaps in a fake)
    servers: dict[str, ServerCommand] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError(f"concurrency must be levels >= 1, got {self.concurrency}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")
        if self.requests_per_slot < 1:
            raise ValueError(f"requests_per_slot must be >= 1, got {self.requests_per_slot}")
        self.servers = {OURS: ours_command, PEER: vllm_command, **self.servers}


@dataclass(slots=True)
class OnlineResult:
    config: OnlineConfig
    levels: list[list[RequestSpec]]  # one request list per concurrency level
    runs: dict[str, list[list[LevelRun]]]  # engine -> per repeat, one LevelRun per level
    order: list[str]
    load: list[str]  # load average before every run and after the last


def make_levels(cfg: OnlineConfig) -> list[list[RequestSpec]]:
    """One seeded request list per level, the same for both servers; all arrive at t=0."""
    with open(os.path.join(cfg.model_dir, "config.json"), encoding="utf-8") as f:
        vocab = json.load(f)["vocab_size"]
    levels = []
    for c in cfg.concurrency:
        n = max(4, cfg.requests_per_slot * c) if c == 1 else cfg.requests_per_slot * c
        wl = make_workload(n, vocab, cfg.seed + c)
        levels.append([RequestSpec(0.0, cfg.served_name, len(p), o)
                       for p, o in zip(wl.prompts, wl.output_lens, strict=True)])
    return levels


def free_port() -> int:
    """A port free right now (vLLM has no port file; another process could take it first)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def server(engine: str, cfg: OnlineConfig) -> Iterator[tuple[str, int]]:
    """One server process until /health answers; yields (base URL, pid); always stopped."""
    port = free_port()
    env = child_env(engine, cfg.peer_env)
    if engine == PEER:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.kv_gib))  # whole GiB
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cfg.servers[engine](cfg, port), stdout=log,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_healthy(proc, url, time.monotonic() + cfg.start_timeout_s, log)
            yield url, proc.pid
        finally:
            _stop(proc)


def _wait_healthy(proc: subprocess.Popen[Any], url: str, deadline: float, log: Any) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"server at {url} did not answer /health in time")


def _stop(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM the server's process group (vLLM's engine core is a child), then SIGKILL."""
    for sig, wait in ((15, 30.0), (9, 10.0)):
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait)


def run_level(url: str, pid: int, specs: list[RequestSpec], c: int,
              cfg: OnlineConfig) -> LevelRun:
    """One level against a running server; CPU seconds of the server's whole process tree."""
    client = ClientConfig(url, max_concurrency=c, request_timeout_s=cfg.request_timeout_s,
                          time_limit_s=cfg.request_timeout_s * len(specs), memory_interval_s=0,
                          prompt_seed=cfg.seed + c, progress=False, label=f"c{c}")
    cpu = proc_tree_cpu_seconds(pid)
    res = asyncio.run(run_benchmark(specs, client))
    return LevelRun(res.duration_s, proc_tree_cpu_seconds(pid) - cpu, res.records)


def warm_up(url: str, cfg: OnlineConfig) -> None:
    """Two short requests first, so first-call costs (compiles, allocations) are not timed."""
    specs = [RequestSpec(0.0, cfg.served_name, 16, 8), RequestSpec(0.0, cfg.served_name, 64, 8)]
    client = ClientConfig(url, max_concurrency=2, memory_interval_s=0, progress=False)
    res = asyncio.run(run_benchmark(specs, client))
    bad = [r.error for r in res.records if not r.ok]
    if bad:
        raise RuntimeError(f"warm-up failed at {url}: {bad[0]}")


def run_online(cfg: OnlineConfig, log: Callable[[str], None] = print) -> OnlineResult:
    """Repeats in ABBA order; each run starts its server, warms it, runs every level."""
    levels = make_levels(cfg)
    runs: dict[str, list[list[LevelRun]]] = {OURS: [], PEER: []}
    order, load = [], []
    for pair in abba(OURS, PEER, cfg.repeats):
        for engine in pair:
            with server(engine, cfg) as (url, pid):
                warm_up(url, cfg)
                load.append(docs_section.load_average())
                got = [run_level(url, pid, specs, c, cfg)
                       for specs, c in zip(levels, cfg.concurrency, strict=True)]
            runs[engine].append(got)
            order.append(engine)
            log(f"{engine}: " + ", ".join(f"c={c} {lr.tok_s():.1f} tok/s ({lr.failed()} failed)"
                                          for c, lr in zip(cfg.concurrency, got, strict=True)))
    load.append(docs_section.load_average())
    return OnlineResult(cfg, levels, runs, order, load)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="elasticserve bench peer-online",
                                 description=(__doc__ or "").splitlines()[0])
    add_peer_args(ap, default_concurrency="1,8,32", who="server")
    ap.add_argument("--requests-per-slot", type=int, default=3,
                    help="a level at concurrency c sends this many x c requests (c=1: >= 4)")
    args = ap.parse_args(argv)
    from elasticserve.models.make_model import ensure_model

    cfg = OnlineConfig(ensure_model(args.model, size=args.model_size),
                       tuple(int(c) for c in args.concurrency.split(",")), args.repeats,
                       args.requests_per_slot, args.seed, args.threads,
                       peer_env=parse_peer_env(args.peer_env))
    if args.peer_python:
        cfg.peer_python = args.peer_python
    res = run_online(cfg, lambda s: print(s, file=sys.stderr))
    text = markdown(res, docs_section.command_line(MODULE, argv))
    print(text)
    if args.write_docs:
        print(f"wrote {docs_section.update_section('peer-online', text, args.docs_path)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
