"""Fit a :class:`CpuSpec` to measured engine step times.

Model: ``seconds = overhead + per_seq * num_seqs + flops / flop_rate + bytes / mem_bw``, with
FLOPs and bytes computed exactly as the cost model does. The four coefficients are fitted by
non-negative least squares on *relative* error (each row divided by its measured time), so
millisecond decode steps weigh as much as second-long prefills.

Feeding real timings: wrap ``LLMEngine.step`` (or the model runner) with ``time.perf_counter``
and, for every step, log ``(start_pos, len(token_ids))`` of each ``ScheduledSeq`` in the
``SchedulerOutput`` plus the elapsed seconds; build the shape with
``shape_from_hf_config(json.load(open(model_dir + "/config.json")), dtype_bytes=4)`` (4 for the
engine's float32 default) and call
``fit_cpu_spec([StepSample(shape, chunks, seconds), ...])``. Mix prefill-heavy and decode-heavy
steps and several batch sizes, or the FLOP and byte terms cannot be told apart.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from elasticserve.sim.cost_model import CostModel, StepWork
from elasticserve.sim.gpu_specs import CpuSpec
from elasticserve.sim.model_shapes import ModelShape


@dataclass(frozen=True, slots=True)
class StepSample:
    """One measured step: the model, ``(start_pos, num_new)`` per scheduled sequence, time."""

    shape: ModelShape
    chunks: tuple[tuple[int, int], ...]
    seconds: float


def step_features(sample: StepSample) -> tuple[float, float, float, float]:
    """(1, sequences, FLOPs, bytes): the regressors of one step."""
    work = StepWork.from_chunks(sample.chunks)
    cost = CostModel(CpuSpec(), sample.shape)
    return (1.0, float(work.num_seqs), cost.flops(work.tokens, work.attn_pairs),
            cost.bytes_moved(work.kv_tokens_read))


def _nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient >= 0: refit without the negative ones."""
    active = list(range(a.shape[1]))
    coef = np.zeros(a.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(a[:, active], b, rcond=None)
        if (sol >= 0).all():
            coef[active] = sol
            return coef
        active = [j for j, c in zip(active, sol, strict=True) if c > 0]
    return coef


def fit_cpu_spec(samples: Sequence[StepSample], base: CpuSpec | None = None) -> CpuSpec:
    """Fit overhead, per-sequence cost, FLOP rate and memory bandwidth to ``samples``.

    A coefficient fitted to zero becomes an infinite rate (that term costs nothing).
    """
    if len(samples) < 4:
        raise ValueError(f"need at least 4 step samples to fit 4 coefficients, got {len(samples)}")
    if any(s.seconds <= 0 for s in samples):
        raise ValueError("every sample needs seconds > 0")
    feats = np.array([step_features(s) for s in samples], dtype=float)
    times = np.array([s.seconds for s in samples], dtype=float)
    # scale columns to comparable magnitudes so lstsq is well conditioned
    norms = np.abs(feats).max(axis=0)
    norms[norms == 0] = 1.0
    rows = feats / norms / times[:, None]
    coef = _nnls(rows, np.ones(len(samples))) / norms
    overhead, per_seq, s_per_flop, s_per_byte = (float(c) for c in coef)
    return dataclasses.replace(
        base or CpuSpec(), step_overhead_s=overhead, per_seq_s=per_seq,
        flops=1.0 / s_per_flop if s_per_flop > 0 else math.inf,
        mem_bw=1.0 / s_per_byte if s_per_byte > 0 else math.inf)


def fit_error(spec: CpuSpec, samples: Sequence[StepSample]) -> float:
    """Mean absolute relative error of ``spec`` on ``samples``."""
    errs = []
    for s in samples:
        work = StepWork.from_chunks(s.chunks)
        predicted = CostModel(spec, s.shape).work_time(work)
        errs.append(abs(predicted - s.seconds) / s.seconds)
    return sum(errs) / len(errs)
