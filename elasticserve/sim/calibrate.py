"""Fit a :class:`CpuSpec` to measured engine step times.

Model: ``seconds = overhead + per_seq * num_seqs + flops / flop_rate + bytes / mem_bw``, with
FLOPs and bytes computed exactly as the cost model does. The four coefficients are fitted by
non-negative least squares on *relative* error, so millisecond decode steps weigh as much as
second-long prefills. Dividing each row by its *measured* time biases the fit low when timings
are noisy (a step slowed down by another process weighs less than one that was lucky), so the
fit is then repeated with each row divided by the previous fit's *predicted* time (iteratively
reweighted least squares with variance proportional to the mean squared): the fitted times are
unbiased for the mean step time, which is what end-to-end latencies add up.

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
import itertools
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


def step_features(sample: StepSample, kv_only: bool = False) -> tuple[float, float, float, float]:
    """(1, sequences, FLOPs, bytes): the regressors of one step; ``kv_only``: bytes of the KV
    cache only, without the weights."""
    work = StepWork.from_chunks(sample.chunks)
    cost = CostModel(CpuSpec(), sample.shape)
    nbytes = cost.bytes_moved(work.kv_tokens_read)
    if kv_only:
        nbytes -= sample.shape.weights_bytes
    return (1.0, float(work.num_seqs), cost.flops(work.tokens, work.attn_pairs), nbytes)


def _nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient >= 0, exactly: the optimum is the unconstrained
    fit on its own support, so fit every support (2^k of them; k is 4) and keep the best one
    whose coefficients are all >= 0. (Dropping every negative coefficient at once and never
    adding one back can miss it: a term that is negative only beside another one is lost.)"""
    k = a.shape[1]
    best, best_res = np.zeros(k), float(b @ b)
    for support in itertools.chain.from_iterable(
            itertools.combinations(range(k), r) for r in range(1, k + 1)):
        cols = list(support)
        sol, *_ = np.linalg.lstsq(a[:, cols], b, rcond=None)
        if (sol < 0).any():
            continue
        res = float(np.sum((a[:, cols] @ sol - b) ** 2))
        if res < best_res:
            best, best_res = np.zeros(k), res
            best[cols] = sol
    return best


def fit_cpu_spec(samples: Sequence[StepSample], base: CpuSpec | None = None,
                 reweight: int = 3, separate_weights: bool = False) -> CpuSpec:
    """Fit overhead, per-sequence cost, FLOP rate and memory bandwidth to ``samples``.

    ``reweight``: refits dividing rows by the predicted instead of the measured time.
    ``separate_weights``: fit the KV cache's bandwidth on its own; streaming the weights (a
    constant per step for one model) then becomes part of the overhead (``weights_bw`` = inf).
    Otherwise weights and KV share ``mem_bw``, which ties the per-step constant to the slope
    in context length. A coefficient fitted to zero becomes an infinite rate (free term).
    """
    if len(samples) < 4:
        raise ValueError(f"need at least 4 step samples to fit 4 coefficients, got {len(samples)}")
    if any(s.seconds <= 0 for s in samples):
        raise ValueError("every sample needs seconds > 0")
    feats = np.array([step_features(s, separate_weights) for s in samples], dtype=float)
    times = np.array([s.seconds for s in samples], dtype=float)
    # scale columns to comparable magnitudes so lstsq is well conditioned
    norms = np.abs(feats).max(axis=0)
    norms[norms == 0] = 1.0
    scale = times
    for _ in range(1 + max(0, reweight)):
        coef = _nnls(feats / norms / scale[:, None], times / scale) / norms
        predicted = feats @ coef
        if not (predicted > 0).all():
            break
        scale = predicted
    overhead, per_seq, s_per_flop, s_per_byte = (float(c) for c in coef)
    return dataclasses.replace(
        base or CpuSpec(), step_overhead_s=overhead, per_seq_s=per_seq,
        flops=1.0 / s_per_flop if s_per_flop > 0 else math.inf,
        mem_bw=1.0 / s_per_byte if s_per_byte > 0 else math.inf,
        weights_bw=math.inf if separate_weights else None)


def fit_error(spec: CpuSpec, samples: Sequence[StepSample]) -> float:
    """Mean absolute relative error of ``spec`` on ``samples``."""
    errs = []
    for s in samples:
        work = StepWork.from_chunks(s.chunks)
        predicted = CostModel(spec, s.shape).work_time(work)
        errs.append(abs(predicted - s.seconds) / s.seconds)
    return sum(errs) / len(errs)
