"""One engine of `elasticserve bench peer`, in its own process: reads a JSON job, writes JSON.

Run by path, not as a module, by the python of the engine's own venv:

    .venv-vllm/bin/python elasticserve/bench/peer_child.py vllm JOB.json OUT.json
    .venv/bin/python elasticserve/bench/peer_child.py elasticserve JOB.json OUT.json

Only the standard library at module level: the peer venv has vLLM and torch but none of our
dependencies, and running the file by path does not import the ``elasticserve`` package. The
same measuring loop (:func:`drive`) serves both engines; only the adapters differ: every request
is added at once, the engine's step loop runs until all are done, and each request's first
token and finish are timestamped as the step that made them returns. CPU time is the whole
process tree's (vLLM runs its engine core in a child process), read from /proc.

JOB: {"model", "threads", "kv_gib", "max_model_len", "levels": [{"name", "sequential",
"prompts": [[ids]], "output_lens": [n]}]}. OUT: {"engine", "levels": [{"name", "seconds",
"cpu_seconds", "outputs", "ttft_s", "tpot_s"}]}.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

# (request id, tokens produced in this step or so far, finished, all tokens when finished,
#  the engine's own first-token time (monotonic) when it reports one)
Event = tuple[str, int, bool, list[int] | None, float | None]


class Adapter(Protocol):
    """What :func:`drive` needs of an engine."""

    def add(self, rid: str, prompt: list[int], max_tokens: int) -> None: ...

    def step(self) -> Iterable[Event]: ...


def proc_tree_cpu_seconds(root: int | None = None) -> float:
    """User + system CPU seconds of process ``root`` (default: this one) and its live
    descendants, from /proc/PID/stat; 0.0 where /proc is missing."""
    root = os.getpid() if root is None else root
    ticks = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, int]] = {}  # pid -> (ppid, utime + stime in ticks)
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return 0.0
    for name in pids:
        try:
            with open(f"/proc/{name}/stat", encoding="ascii") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended while we looked
        # after the command: state ppid ... utime (12th) stime (13th), counting state as 1st
        stats[int(name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    tree, grew = {root}, True
    while grew:
        grew = False
        for pid, (ppid, _) in stats.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                grew = True
    total = sum(stats[p][1] for p in tree if p in stats)
    return total / ticks


def drive(engine: Adapter, prompts: list[list[int]], output_lens: list[int],
          clock: Callable[[], float] | None = None) -> dict[str, Any]:
    """All requests at once, stepped to the end: tokens, TTFT and TPOT per request (in order)."""
    clock = clock or time.monotonic
    start = clock()
    for i, (prompt, n) in enumerate(zip(prompts, output_lens, strict=True)):
        engine.add(str(i), prompt, n)
    first: dict[str, float] = {}
    done: dict[str, tuple[list[int], float]] = {}
    while len(done) < len(prompts):
        events = list(engine.step())
        now = clock()
        for rid, count, finished, tokens, engine_first in events:
            if count > 0 and rid not in first:
                first[rid] = engine_first if engine_first is not None else now
            if finished:
                done[rid] = (tokens or [], now)
    ids = [str(i) for i in range(len(prompts))]
    ttft = [first[r] - start for r in ids]
    tpot = [(done[r][1] - first[r]) / (len(done[r][0]) - 1) for r in ids if len(done[r][0]) > 1]
    return {"seconds": clock() - start, "outputs": [done[r][0] for r in ids], "ttft_s": ttft,
            "tpot_s": tpot}


def run_level(engine: Adapter, level: dict[str, Any]) -> dict[str, Any]:
    """One concurrency level; ``sequential`` runs the requests one at a time (concurrency 1)."""
    cpu = proc_tree_cpu_seconds()
    prompts, lens = level["prompts"], level["output_lens"]
    if level.get("sequential"):
        parts = [drive(engine, [p], [n]) for p, n in zip(prompts, lens, strict=True)]
        res = {"seconds": sum(p["seconds"] for p in parts),
               **{k: [x for p in parts for x in p[k]] for k in ("outputs", "ttft_s", "tpot_s")}}
    else:
        res = drive(engine, prompts, lens)
    return {"name": level["name"], "cpu_seconds": proc_tree_cpu_seconds() - cpu, **res}


class Elasticserve:
    """Our engine's step loop; first-token times come from the engine's own metrics, so no
    request needs streaming (which would detokenize every step)."""

    def __init__(self, job: dict[str, Any]) -> None:
        from elasticserve import LLM, SamplingParams

        self.params = SamplingParams
        self.engine = LLM(job["model"], num_threads=job["threads"], seed=0,
                          kv_cache_bytes=int(job["kv_gib"] * (1 << 30)),
                          max_model_len=job["max_model_len"]).engine

    def add(self, rid: str, prompt: list[int], max_tokens: int) -> None:
        params = self.params(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        self.engine.add_request({"prompt_token_ids": prompt}, params, request_id=rid)

    def step(self) -> Iterable[Event]:
        for out in self.engine.step():
            tokens = list(out.outputs[0].token_ids)
            yield out.request_id, len(tokens), out.finished, tokens, \
                out.metrics.get("first_token_time")


class Vllm:
    """vLLM's step loop with DELTA outputs (each step's new tokens only)."""

    def __init__(self, job: dict[str, Any]) -> None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(job["kv_gib"]))  # whole GiB
        from vllm import LLM, SamplingParams
        from vllm.sampling_params import RequestOutputKind

        self.params, self.kind = SamplingParams, RequestOutputKind.DELTA
        self.engine = LLM(model=job["model"], dtype="float32", seed=0,
                          max_model_len=job["max_model_len"]).llm_engine
        self.tokens: dict[str, list[int]] = {}

    def add(self, rid: str, prompt: list[int], max_tokens: int) -> None:
        params = self.params(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                             output_kind=self.kind)
        self.tokens[rid] = []
        self.engine.add_request(rid, {"prompt_token_ids": prompt}, params)

    def step(self) -> Iterable[Event]:
        for out in self.engine.step():
            new = list(out.outputs[0].token_ids)
            self.tokens[out.request_id].extend(new)
            tokens = self.tokens.pop(out.request_id) if out.finished else None
            yield out.request_id, len(new), out.finished, tokens, None


ENGINES: dict[str, Callable[[dict[str, Any]], Adapter]] = {
    "elasticserve": Elasticserve, "vllm": Vllm}


def main(argv: list[str]) -> int:
    name, job_path, out_path = argv
    with open(job_path, encoding="utf-8") as f:
        job = json.load(f)
    engine = ENGINES[name](job)
    drive(engine, [[1, 2, 3], [4, 5]], [2, 2])  # warm up: first-call costs out of the timings
    levels = [run_level(engine, level) for level in job["levels"]]
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump({"engine": name, "levels": levels}, f)
    return 0


if __name__ == "__main__":
    # a script that builds vllm.LLM must guard its entry point: vLLM spawns its engine process
    sys.exit(main(sys.argv[1:]))
