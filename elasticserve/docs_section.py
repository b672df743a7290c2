"""Named, replaceable sections of docs/BENCHMARKS.md, shared by the benchmarks and the simulator.

A section is delimited by HTML comments, ``<!-- bench:NAME -->`` ... ``<!-- /bench:NAME -->``,
so a rerun with ``--write-docs`` replaces its own section and leaves every other one alone.
Torch-free and engine-free on purpose: ``elasticserve.sim`` writes its sections through this
module and must not import ``elasticserve.bench``.

Everything inside a section is written by the command printed in it, from what that command
measured. Text a person wrote (an interpretation, an explanation) goes outside the markers,
under a line starting with :data:`COMMENTARY`, so a reader can tell the two apart and a rerun
never silently keeps stale prose inside a measured section.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path

DOCS_PATH = Path(__file__).resolve().parents[1] / "docs" / "BENCHMARKS.md"
COMMENTARY = "*Reading (author's commentary, not measured by the command):*"
HEADER = f"""# Benchmarks

Every `<!-- bench:NAME -->` section is written by the command printed in it (`--write-docs`),
from what that run measured: the command, the date, the machine and its load. Text outside
the sections is either commentary, marked {COMMENTARY}, or a *Provenance note* on how a
section was made.
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


def today() -> str:
    return datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


def command_line(module: str, argv: list[str] | None) -> str:
    """The command that reproduces this run (``sys.argv`` when ``argv`` is None)."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join([".venv/bin/python", "-m", module, *map(shlex.quote, args)])


def git_commit() -> str:
    """The short commit of the checkout (``+dirty`` when the package's code has uncommitted
    changes), or ``unknown`` outside a git checkout: the simulator's results depend on the
    code only, so a docs file another section just rewrote does not make it dirty."""
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                             capture_output=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "elasticserve"],
                               cwd=root, text=True, capture_output=True, check=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")
