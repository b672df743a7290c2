"""Host memory backend latency next to the raw system calls it is built from.

Run: ``.venv/bin/python -m elasticserve.bench.memory_pages [--pages 500] [--rounds 2]``
Prints Markdown tables.

Raw and backend measurements take turns over the same kind of work (2 MiB memfd pages
mapped over a read-only reservation, touched before release), and which goes first
alternates from round to round (``fairness.abba``), so drift on a shared machine hits both
sides alike.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch

from elasticserve.bench import report
from elasticserve.bench.fairness import abba
from elasticserve.memory import HostBackend, PagePlacement, VirtualTensor
from elasticserve.memory.linux import (
    MAP_FIXED,
    MAP_SHARED,
    PROT_READ,
    PROT_WRITE,
    map_zero,
    punch_hole,
    sys_mmap,
    sys_munmap,
)

MIB = 1 << 20
PAGE = 2 * MIB
Samples = dict[str, list[float]]


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter_ns()
    fn()
    return (time.perf_counter_ns() - t0) / 1e3  # microseconds


def touch(addr: int, n: int) -> None:
    ctypes.memset(addr, 1, n)  # first touch allocates the shmem pages


def raw_round(pages: int, out: Samples) -> None:
    """The bare calls: mmap a memfd slot MAP_FIXED, mmap zero back, punch the hole."""
    fd = os.memfd_create("bench-raw", os.MFD_CLOEXEC)
    os.ftruncate(fd, pages * PAGE)
    base = sys_mmap(None, pages * PAGE, PROT_READ, 0x2 | 0x20 | 0x4000, -1, 0)
    rw, shared = PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED
    for i in range(pages):
        addr = base + i * PAGE
        out["map"].append(timed(partial(sys_mmap, addr, PAGE, rw, shared, fd, i * PAGE)))
    touch(base, pages * PAGE)
    for i in reversed(range(pages)):
        addr = base + i * PAGE
        u = timed(partial(map_zero, addr, PAGE))
        r = timed(partial(punch_hole, fd, i * PAGE, PAGE))
        out["unmap"].append(u)
        out["release"].append(r)
        out["unmap+release"].append(u + r)
    sys_munmap(base, pages * PAGE)
    os.close(fd)


def backend_round(pages: int, out: Samples) -> None:
    """The same work through HostBackend (bookkeeping, map-count model, locking)."""
    with HostBackend(PAGE) as b:
        vr = b.reserve(pages * PAGE)
        made = [b.create_page(PagePlacement(vr, i * PAGE)) for i in range(pages)]
        for i, page in enumerate(made):
            out["map"].append(timed(partial(b.map, vr, i * PAGE, page)))
        touch(vr.base, pages * PAGE)
        for i in reversed(range(pages)):
            t0 = time.perf_counter_ns()
            page = b.unmap(vr, i * PAGE)
            t1 = time.perf_counter_ns()
            b.release_page(page)
            t2 = time.perf_counter_ns()
            out["unmap"].append((t1 - t0) / 1e3)
            out["release"].append((t2 - t1) / 1e3)
            out["unmap+release"].append((t2 - t0) / 1e3)


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def latency_table(raw: Samples, ours: Samples, pages: int, rounds: int) -> str:
    lines = [
        f"Per-page latency, 2 MiB pages, {pages} pages x {rounds} rounds (microseconds)",
        "",
        "| operation | elasticserve median | elasticserve p99 | raw syscall median "
        "| raw syscall p99 | ratio (median) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    raw_names = {"map": "mmap MAP_SHARED\\|MAP_FIXED", "unmap": "mmap zero MAP_FIXED",
                 "release": "fallocate PUNCH_HOLE", "unmap+release": "both"}
    for op in ("map", "unmap", "release", "unmap+release"):
        m, r = statistics.median(ours[op]), statistics.median(raw[op])
        lines.append(f"| {op} (raw: {raw_names[op]}) | {m:.1f} | {pct(ours[op], .99):.1f} "
                     f"| {r:.1f} | {pct(raw[op], .99):.1f} | {m / r:.2f}x |")
    return "\n".join(lines)


def grow_shrink(gib: int = 1) -> str:
    """Grow a VirtualTensor by ``gib`` GiB (map, then first touch) and shrink it back."""
    nbytes = gib << 30
    with HostBackend(PAGE) as b:
        vt = VirtualTensor(b, nbytes, torch.bfloat16, (8, 128))
        t_map = timed(lambda: vt.map_pages(vt.max_pages)) / 1e3
        t_touch = timed(lambda: vt.tensor.fill_(1.0)) / 1e3
        t_shrink = timed(lambda: vt.unmap_pages(vt.mapped_pages)) / 1e3
        vt.close()
    total = t_map + t_touch
    return "\n".join([
        f"VirtualTensor grow/shrink by {gib} GiB (2 MiB pages, "
        f"torch threads = {torch.get_num_threads()}), milliseconds",
        "",
        "| step | ms | GiB/s |",
        "|---|---:|---:|",
        f"| grow: map_pages ({nbytes // PAGE} pages) | {t_map:.1f} | {gib / t_map * 1e3:.1f} |",
        f"| grow: first touch (fill_) | {t_touch:.1f} | {gib / t_touch * 1e3:.1f} |",
        f"| grow: total | {total:.1f} | {gib / total * 1e3:.1f} |",
        f"| shrink: unmap_pages + release | {t_shrink:.1f} | {gib / t_shrink * 1e3:.1f} |",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="elasticserve bench memory",
                                     description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--pages", type=int, default=500, help="2 MiB pages per round")
    parser.add_argument("--rounds", type=int, default=2,
                        help="alternating raw/backend rounds")
    parser.add_argument("--grow-gib", type=int, default=1,
                        help="GiB a virtual tensor grows by in the growth test")
    parser.add_argument("--write-docs", action="store_true",
                        help="write the tables into docs/BENCHMARKS.md")
    args = parser.parse_args(argv)
    load_before = report.load_average()
    keys = ("map", "unmap", "release", "unmap+release")
    raw: Samples = {k: [] for k in keys}
    ours: Samples = {k: [] for k in keys}
    sides = {"raw": (raw_round, raw), "ours": (backend_round, ours)}
    for pair in abba("raw", "ours", args.rounds):
        for side in pair:
            run_round, samples = sides[side]
            run_round(args.pages, samples)
    body = "\n\n".join([latency_table(raw, ours, args.pages, args.rounds),
                          grow_shrink(args.grow_gib)])
    print(body)
    if args.write_docs:
        report.update_section("memory-pages", "\n\n".join([
            "Host backend: per-page latency next to the raw system calls it is built from "
            "(measured in turns in one process, which goes first alternating from round to "
            "round), and growing / shrinking a VirtualTensor "
            "by whole GiB.", body,
            f"Run {report.today()} on {report.machine_line(torch.get_num_threads())}; load "
            f"average {load_before} before, {report.load_average()} after. The CUDA backend "
            "is not measured by this command (host backend only).",
            f"Command: `{report.command_line('elasticserve.bench.memory_pages', argv)}`"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
