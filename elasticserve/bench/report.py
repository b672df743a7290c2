"""Benchmark results in docs/BENCHMARKS.md: one named, replaceable section per benchmark.

The section writer (``<!-- bench:NAME -->`` blocks) is :mod:`elasticserve.docs_section`, which
the torch-free simulator shares; it is re-exported here. Also what the benchmarks share:
seeded workloads and timed, checked runs; what every section carries (machine, load, command,
date); probes of the machine's read bandwidth and matmul rate.
"""

from __future__ import annotations

import contextlib
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

# re-exported: the benchmarks write their sections through ``report`` as before
from elasticserve.docs_section import (  # noqa: F401
    COMMENTARY,
    DOCS_PATH,
    HEADER,
    command_line,
    cpu_model,
    load_average,
    markers,
    replace_section,
    today,
    update_section,
)


# ---- workloads and timed runs ---------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    def subset(self, idx: Sequence[int]) -> Workload:
        return Workload([self.prompts[i] for i in idx], [self.output_lens[i] for i in idx])

    def describe(self) -> str:
        p, o = [len(x) for x in self.prompts], self.output_lens
        return (f"{len(p)} requests, prompts {min(p)}-{max(p)} (mean {statistics.mean(p):.0f}), "
                f"outputs {min(o)}-{max(o)} (mean {statistics.mean(o):.0f}) tokens")


def make_workload(n: int, vocab: int, seed: int, prompt_lens: tuple[int, int] = (32, 512),
                  output_lens: tuple[int, int] = (16, 256)) -> Workload:
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(*prompt_lens))] for _ in range(n)]
    return Workload(prompts, [rng.randint(*output_lens) for _ in range(n)])


@dataclass(slots=True)
class Run:
    name: str
    workload: Workload = field(repr=False)
    seconds: float
    cpu_seconds: float  # of the whole process, every thread
    outputs: list[list[int]] = field(repr=False)
    steps: int = 0  # engine steps (ours only)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def output_tokens(self) -> int:
        return sum(self.workload.output_lens)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def tokens_per_cpu_s(self) -> float:
        return self.output_tokens / self.cpu_seconds


def timed(name: str, wl: Workload, vocab: int, fn: Callable[[], list[list[int]]]) -> Run:
    """Run ``fn`` (it returns one token list per request) and check every output is exactly
    its requested length of in-vocabulary tokens."""
    cpu, start = time.process_time(), time.perf_counter()
    outputs = fn()
    run = Run(name, wl, time.perf_counter() - start, time.process_time() - cpu, outputs)
    for i, (out, want) in enumerate(zip(outputs, wl.output_lens, strict=True)):
        if len(out) != want or not all(0 <= t < vocab for t in out):
            raise RuntimeError(f"{name}: request {i} produced {len(out)} tokens, wanted {want}")
    return run


# ---- what every section carries (the section writer is elasticserve.docs_section) ------------
def machine_line(threads: int) -> str:
    """One line describing the machine and the torch settings a run used."""
    import torch

    policy = os.environ.get("OMP_WAIT_POLICY", "unset")
    return (f"{os.cpu_count()} cores ({cpu_model()}), torch {torch.__version__} with "
            f"{threads} threads (OMP_WAIT_POLICY={policy}), Python {platform.python_version()}")


def read_bandwidth(mib: int = 256) -> float:
    """GB/s of one pass summing a tensor larger than the caches (median of 5): the memory
    bandwidth a single streaming read gets here, for comparison with achieved bandwidths."""
    import torch

    data = torch.ones(mib << 18)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        data.sum()
        times.append(time.perf_counter() - start)
    return data.numel() * 4 / statistics.median(times) / 1e9


def gemm_gflops(rows: int = 2048, inner: int = 512, cols: int = 2816) -> float:
    """GFLOP/s of an fp32 matmul the size of a prefill chunk's MLP (median of 5): the compute
    rate the current torch threads get here, for comparison with achieved rates."""
    import torch

    a, b = torch.randn(rows, inner), torch.randn(inner, cols)
    times = []
    for _ in range(6):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * rows * inner * cols / statistics.median(times[1:]) / 1e9


def table(headers: list[str], rows: list[list[str]], align: str = "") -> list[str]:
    """Markdown table lines; ``align`` has one of l/r per column (default: first l, rest r)."""
    align = align or "l" + "r" * (len(headers) - 1)
    rule = "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"
    return ["| " + " | ".join(headers) + " |", rule, *("| " + " | ".join(r) + " |" for r in rows)]


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> str:
    """How many of two systems' outputs (greedy, same requests) match exactly, and how far
    they agree on average (the common prefix)."""
    same = sum(a == b for a, b in zip(ours, theirs, strict=True))
    prefix = [next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
              / len(a) for a, b in zip(ours, theirs, strict=True)]
    return (f"{same}/{len(ours)} outputs identical (mean common prefix "
            f"{100 * statistics.mean(prefix):.0f}%)")


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch threads, restoring the previous count after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
