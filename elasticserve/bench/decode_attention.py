"""The native decode attention kernel alone, old against new, interleaved in one process.

A small-llama-shaped KV cache (8 layers, 4 KV heads, 8 q heads, head_dim 64, block size 16;
block ids shuffled, as the engine's are) holds B sequences of ``ctx`` tokens each. One
"sweep" is one kernel call per layer, as a decode step makes them. The baseline is the kernel
source at a git revision (``--baseline``, default ``main``), compiled with the same flags into
a temporary library; the two are timed in alternating rounds so load on the shared machine
hits both alike. Reports the median ms per sweep, the KV read rate (GB/s of K and V bytes the
sweep must read) and new / old speed. ``--threads 2`` also times the engine's call
(``native.decode`` with ``NativeDecode.threads = 2``), which splits by its own rule.

    .venv/bin/python -m elasticserve.bench.decode_attention [--batches 1,8,32] [--contexts 300,1000]
"""

from __future__ import annotations

import argparse
import ctypes
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from elasticserve import docs_section
from elasticserve.bench.report import table
from elasticserve.kernels import native

MODULE = "elasticserve.bench.decode_attention"
LAYERS, HKV, HQ, D, BS = 8, 4, 8, 64, 16
KERNEL_PATH = "elasticserve/kernels/csrc/paged_decode.c"


def compile_kernel(source: str, workdir: Path, name: str) -> Callable[..., int]:
    """``es_paged_decode_f32`` from C ``source``, built with the engine's flags."""
    src, obj, lib = workdir / f"{name}.c", workdir / f"{name}.o", workdir / f"{name}.so"
    src.write_text(source)
    for cmd in (["cc", *native._COMPILE_FLAGS, "-c", str(src), "-o", str(obj)],
                ["cc", "-shared", str(obj), "-o", str(lib), "-lm"]):
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    fn = ctypes.CDLL(str(lib)).es_paged_decode_f32
    fn.argtypes, fn.restype = native._FUNCTIONS["es_paged_decode_f32"]
    return fn  # type: ignore[no-any-return]


def git_source(rev: str) -> str:
    """The kernel source at ``rev`` of the repository this module sits in."""
    root = Path(__file__).resolve().parents[2]
    return subprocess.run(["git", "-C", str(root), "show", f"{rev}:{KERNEL_PATH}"], check=True,
                          capture_output=True, text=True).stdout


def make_case(batch: int, ctx: int, seed: int = 0) -> tuple[torch.Tensor, native.NativeDecode,
                                                              torch.Tensor]:
    """A random cache with shuffled block ids, the decode work and the queries."""
    per_seq = -(-ctx // BS)
    ids = list(range(batch * per_seq))
    random.Random(seed).shuffle(ids)
    gen = torch.Generator().manual_seed(seed)
    cache = torch.randn(len(ids), LAYERS, 2, BS, HKV, D, generator=gen)
    tables = torch.tensor(ids, dtype=torch.int64).view(batch, per_seq)
    work = native.NativeDecode.build(list(range(batch)), [ctx] * batch, tables)
    return cache, work, torch.randn(batch, HQ, D, generator=gen)


def sweep(fn: Callable[..., int], cache: torch.Tensor, work: native.NativeDecode, q: torch.Tensor,
          out: torch.Tensor) -> None:
    """One call per layer, on this thread, all sequences (the kernel's own entry point)."""
    f32p, i64p = native._f32p, native._i64p
    for layer in range(LAYERS):
        rc = fn(ctypes.cast(q.data_ptr(), f32p), q.stride(0), ctypes.cast(cache.data_ptr(), f32p),
                LAYERS, layer, BS, HKV, HQ, D, ctypes.cast(work.tokens.data_ptr(), i64p),
                ctypes.cast(work.seq_lens.data_ptr(), i64p),
                ctypes.cast(work.tables.data_ptr(), i64p), work.tables.stride(0),
                work.tokens.numel(), 0, 1, ctypes.c_float(D**-0.5),
                ctypes.cast(out.data_ptr(), f32p), out.stride(0))
        if rc != 0:
            raise RuntimeError(f"kernel failed ({rc})")


def engine_sweep(cache: torch.Tensor, work: native.NativeDecode, q: torch.Tensor,
                 out: torch.Tensor) -> None:
    """As the engine calls it: ``native.decode`` (which may split over ``work.threads``)."""
    for layer in range(LAYERS):
        native.decode(q, cache, layer, work, D**-0.5, out)


def time_interleaved(runs: dict[str, Callable[[], None]], rounds: int, reps: int
                     ) -> dict[str, float]:
    """Median seconds per call of each run, the runs alternating round by round."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run()  # warm: pages touched, code loaded
    for r in range(rounds):
        order = list(runs.items()) if r % 2 == 0 else list(reversed(runs.items()))
        for name, run in order:
            start = time.perf_counter()
            for _ in range(reps):
                run()
            times[name].append((time.perf_counter() - start) / reps)
    return {name: statistics.median(ts) for name, ts in times.items()}


def measure(old: Callable[..., int], new: Callable[..., int], batch: int, ctx: int, rounds: int,
            threads: int) -> list[str]:
    """One table row: ms per sweep and GB/s of each run, and the speed-up."""
    cache, work, q = make_case(batch, ctx)
    outs = {name: torch.zeros_like(q) for name in ("old", "new", "engine")}
    runs: dict[str, Callable[[], None]] = {
        "old": lambda: sweep(old, cache, work, q, outs["old"]),
        "new": lambda: sweep(new, cache, work, q, outs["new"])}
    if threads > 1:
        work.threads = threads
        runs["engine"] = lambda: engine_sweep(cache, work, q, outs["engine"])
    kv_bytes = batch * ctx * LAYERS * 2 * HKV * D * 4
    reps = max(1, int(2e8 // kv_bytes))  # ~0.1 s or more per round at ~2 GB/s
    med = time_interleaved(runs, rounds, reps)
    err = (outs["new"] - outs["old"]).abs().max().item()
    row = [str(batch), str(ctx)]
    for name in runs:
        row += [f"{med[name] * 1e3:.3f}", f"{kv_bytes / med[name] / 1e9:.1f}"]
    return [*row, f"{med['old'] / med['new']:.2f}x", f"{err:.1e}"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n")[0])
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--contexts", default="300,1000")
    p.add_argument("--baseline", default="main", help="git revision of the old kernel")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=1, help="also time native.decode with these")
    p.add_argument("--write-docs", action="store_true", help="update docs/BENCHMARKS.md")
    p.add_argument("--docs-path", default=None, help="the file --write-docs updates")
    args = p.parse_args(argv)
    load_before = docs_section.load_average()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        old = compile_kernel(git_source(args.baseline), Path(tmp), "old")
        new = compile_kernel((Path(__file__).parents[2] / KERNEL_PATH).read_text(), Path(tmp), "new")
        rows = [measure(old, new, b, c, args.rounds, args.threads)
                for b in map(int, args.batches.split(",")) for c in map(int, args.contexts.split(","))]
    head = ["B", "ctx", "old ms", "old GB/s", "new ms", "new GB/s"]
    if args.threads > 1:
        head += [f"engine ({args.threads} thr) ms", "engine GB/s"]
    text = "\n".join([
        "### Native decode attention kernel, old vs new (small-llama shapes)", "",
        f"- command: `{docs_section.command_line(MODULE, argv)}`",
        f"- date: {docs_section.today()}; commit {docs_section.git_commit()}; baseline "
        f"{args.baseline}; load average before / after: {load_before} / "
        f"{docs_section.load_average()}",
        f"- one sweep = {LAYERS} calls (layers), 1 thread; median of {args.rounds} alternating "
        "rounds; GB/s = K and V bytes the sweep must read / time", "",
        *table([*head, "new/old speed", "max |new-old|"], rows)])
    print(text)
    if args.write_docs:
        print(f"wrote {docs_section.update_section('decode-attention', text, args.docs_path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
