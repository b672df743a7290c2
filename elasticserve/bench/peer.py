"""elasticserve against vLLM's CPU build, side by side: same model, same workload, own processes.

Each engine runs in a fresh process of its own venv (ours: this interpreter; vLLM: ``.venv-vllm``,
made by ``make peer-venv``) executing ``bench/peer_child.py`` on one JSON job: every concurrency
level in turn, each a seeded workload of random token prompts (32-512) and outputs (16-256),
greedy, ``ignore_eos``, fp32. Level c > 1 submits c requests at once (closed loop, offline);
level 1 runs a few requests one after another. Repeats alternate which engine goes first (ABBA),
so drift in the machine's load hits both. Reported per level: output tok/s (median, range),
tokens per CPU-second of the engine's process tree, TTFT and TPOT P50/P99 (pooled over repeats),
the ratio, and how many greedy outputs are identical.

    .venv/bin/python -m elasticserve.bench.peer [--concurrency 1,8,32,128] [--repeats 2]
        [--sequential-requests 4] [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from elasticserve import docs_section
from elasticserve.bench.fairness import abba, range_verdict, spread_pct
from elasticserve.bench.report import make_workload, table

MODULE = "elasticserve.bench.peer"
ROOT = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).with_name("peer_child.py")
OURS, PEER = "elasticserve", "vllm"
TARGET_TOK_S, TARGET_TPOT = 1.3, 0.8  # ours/vLLM output tok/s >= 1.3x; TPOT P50 at c=1 <= 0.8x


@dataclass(slots=True)
class PeerConfig:
    model_dir: str
    concurrency: tuple[int, ...] = (1, 8, 32, 128)
    repeats: int = 2
    sequential_requests: int = 4  # the requests concurrency 1 runs one after another
    seed: int = 0
    threads: int = 2
    kv_gib: int = 2  # vLLM takes whole GiB (VLLM_CPU_KVCACHE_SPACE)
    max_model_len: int = 1024
    timeout_s: float = 3600.0
    peer_env: dict[str, str] = field(default_factory=dict)  # e.g. VLLM_CPU_OMP_THREADS_BIND
    # argv prefix that runs the child for each engine (the test swaps in a fake)
    commands: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError(f"concurrency must be levels >= 1, got {self.concurrency}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")
        if self.sequential_requests < 1:
            raise ValueError(f"sequential_requests must be >= 1, got {self.sequential_requests}")
        self.commands = {OURS: [sys.executable, str(CHILD)],
                         PEER: [str(ROOT / ".venv-vllm" / "bin" / "python"), str(CHILD)],
                         **self.commands}


@dataclass(slots=True)
class PeerResult:
    config: PeerConfig
    job: dict[str, Any]
    runs: dict[str, list[dict[str, Any]]]  # engine -> one child result per repeat, in run order
    order: list[str]  # engine names in the order they ran
    load: list[str]  # load average before every run and after the last


def make_job(cfg: PeerConfig) -> dict[str, Any]:
    """The JSON both children get: model, settings, and one seeded workload per level."""
    with open(os.path.join(cfg.model_dir, "config.json"), encoding="utf-8") as f:
        vocab = json.load(f)["vocab_size"]
    levels = []
    for c in cfg.concurrency:
        wl = make_workload(cfg.sequential_requests if c == 1 else c, vocab, cfg.seed + c)
        levels.append({"name": f"c{c}", "concurrency": c, "sequential": c == 1,
                       "prompts": wl.prompts, "output_lens": wl.output_lens})
    return {"model": os.path.abspath(cfg.model_dir), "threads": cfg.threads,
            "kv_gib": cfg.kv_gib, "max_model_len": cfg.max_model_len, "levels": levels}


def child_env(engine: str, peer_env: dict[str, str] | None = None) -> dict[str, str]:
    """Both engines get the same threading settings; only ours needs this checkout importable."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)
    if engine == OURS:
        env["PYTHONPATH"] = str(ROOT)
    else:
        env.update(peer_env or {})
    return env


def run_child(engine: str, job_path: str, cfg: PeerConfig) -> dict[str, Any]:
    """One child process; its results, checked: every output has exactly its requested length."""
    with tempfile.TemporaryDirectory(prefix="es-peer-") as tmp:
        out_path = os.path.join(tmp, "out.json")
        proc = subprocess.run([*cfg.commands[engine], engine, job_path, out_path],
                              env=child_env(engine, cfg.peer_env), capture_output=True, text=True,
                              timeout=cfg.timeout_s, check=False)
        if proc.returncode != 0 or not os.path.exists(out_path):
            raise RuntimeError(f"{engine} child failed (rc {proc.returncode}):\n"
                               f"{proc.stderr[-3000:]}")
        with open(out_path, encoding="utf-8") as f:
            result: dict[str, Any] = json.load(f)
    with open(job_path, encoding="utf-8") as f:
        job = json.load(f)
    for level, got in zip(job["levels"], result["levels"], strict=True):
        lens = [len(o) for o in got["outputs"]]
        if lens != level["output_lens"]:
            raise RuntimeError(f"{engine} {level['name']}: output lengths {lens} != requested "
                               f"{level['output_lens']}")
    return result


def run_peer(cfg: PeerConfig, log: Any = print) -> PeerResult:
    """Repeats in ABBA order: ours first in even repeats, vLLM first in odd ones."""
    job = make_job(cfg)
    runs: dict[str, list[dict[str, Any]]] = {OURS: [], PEER: []}
    order, load = [], []
    with tempfile.TemporaryDirectory(prefix="es-peer-job-") as tmp:
        job_path = os.path.join(tmp, "job.json")
        with open(job_path, "w", encoding="utf-8") as f:
            json.dump(job, f)
        for pair in abba(OURS, PEER, cfg.repeats):
            for engine in pair:
                load.append(docs_section.load_average())
                runs[engine].append(run_child(engine, job_path, cfg))
                order.append(engine)
                log(f"{engine}: " + ", ".join(
                    f"{lv['name']} {_tok_s(job, lv):.1f} tok/s" for lv in runs[engine][-1]["levels"]))
    load.append(docs_section.load_average())
    return PeerResult(cfg, job, runs, order, load)


# ---- the report -----------------------------------------------------------------------------
def percentile(values: Sequence[float], pct: float) -> float:
    """Linear-interpolated percentile (numpy's default) of a non-empty sequence."""
    data = sorted(values)
    if not data:
        raise ValueError("percentile of no values")
    pos = (len(data) - 1) * pct / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def _tok_s(job: dict[str, Any], level: dict[str, Any]) -> float:
    spec = next(lv for lv in job["levels"] if lv["name"] == level["name"])
    return sum(spec["output_lens"]) / level["seconds"]


def level_stats(res: PeerResult, engine: str, index: int) -> dict[str, Any]:
    """One engine at one level over its repeats: rates per repeat, pooled latency percentiles."""
    spec = res.job["levels"][index]
    tokens = sum(spec["output_lens"])
    levels = [run["levels"][index] for run in res.runs[engine]]
    ttft = [x for lv in levels for x in lv["ttft_s"]]
    tpot = [x for lv in levels for x in lv["tpot_s"]]
    return {"tok_s": [tokens / lv["seconds"] for lv in levels],
            "tok_cpu_s": [tokens / lv["cpu_seconds"] for lv in levels if lv["cpu_seconds"] > 0],
            "ttft_ms": (percentile(ttft, 50) * 1e3, percentile(ttft, 99) * 1e3),
            "tpot_ms": (percentile(tpot, 50) * 1e3, percentile(tpot, 99) * 1e3) if tpot else None,
            "outputs": levels[-1]["outputs"]}


def _rate(values: list[float]) -> str:
    if not values:
        return "n/a"
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.1f}"
    return f"{med:.1f} ({min(values):.1f}-{max(values):.1f})"


def _pair(ms: tuple[float, float] | None) -> str:
    return "n/a" if ms is None else f"{ms[0]:.1f} / {ms[1]:.1f}"


def level_rows(res: PeerResult, index: int) -> tuple[list[list[str]], dict[str, Any]]:
    """Two table rows (ours, vLLM) for one level, and the level's ratios and verdicts."""
    ours, peer = level_stats(res, OURS, index), level_stats(res, PEER, index)
    ratio = statistics.median(ours["tok_s"]) / statistics.median(peer["tok_s"])
    lo, hi = min(ours["tok_s"]) / max(peer["tok_s"]), max(ours["tok_s"]) / min(peer["tok_s"])
    same = sum(a == b for a, b in zip(ours["outputs"], peer["outputs"], strict=True))
    cpu = (statistics.median(ours["tok_cpu_s"]) / statistics.median(peer["tok_cpu_s"])
           if ours["tok_cpu_s"] and peer["tok_cpu_s"] else None)
    spec = res.job["levels"][index]
    rows = []
    for name, st in ((OURS, ours), ("vLLM-CPU", peer)):
        rows.append([f"c={spec['concurrency']}" if name == OURS else "", name,
                     str(len(spec["prompts"])), _rate(st["tok_s"]), _rate(st["tok_cpu_s"]),
                     _pair(st["ttft_ms"]), _pair(st["tpot_ms"])])
    verdict = range_verdict(lo, hi, TARGET_TOK_S, higher_is_better=True)
    rows[0].append(f"{ratio:.2f}x ({lo:.2f}-{hi:.2f}; >= {TARGET_TOK_S}x: {verdict})")
    rows[1].append(f"{cpu:.2f}x per CPU-s" if cpu is not None else "")
    rows[0].append(f"{same}/{len(spec['prompts'])}")
    rows[1].append("")
    tpot = (ours["tpot_ms"][0] / peer["tpot_ms"][0]
            if ours["tpot_ms"] and peer["tpot_ms"] else None)
    return rows, {"ratio": ratio, "same": same, "n": len(spec["prompts"]), "tpot_ratio": tpot,
                  "spread": max(spread_pct(ours["tok_s"]), spread_pct(peer["tok_s"]))}


def markdown(res: PeerResult, argv: list[str] | None) -> str:
    cfg = res.config
    rows: list[list[str]] = []
    info = []
    for i in range(len(res.job["levels"])):
        r, s = level_rows(res, i)
        rows += r
        info.append(s)
    same, n = sum(s["same"] for s in info), sum(s["n"] for s in info)
    c1 = [s for s, c in zip(info, cfg.concurrency, strict=True) if c == 1]
    lines = [
        f"### elasticserve vs vLLM-CPU ({os.path.basename(cfg.model_dir.rstrip('/'))})", "",
        f"- command: `{docs_section.command_line(MODULE, argv)}`",
        f"- date: {docs_section.today()}; commit {docs_section.git_commit()}; "
        f"{os.cpu_count()} cores ({docs_section.cpu_model()}); both engines "
        f"{cfg.threads} thread{'s' if cfg.threads > 1 else ''} (vLLM: see below), "
        f"OMP_WAIT_POLICY=PASSIVE, fp32, KV {cfg.kv_gib:g} GiB, "
        f"max_model_len {cfg.max_model_len}, each in its own process; vLLM's own CPU "
        f"settings: {_peer_env_text(cfg)}; tok per CPU-s counts each engine's whole process tree",
        f"- run order: {', '.join(res.order)}; load average (1/5/15 min) before each run and "
        f"after: {', '.join(res.load)}",
        f"- workload per level: seeded random token prompts 32-512, outputs 16-256, greedy, "
        f"ignore_eos; c=1 runs {cfg.sequential_requests} requests one after another, c > 1 "
        "submits c requests at once; tok/s and tok/CPU-s: median (range) of "
        f"{cfg.repeats} runs; TTFT and TPOT pooled over the runs", "",
        *table(["level", "engine", "requests", "output tok/s", "tok per CPU-s",
                "TTFT P50 / P99 ms", "TPOT P50 / P99 ms", "ours / vLLM", "greedy identical"],
               rows, "lllrrrrll"), "",
        f"- greedy outputs identical (last run of each): {same}/{n}",
        f"- largest run-to-run spread of a level: {max(s['spread'] for s in info):.1f}%"]
    if c1 and c1[0]["tpot_ratio"] is not None:
        ok = "met" if c1[0]["tpot_ratio"] <= TARGET_TPOT else "MISSED"
        lines.append(f"- TPOT P50 at c=1, ours / vLLM: {c1[0]['tpot_ratio']:.2f}x "
                     f"(<= {TARGET_TPOT}x: {ok})")
    return "\n".join(lines)


def _peer_env_text(cfg: PeerConfig) -> str:
    if not cfg.peer_env:
        return ("its defaults (VLLM_CPU_OMP_THREADS_BIND=auto: on 2 cores the model runs 1 "
                "OpenMP thread, the other core is kept for its front end)")
    return ", ".join(f"{k}={v}" for k, v in sorted(cfg.peer_env.items()))


def add_peer_args(ap: argparse.ArgumentParser, default_concurrency: str, who: str) -> None:
    """The flags `bench peer` and `bench peer-online` share."""
    ap.add_argument("--model-size", default="small", help="make_model size (llama)")
    ap.add_argument("--model", default=None, help="model directory (default models/<size>-llama)")
    ap.add_argument("--concurrency", default=default_concurrency, help="levels, comma separated")
    ap.add_argument("--repeats", type=int, default=2, help=f"runs per {who}, alternating first")
    ap.add_argument("--seed", type=int, default=0, help="workload seed")
    ap.add_argument("--threads", type=int, default=2, help="our engine's torch threads")
    ap.add_argument("--peer-python", default=None, help="vLLM's python (default .venv-vllm)")
    ap.add_argument("--peer-env", action="append", default=[], metavar="KEY=VALUE",
                    help=f"environment for vLLM's {who} only (repeatable), e.g. "
                         "VLLM_CPU_OMP_THREADS_BIND=0-1")
    ap.add_argument("--write-docs", action="store_true", help="update docs/BENCHMARKS.md")
    ap.add_argument("--docs-path", default=None, help="the file --write-docs updates")


def parse_peer_env(pairs: list[str]) -> dict[str, str]:
    """`--peer-env KEY=VALUE` flags as a dict: a ValueError naming peer_env on a bad one."""
    bad = [kv for kv in pairs if "=" not in kv]
    if bad:
        raise ValueError(f"peer_env must be KEY=VALUE, got {bad}")
    return dict(kv.split("=", 1) for kv in pairs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="elasticserve bench peer",
                                 description=(__doc__ or "").splitlines()[0])
    add_peer_args(ap, default_concurrency="1,8,32,128", who="engine")
    ap.add_argument("--sequential-requests", type=int, default=4,
                    help="requests run one after another at concurrency 1")
    args = ap.parse_args(argv)
    from elasticserve.models.make_model import ensure_model

    commands = {PEER: [args.peer_python, str(CHILD)]} if args.peer_python else {}
    cfg = PeerConfig(ensure_model(args.model, size=args.model_size),
                     tuple(int(c) for c in args.concurrency.split(",")), args.repeats,
                     args.sequential_requests, args.seed, args.threads, commands=commands,
                     peer_env=parse_peer_env(args.peer_env))
    text = markdown(run_peer(cfg, lambda s: print(s, file=sys.stderr)), argv)
    print(text)
    if args.write_docs:
        print(f"wrote {docs_section.update_section('peer', text, args.docs_path)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
