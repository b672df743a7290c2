"""Benchmark results in docs/BENCHMARKS.md: one named, replaceable section per benchmark.

A section is delimited by HTML comments, ``<!-- bench:NAME -->`` ... ``<!-- /bench:NAME -->``,
so a rerun with ``--write-docs`` replaces its own section and leaves every other one alone.
Also the machine description every section carries (cores, CPU, torch threads, load).
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
import sys
from pathlib import Path

DOCS_PATH = Path(__file__).resolve().parents[2] / "docs" / "BENCHMARKS.md"
HEADER = """# Benchmarks

Measured results, written by the benchmark scripts (`--write-docs`); each section says how it
was produced: the exact command, the date, the machine and its load. The machine is shared, so
every comparison runs both sides in one process, interleaved, and reports medians and ratios.
"""
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")


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
