"""PNG plots of serving benchmark runs (matplotlib, imported lazily; skipped without it).

- ``memory.png``: KV memory mapped (solid) and used (dashed) per model over time, one panel per
  run, with the budget when the server reports one;
- ``latency_cdf.png``: CDFs of TTFT, TPOT and end-to-end latency per run and model;
- ``attainment.png``: SLO attainment against request rate (sweeps only).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from elasticserve.bench.serve_report import MIB, RunResult


def _pyplot() -> Any | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
        return None
    return plt


def _field(fields: dict[str, float], word: str) -> str | None:
    """The first field name with ``word`` in it that is a byte count (kv_mapped_bytes, ...)."""
    return next((k for k in sorted(fields) if word in k and k.endswith("bytes")), None)


def plot_memory(plt: Any, runs: Sequence[RunResult], path: str) -> bool:
    """KV mapped/used per model over time; False when no run has samples."""
    runs = [r for r in runs if r.memory]
    if not runs:
        return False
    fig, axes = plt.subplots(len(runs), 1, figsize=(9, 3.2 * len(runs)), squeeze=False,
                             sharex=True)
    for ax, run in zip(axes[:, 0], runs, strict=True):
        models = sorted({m for s in run.memory for m in s.models})
        for k, model in enumerate(models):
            color = f"C{k}"
            for word, style in (("mapped", "-"), ("used", "--")):
                pts = [(s.t_s, s.models[model][key]) for s in run.memory if model in s.models
                       and (key := _field(s.models[model], word)) is not None]
                if pts:
                    ax.plot([t for t, _ in pts], [v / MIB for _, v in pts], style, color=color,
                            label=f"{model} {word}")
        budget = next((s.budget_bytes for s in reversed(run.memory) if s.budget_bytes), None)
        title = run.label + (f" @ {run.rate:g} req/s" if run.rate else "")
        top = max((v for s in run.memory for f in s.models.values() for k, v in f.items()
                   if "mapped" in k and k.endswith("bytes")), default=0.0)
        if budget and budget <= 3 * top:  # a far-away budget line would flatten the curves
            ax.axhline(budget / MIB, color="gray", linestyle=":", label="budget")
        elif budget:
            title += f" (budget {budget / MIB:.0f} MiB)"
        ax.set_title(title)
        ax.set_ylabel("MiB")
        ax.legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("time since start (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _cdf(ax: Any, values: list[float], label: str) -> None:
    if values:
        xs = sorted(values)
        ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], drawstyle="steps-post",
                label=label)


def plot_latency_cdfs(plt: Any, runs: Sequence[RunResult], path: str) -> bool:
    """CDFs of TTFT, TPOT, E2E; one line per (run, model), or per run beyond two runs."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for run in runs:
        groups = [None] if len(runs) > 2 else sorted({r.model for r in run.records})
        for model in groups:
            ok = [r for r in run.records if model in (None, r.model) and r.ok]
            label = (f"{run.label}{f' @ {run.rate:g} req/s' if run.rate else ''}"
                     + (f": {model}" if model else ""))
            _cdf(axes[0], [r.ttft_s for r in ok if r.ttft_s is not None], label)
            _cdf(axes[1], [t * 1e3 for r in ok if (t := r.tpot_s) is not None], label)
            _cdf(axes[2], [r.e2e_s for r in ok if r.e2e_s is not None], label)
    for ax, name in zip(axes, ("TTFT (s)", "TPOT (ms)", "E2E latency (s)"), strict=True):
        ax.set_xlabel(name)
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_attainment(plt: Any, summaries: Sequence[dict[str, Any]], path: str) -> bool:
    """SLO attainment (all models and each model) against the request rate."""
    rated = [s for s in summaries if s["rate"] is not None]
    if len(rated) < 2:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4))
    rates = [s["rate"] for s in rated]
    ax.plot(rates, [100 * (s["overall"]["slo_attainment"] or 0) for s in rated], "o-", label="all")
    for model in sorted({m for s in rated for m in s["models"]}):
        ax.plot(rates, [100 * (s["models"].get(model, {}).get("slo_attainment") or 0)
                        for s in rated], ".--", label=model)
    for target in (90, 99):
        ax.axhline(target, color="gray", linestyle=":", linewidth=0.8)
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(0, 102)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_plots(out_dir: str, runs: Sequence[RunResult],
                summaries: Sequence[dict[str, Any]]) -> list[str]:
    """Write every plot that applies into ``out_dir``; the paths written."""
    plt = _pyplot()
    if plt is None:
        return []
    os.makedirs(out_dir, exist_ok=True)
    jobs: list[tuple[str, Callable[[str], bool]]] = [
        ("memory.png", lambda p: plot_memory(plt, runs, p)),
        ("latency_cdf.png", lambda p: plot_latency_cdfs(plt, runs, p)),
        ("attainment.png", lambda p: plot_attainment(plt, summaries, p)),
    ]
    written = []
    for name, job in jobs:
        path = os.path.join(out_dir, name)
        if job(path):
            written.append(path)
    return written
