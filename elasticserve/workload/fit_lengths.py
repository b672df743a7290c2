"""``elasticserve simulate fit-lengths TRACE``: log-normal prompt and output lengths of a trace.

Fits each column by maximum likelihood (``fit_lognormal``) and prints the fit beside the
trace's own quantiles, so a reader can judge it: real chat traces are often multi-modal, and
a log-normal keeps only their centre and spread. The last lines are the Python constructors
to paste into a workload. This is how ``workload.CHAT_INPUT`` and ``CHAT_OUTPUT`` were made.
``--write-docs`` writes the table into section ``fit-lengths-<file stem>`` of docs/BENCHMARKS.md
with the command that made it.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import elasticserve.docs_section as docs_section
from elasticserve.workload.generators import LogNormal, fit_lognormal
from elasticserve.workload.trace import load_trace

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)


@dataclass(frozen=True, slots=True)
class ColumnFit:
    """One column's log-normal fit and the quantiles to judge it by."""

    name: str
    fit: LogNormal
    count: int
    mean: float
    data_quantiles: tuple[float, ...]
    fit_quantiles: tuple[float, ...]


def empirical_quantile(sorted_values: Sequence[int], q: float) -> float:
    """Linear-interpolated quantile of an ascending sequence."""
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def lognormal_quantile(d: LogNormal, q: float) -> float:
    """Quantile of the fitted distribution, clipped to its ``[lo, hi]`` like its samples."""
    x = d.median * math.exp(d.sigma * statistics.NormalDist().inv_cdf(q))
    return min(max(x, d.lo), d.hi)


def fit_column(name: str, lengths: Sequence[int]) -> ColumnFit:
    """Fit one column; the fit is clipped to the column's observed range (at least 1)."""
    values = sorted(lengths)
    fit = fit_lognormal(values, lo=max(values[0], 1), hi=max(values[-1], 1))
    return ColumnFit(name, fit, len(values), statistics.fmean(values),
                     tuple(empirical_quantile(values, q) for q in QUANTILES),
                     tuple(lognormal_quantile(fit, q) for q in QUANTILES))


def fit_trace(path: str) -> tuple[ColumnFit, ColumnFit]:
    """Prompt and output length fits of a JSONL or Azure CSV trace (all models together)."""
    requests = load_trace(path)
    if len(requests) < 2:
        raise ValueError(f"{path}: need at least two requests to fit, got {len(requests)}")
    return (fit_column("input", [r.input_len for r in requests]),
            fit_column("output", [r.output_len for r in requests]))


def markdown(path: str, fits: Sequence[ColumnFit]) -> str:
    """The fits as a Markdown table plus the constructors to paste."""
    head = " | ".join(f"P{round(q * 100)}" for q in QUANTILES)
    lines = [f"log-normal fit of `{path}` ({fits[0].count} requests); quantiles: trace / fit", "",
             f"| column | median | sigma | mean | {head} |",
             "|---|---|---|---|" + "---|" * len(QUANTILES)]
    for c in fits:
        cells = " | ".join(f"{d:.0f} / {f:.0f}"
                           for d, f in zip(c.data_quantiles, c.fit_quantiles, strict=True))
        lines.append(f"| {c.name} | {c.fit.median:.1f} | {c.fit.sigma:.3f} | {c.mean:.1f} "
                     f"| {cells} |")
    lines.append("")
    for c in fits:
        f = c.fit
        lines.append(f"{c.name}: LogNormal(median={f.median:.1f}, sigma={f.sigma:.3f}, "
                     f"lo={f.lo}, hi={f.hi})")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="elasticserve simulate fit-lengths",
                                description="Fit log-normal prompt/output lengths to a trace.")
    p.add_argument("trace", help="JSONL (timestamp, model, input_len, output_len) or Azure "
                                 "LLM inference CSV (TIMESTAMP, ContextTokens, GeneratedTokens)")
    p.add_argument("--write-docs", action="store_true",
                   help="write section fit-lengths-<file stem> of docs/BENCHMARKS.md")
    p.add_argument("--docs-path", help="the file --write-docs updates")
    args = p.parse_args(argv)
    try:
        fits = fit_trace(args.trace)
    except (OSError, ValueError) as e:
        p.error(str(e))
    text = markdown(args.trace, fits)
    sys.stdout.write(text)
    if args.write_docs:
        command = docs_section.command_line("elasticserve.workload.fit_lengths",
                                            None if argv is None else list(argv))
        body = f"Command: `{command}`; run {docs_section.today()}.\n\n{text}"
        path = docs_section.update_section(section_name(args.trace), body, args.docs_path)
        print(f"wrote {path}", file=sys.stderr)
    return 0


def section_name(trace: str) -> str:
    """``fit-lengths-`` and the file's stem, lower case, reduced to a section name's letters."""
    stem = re.sub(r"[^a-z0-9_.-]+", "-", Path(trace).stem.lower()).strip("-.") or "trace"
    return f"fit-lengths-{stem}"


if __name__ == "__main__":
    sys.exit(main())
