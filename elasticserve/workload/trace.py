"""Trace replay: JSONL request logs and the Azure LLM inference trace CSV.

JSONL: one object per line, ``{"timestamp": s, "model": str, "input_len": int,
"output_len": int}``; blank lines are skipped. CSV: the Azure LLM inference trace columns
``TIMESTAMP, ContextTokens, GeneratedTokens`` (TIMESTAMP is a date-time such as
``2023-11-16 18:15:46.6805900`` or plain seconds); the trace has no model column, so every row
goes to ``model``. Replayed arrivals are relative to the first row.

A bad row raises ValueError naming the file, the line number and the problem. Timestamps must
not decrease: a shuffled trace is more likely a broken export than a workload. Lengths must be
>= 0 (the simulator runs a 0-length prompt or output as 1 token).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from elasticserve.workload.generators import RequestSpec

AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


def _fail(path: str | Path, line: int, problem: str) -> ValueError:
    return ValueError(f"{path}: line {line}: {problem}")


def _length(value: Any, key: str, path: str | Path, line: int, minimum: int) -> int:
    if isinstance(value, bool) or value is None:
        raise _fail(path, line, f"{key} must be an integer, got {value!r}")
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise _fail(path, line, f"{key} must be an integer, got {value!r}") from None
    if n != value and not (isinstance(value, str) and value.strip().lstrip("-").isdigit()):
        raise _fail(path, line, f"{key} must be an integer, got {value!r}")
    if n < minimum:
        raise _fail(path, line, f"{key} must be >= {minimum}, got {n}")
    return n


def _seconds(value: Any, path: str | Path, line: int) -> float:
    if isinstance(value, bool):
        raise _fail(path, line, f"timestamp must be a number, got {value!r}")
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise _fail(path, line, f"timestamp must be a number, got {value!r}") from None
    if not math.isfinite(t) or t < 0:
        raise _fail(path, line, f"timestamp must be finite and >= 0, got {value!r}")
    return t


def _check_order(t: float, prev: float | None, path: str | Path, line: int) -> None:
    if prev is not None and t < prev:
        raise _fail(path, line, f"timestamp {t} is before the previous row's {prev} "
                                "(timestamps out of order)")


def parse_jsonl(lines: Iterable[str], path: str | Path = "<jsonl>") -> list[RequestSpec]:
    """Requests from JSONL lines (see the module docstring for the schema)."""
    out: list[RequestSpec] = []
    prev: float | None = None
    for no, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as e:
            raise _fail(path, no, f"bad JSON: {e.msg}") from None
        if not isinstance(row, dict):
            raise _fail(path, no, f"expected a JSON object, got {type(row).__name__}")
        missing = [k for k in ("timestamp", "model", "input_len", "output_len") if k not in row]
        if missing:
            raise _fail(path, no, f"missing field(s): {', '.join(missing)}")
        if not isinstance(row["model"], str) or not row["model"]:
            raise _fail(path, no, f"model must be a non-empty string, got {row['model']!r}")
        t = _seconds(row["timestamp"], path, no)
        _check_order(t, prev, path, no)
        prev = t
        out.append(RequestSpec(t, row["model"], _length(row["input_len"], "input_len", path, no, 0),
                               _length(row["output_len"], "output_len", path, no, 0)))
    return _rebase(out)


def load_jsonl(path: str | Path) -> list[RequestSpec]:
    with open(path, encoding="utf-8") as f:
        return parse_jsonl(f, path)


def write_jsonl(requests: Iterable[RequestSpec], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in requests:
            f.write(json.dumps({"timestamp": r.arrival, "model": r.model,
                                "input_len": r.input_len, "output_len": r.output_len}) + "\n")


def _azure_time(value: str, path: str | Path, line: int) -> float:
    text = (value or "").strip()
    if not text:
        raise _fail(path, line, "TIMESTAMP is empty")
    try:
        return _seconds(float(text), path, line)
    except ValueError:
        pass
    # the trace writes 7 fractional digits; datetime takes at most 6
    head, dot, frac = text.partition(".")
    try:
        stamp = datetime.fromisoformat(head + (dot + frac[:6] if dot else ""))
    except ValueError:
        raise _fail(path, line, f"TIMESTAMP {text!r} is neither seconds nor a date-time") from None
    if stamp.tzinfo is None:  # naive: read as UTC so a local DST change cannot shift gaps
        stamp = stamp.replace(tzinfo=UTC)
    return stamp.timestamp()


def parse_azure_csv(lines: Iterable[str], model: str = "model0",
                    path: str | Path = "<csv>") -> list[RequestSpec]:
    """Requests from Azure LLM inference trace CSV lines (header row required)."""
    reader = csv.reader(lines)
    header = next(reader, None)
    if header is None:
        raise _fail(path, 1, "empty file: expected a header with " + ", ".join(AZURE_COLUMNS))
    names = [h.strip() for h in header]
    missing = [c for c in AZURE_COLUMNS if c not in names]
    if missing:
        raise _fail(path, 1, f"header lacks column(s): {', '.join(missing)}")
    idx = [names.index(c) for c in AZURE_COLUMNS]
    out: list[RequestSpec] = []
    prev: float | None = None
    for row in reader:
        no = reader.line_num
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) < len(names):
            raise _fail(path, no, f"expected {len(names)} fields, got {len(row)}")
        t = _azure_time(row[idx[0]], path, no)
        _check_order(t, prev, path, no)
        prev = t
        out.append(RequestSpec(t, model, _length(row[idx[1]].strip(), "ContextTokens", path, no, 0),
                               _length(row[idx[2]].strip(), "GeneratedTokens", path, no, 0)))
    return _rebase(out)


def load_azure_csv(path: str | Path, model: str = "model0") -> list[RequestSpec]:
    with open(path, encoding="utf-8", newline="") as f:
        return parse_azure_csv(f, model, path)


def load_trace(path: str | Path, model: str = "model0") -> list[RequestSpec]:
    """By extension: ``.jsonl`` or ``.csv``."""
    suffix = Path(path).suffix.lower()
    if suffix == ".jsonl":
        return load_jsonl(path)
    if suffix == ".csv":
        return load_azure_csv(path, model)
    raise ValueError(f"{path}: unknown trace format {suffix!r} (want .jsonl or .csv)")


TraceSource = tuple[str | None, "str | Path"]  # (model name for CSV rows or None, file)


def load_traces(sources: Sequence[TraceSource]) -> list[RequestSpec]:
    """Several traces merged into one replay, each starting at time 0.

    A CSV trace has no model column: its rows go to the given name, else ``model{i}`` for the
    i-th trace. A JSONL trace names its models itself, so it takes no name.
    """
    merged: list[RequestSpec] = []
    for i, (name, path) in enumerate(sources):
        if Path(path).suffix.lower() == ".jsonl" and name is not None:
            raise ValueError(f"{path}: a JSONL trace names its models in its rows; "
                             f"drop the {name!r}= prefix")
        merged.extend(load_trace(path, name or f"model{i}"))
    merged.sort(key=lambda r: r.arrival)  # stable: ties keep file order
    return merged


def scale_rate(requests: Sequence[RequestSpec], factor: float) -> list[RequestSpec]:
    """The same requests ``factor`` times faster (arrival times divided by ``factor``)."""
    if factor <= 0:
        raise ValueError(f"factor must be > 0, got {factor}")
    return [RequestSpec(r.arrival / factor, r.model, r.input_len, r.output_len) for r in requests]


@dataclass(frozen=True, slots=True)
class TraceReplay:
    """A loaded trace as a scenario's request source: ``scale`` divides every arrival time."""

    requests: tuple[RequestSpec, ...]

    def generate(self, seed: int, scale: float = 1.0) -> list[RequestSpec]:
        # the seed is ignored: a trace is one recorded sample, replayed as it is
        return scale_rate(self.requests, scale)

    @property
    def models(self) -> list[str]:
        """Distinct model names, in order of first appearance."""
        return list(dict.fromkeys(r.model for r in self.requests))

    @property
    def mean_rate(self) -> float:
        """Arrivals per second between the first and the last row (the request count when
        every row has the same timestamp)."""
        n = len(self.requests)
        span = self.requests[-1].arrival if n else 0.0
        return (n - 1) / span if span > 0 else float(n)


def _rebase(requests: list[RequestSpec]) -> list[RequestSpec]:
    if not requests:
        return requests
    t0 = requests[0].arrival
    return [RequestSpec(r.arrival - t0, r.model, r.input_len, r.output_len) for r in requests]
