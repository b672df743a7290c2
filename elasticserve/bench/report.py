"""Benchmark results in docs/BENCHMARKS.md: one named, replaceable section per benchmark.

A section is delimited by HTML comments, ``<!-- bench:NAME -->`` ... ``<!-- /bench:NAME -->``,
so a rerun with ``--write-docs`` replaces its own section and leaves every other one alone.
Also what the benchmarks share: seeded workloads and timed, checked runs; what every section
carries (machine, load, command, date); probes of the machine's read bandwidth and matmul rate.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import random
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DOCS_PATH = Path(__file__).resolve().parents[2] / "docs" / "BENCHMARKS.md"
HEADER = """# Benchmarks

Measured results, written by the benchmark scripts (`--write-docs`); each section says how it
was produced: the exact command, the date, the machine and its load. The machine is shared, so
every comparison runs both sides in one process, interleaved, and reports medians and ratios.
"""
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")


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



# ---- docs/BENCHMARKS.md ----------------------------------------------------------------------
def markers(name: str) -> tuple[str, str]:
    """The opening and closing comment of section ``name``."""
    if not _NAME.match(name):
        raise ValueError(f"section name must match {_NAME.pattern}, got {name!r}")
    return f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"


def replace_section(text: str, name: str, body: str) -> str:
    """``text`` with section ``name`` set to ``body`` (appended when it is not there yet)."""
    start, end = markers(name)
    block = f"{start}\n{body.strip()}\n{end}"
    i, j = text.find(start), text.find(end)
    if i < 0 and j < 0:
        return text.rstrip("\n") + "\n\n" + block + "\n"
    if i < 0 or j < i:
        raise ValueError(f"section {name!r} is malformed: unmatched or misordered markers")
    if text.find(start, i + 1) >= 0:
        raise ValueError(f"section {name!r} appears more than once")
    return text[:i] + block + text[j + len(end):]


def update_section(name: str, body: str, path: Path | str | None = None) -> Path:
    """Write ``body`` into section ``name`` of ``path`` (created with a header if missing)."""
    target = Path(path) if path is not None else DOCS_PATH
    text = target.read_text(encoding="utf-8") if target.exists() else HEADER
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(replace_section(text, name, body), encoding="utf-8")
    return target


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, e.g. ``2.10/1.95/1.80``."""
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def machine_line(threads: int) -> str:
    """One line describing the machine and the torch settings a run used."""
    import torch

    policy = os.environ.get("OMP_WAIT_POLICY", "unset")
    return (f"{os.cpu_count()} cores ({cpu_model()}), torch {torch.__version__} with "
            f"{threads} threads (OMP_WAIT_POLICY={policy}), Python {platform.python_version()}")


def command_line(module: str, argv: list[str] | None) -> str:
    """The command that reproduces this run."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join([".venv/bin/python", "-m", module, *map(shlex.quote, args)])


def today() -> str:
    return datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


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
