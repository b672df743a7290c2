"""Two checkouts of the engine on one workload, side by side: did a change cost throughput?

Each run is a fresh process whose ``PYTHONPATH`` is one checkout (the base revision is put in a
temporary git worktree), driving only the public offline API (``LLM``, ``SamplingParams``,
``generate``), so the same child script runs on any commit. Runs go in ABBA order per round (the
side that runs first alternates), and the report gives each side's median, spread and the ratio,
and calls a difference "within noise" when it is inside the two sides' spread. Greedy outputs of
the two sides are compared token for token.

    .venv/bin/python -m elasticserve.bench.ab_commits --base 047e066 [--rounds 2]
        [--requests 48] [--mode elastic --mode static] [--write-docs]
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

from elasticserve import docs_section
from elasticserve.bench.fairness import abba, diff_pct, noise_pct, spread_pct, verdict

# Runs in the child: public API only, so it is the same program on both commits.
CHILD = r"""
import json, os, random, sys, time
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch
from elasticserve import LLM, SamplingParams
cfg = json.loads(sys.argv[1])
torch.set_num_threads(cfg["threads"])
rng = random.Random(cfg["seed"])
llm = LLM(cfg["model"], kv_cache_mode=cfg["mode"], kv_cache_bytes=cfg["kv_bytes"])
vocab = llm.engine.model_config.vocab_size
prompts = [{"prompt_token_ids": [rng.randrange(vocab) for _ in range(rng.randint(32, 512))]}
           for _ in range(cfg["requests"])]
params = [SamplingParams(max_tokens=rng.randint(16, 256), temperature=0.0, ignore_eos=True)
          for _ in range(cfg["requests"])]
llm.generate([{"prompt_token_ids": [1, 2, 3]}] * 2, SamplingParams(max_tokens=2, ignore_eos=True))
start, cpu = time.perf_counter(), time.process_time()
outs = llm.generate(prompts, params)
wall, cpu = time.perf_counter() - start, time.process_time() - cpu
tokens = [list(o.outputs[0].token_ids) for o in outs]
print(json.dumps({"seconds": wall, "cpu_seconds": cpu, "tokens": sum(map(len, tokens)),
                  "outputs": tokens}))
"""


@dataclass(slots=True)
class Side:
    name: str
    path: str
    tok_s: list[float] = field(default_factory=list)
    tok_cpu_s: list[float] = field(default_factory=list)
    outputs: list[list[int]] | None = None


def run_child(side: Side, cfg: dict[str, object]) -> None:
    env = {**os.environ, "PYTHONPATH": side.path, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], env=env, cwd=side.path,
                          capture_output=True, text=True, timeout=1800, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{side.name} run failed:\n{proc.stderr[-2000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    side.tok_s.append(res["tokens"] / res["seconds"])
    side.tok_cpu_s.append(res["tokens"] / res["cpu_seconds"])
    side.outputs = res["outputs"]


def base_worktree(rev: str) -> str:
    path = tempfile.mkdtemp(prefix="es-ab-")
    subprocess.run(["git", "worktree", "add", "--detach", "-f", path, rev], check=True,
                   capture_output=True)
    return path


def compare(mode: str, base: Side, head: Side, args: argparse.Namespace) -> list[str]:
    cfg = {"model": os.path.abspath(args.model), "mode": mode, "kv_bytes": args.kv_mib << 20,
           "requests": args.requests, "seed": args.seed, "threads": args.threads}
    for pair in abba(base, head, 2 * args.rounds):
        for side in pair:
            run_child(side, cfg)
            print(f"  {mode:8} {side.name:5} {side.tok_s[-1]:7.1f} tok/s", file=sys.stderr)
    same = sum(x == y for x, y in zip(base.outputs or [], head.outputs or [], strict=True))
    diff, noise = diff_pct(head.tok_s, base.tok_s), noise_pct(head.tok_s, base.tok_s)
    return [f"| {mode} | {_fmt(base.tok_s)} | {_fmt(head.tok_s)} | {diff:+.1f}% | "
            f"{noise:.1f}% | {verdict(diff, noise)} | {same}/{len(head.outputs or [])} |"]


def overhead_lines(sides: dict[str, tuple[Side, Side]]) -> list[str]:
    """Elastic vs static on each side (what `bench elastic-overhead` measures), when both ran."""
    if set(sides) != {"elastic", "static"}:
        return []
    out = ["", "Elastic vs static throughput on each side (median ratio - 1):", ""]
    for i, name in enumerate(("base", "head")):
        el, st = sides["elastic"][i].tok_s, sides["static"][i].tok_s
        out.append(f"- {name}: {diff_pct(el, st):+.1f}% (noise {noise_pct(el, st):.1f}%: "
                   f"{verdict(diff_pct(el, st), noise_pct(el, st))})")
    return out


def _fmt(values: Sequence[float]) -> str:
    return (f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f}, "
            f"spread {spread_pct(values):.1f}%)")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="elasticserve bench ab", description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True, help="git revision to compare the working tree with")
    p.add_argument("--model", default="models/small-llama", help="model directory (made if absent)")
    p.add_argument("--mode", action="append", choices=["elastic", "static"],
                   help="KV cache mode(s) to compare (repeatable; default both)")
    p.add_argument("--rounds", type=int, default=2,
                   help="rounds of ABBA: each round runs each side twice, first and second once")
    p.add_argument("--requests", type=int, default=48, help="requests per run, all at once")
    p.add_argument("--kv-mib", type=int, default=1024, help="KV cache size / elastic ceiling")
    p.add_argument("--seed", type=int, default=0, help="workload seed")
    p.add_argument("--threads", type=int, default=2, help="torch threads per run")
    p.add_argument("--write-docs", action="store_true", help="write the ab-commits section")
    args = p.parse_args(argv)
    from elasticserve.models.make_model import ensure_model

    ensure_model(args.model, size="small")
    load, base_path = docs_section.load_average(), base_worktree(args.base)
    sides = {mode: (Side("base", base_path), Side("head", os.getcwd()))
             for mode in args.mode or ["elastic", "static"]}
    try:
        rows = [row for mode, (b, h) in sides.items() for row in compare(mode, b, h, args)]
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", base_path], check=False,
                       capture_output=True)
    rows += overhead_lines(sides)
    cmd = docs_section.command_line("elasticserve.bench.ab_commits", list(argv or sys.argv[1:]))
    lines = [f"Command: `{cmd}`", "",
             f"- date: {docs_section.today()}; head commit: {docs_section.git_commit()}; "
             f"CPU: {docs_section.cpu_model()}; load before: {load}", "",
             f"{args.requests} requests at once (prompts 32-512, outputs 16-256, greedy, "
             f"ignore_eos), {args.threads} threads, {args.rounds} ABBA rounds; base = `{args.base}`, "
             "head = the working tree.", "",
             "| mode | base tok/s: median (range, spread) | head tok/s: median (range, spread) | "
             "head vs base | noise | verdict | greedy outputs identical |",
             "|---|---|---|---|---|---|---|", *rows]
    print("\n".join(lines))
    if args.write_docs:
        docs_section.update_section("ab-commits", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
