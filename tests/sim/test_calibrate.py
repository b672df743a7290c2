"""fit_cpu_spec recovers a known CPU spec from synthetic step timings."""

from __future__ import annotations

import math
import random

import pytest

from elasticserve.sim.calibrate import StepSample, fit_cpu_spec, fit_error
from elasticserve.sim.cost_model import CostModel, StepWork
from elasticserve.sim.gpu_specs import CpuSpec
from elasticserve.sim.model_shapes import QWEN3_0_6B


def _samples(truth: CpuSpec, n: int, noise: float, seed: int = 0) -> list[StepSample]:
    rng = random.Random(seed)
    shape = QWEN3_0_6B.with_tp(1)
    out = []
    for _ in range(n):
        if rng.random() < 0.3:  # prefill-heavy step
            chunks = tuple((0, rng.randint(16, 2048)) for _ in range(rng.randint(1, 3)))
        else:  # decode-heavy step with varied contexts
            chunks = tuple((rng.randint(1, 8000), 1) for _ in range(rng.randint(1, 64)))
        t = CostModel(truth, shape).work_time(StepWork.from_chunks(chunks))
        out.append(StepSample(shape, chunks, t * (1 + rng.gauss(0, noise))))
    return out


def test_fit_recovers_the_generating_spec() -> None:
    truth = CpuSpec(flops=8e11, mem_bw=3e10, step_overhead_s=4e-3, per_seq_s=1e-4)
    fit = fit_cpu_spec(_samples(truth, 200, noise=0.0))
    assert fit.flops == pytest.approx(truth.flops, rel=1e-3)
    assert fit.mem_bw == pytest.approx(truth.mem_bw, rel=1e-3)
    assert fit.step_overhead_s == pytest.approx(truth.step_overhead_s, rel=1e-3)
    assert fit.per_seq_s == pytest.approx(truth.per_seq_s, rel=1e-3)


def test_fit_with_noise_predicts_well_and_stays_non_negative() -> None:
    truth = CpuSpec(flops=5e11, mem_bw=2e10, step_overhead_s=0.0, per_seq_s=2e-4)
    samples = _samples(truth, 300, noise=0.05, seed=1)
    fit = fit_cpu_spec(samples)
    assert fit.step_overhead_s >= 0 and fit.per_seq_s >= 0
    assert fit.flops > 0 and fit.mem_bw > 0
    assert fit_error(fit, samples) < 0.06
    held_out = _samples(truth, 100, noise=0.0, seed=2)
    assert fit_error(fit, held_out) < 0.05


def test_fit_drops_terms_that_cost_nothing() -> None:
    truth = CpuSpec(flops=math.inf, mem_bw=2e10, step_overhead_s=1e-3, per_seq_s=0.0)
    fit = fit_cpu_spec(_samples(truth, 100, noise=0.0))
    assert fit.mem_bw == pytest.approx(2e10, rel=1e-3)
    assert fit.flops > 1e15 or math.isinf(fit.flops)


def test_fit_needs_enough_valid_samples() -> None:
    s = _samples(CpuSpec(), 3, 0.0)
    with pytest.raises(ValueError, match="at least 4"):
        fit_cpu_spec(s)
    bad = [StepSample(x.shape, x.chunks, 0.0) for x in _samples(CpuSpec(), 5, 0.0)]
    with pytest.raises(ValueError, match="seconds > 0"):
        fit_cpu_spec(bad)
