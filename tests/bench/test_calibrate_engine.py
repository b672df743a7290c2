"""The engine calibration pipeline runs end to end on the tiny model. No accuracy assertions:
step timings on a shared machine are too noisy for that; the verdict and the exit code are
tested on calibrations built to pass and to fail."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from elasticserve.bench import calibrate_engine as ce
from elasticserve.config import MiB
from elasticserve.models.make_model import make_model

BATCHES = (ce.Batch(1, (8, 40), (2, 6)), ce.Batch(3, (8, 40), (2, 6)),
           ce.Batch(3, (8, 40), (2, 6), every=1))
HELD = ce.HeldOut(n=4, prompt=(8, 40), output=(2, 8), utilization=0.5)
SETTINGS = ce.EngineSettings(max_num_seqs=8, max_num_batched_tokens=64, kv_cache_bytes=4 * MiB,
                             swap_space=4 * MiB, max_model_len=256)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    torch.set_num_threads(1)
    return make_model("llama", "tiny", str(tmp_path_factory.mktemp("tiny")), seed=0)


def test_pipeline_returns_finite_comparison_and_positive_rates(tiny_dir: str) -> None:
    lines: list[str] = []
    cal = ce.calibrate(tiny_dir, seed=3, batches=BATCHES, held=HELD, settings=SETTINGS,
                       log=lines.append)
    spec = cal.spec
    assert spec.flops > 0 and spec.mem_bw > 0 and spec.weights_bw == math.inf
    assert spec.step_overhead_s >= 0 and spec.per_seq_s >= 0
    assert cal.train_steps >= 4 and cal.slowdown > 0 and cal.rate > 0
    assert {r.metric for r in cal.rows} >= {"e2e latency mean (s)", "TTFT mean (s)"}
    for r in cal.rows:
        assert math.isfinite(r.real) and math.isfinite(r.predicted) and math.isfinite(r.error)
    assert any(r.gated for r in cal.rows) and any(not r.gated for r in cal.rows)
    table = ce.markdown(cal)
    assert "| metric | real | predicted | error |" in table
    assert f"**{'PASS' if cal.passed else 'FAIL'}**" in table
    assert lines and lines[0].startswith("fit")


def test_held_out_requests_are_seeded_poisson_at_the_rate() -> None:
    held = ce.HeldOut(n=50)
    a, b = ce.heldout_requests(7, held, 2.0), ce.heldout_requests(7, held, 2.0)
    assert a == b and len(a) == 50
    assert all(32 <= r.input_len <= 384 and 16 <= r.output_len <= 160 for r in a)
    slower = ce.heldout_requests(7, held, 1.0)
    assert [r.arrival for r in slower] == pytest.approx([2 * r.arrival for r in a])


def test_slowed_spec_scales_every_step_time() -> None:
    spec = ce.CpuSpec(flops=1e11, mem_bw=1e10, step_overhead_s=1e-3, per_seq_s=1e-4)
    for s in (spec, ce.replace(spec, weights_bw=3e10)):
        args = (1e9, 1e8, 4, 1, 6e7)
        assert ce.slowed(s, 1.5).step_seconds(*args) == pytest.approx(1.5 * s.step_seconds(*args))


def test_main_writes_the_docs_section(tiny_dir: str, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(ce, "TRAIN_BATCHES", BATCHES)
    monkeypatch.setattr(ce, "EngineSettings", lambda: SETTINGS)
    seen: list[ce.Calibration] = []
    real_calibrate = ce.calibrate
    monkeypatch.setattr(ce, "calibrate", lambda *a, **k: seen.append(real_calibrate(*a, **k))
                        or seen[-1])
    docs = tmp_path / "BENCHMARKS.md"
    code = ce.main(["--model-dir", tiny_dir, "--requests", "4", "--write-docs",
                    "--docs-path", str(docs)])
    assert code == (0 if seen[0].passed else 1)
    text = docs.read_text()
    assert "<!-- bench:sim-calibration -->" in text and "<!-- /bench:sim-calibration -->" in text
    assert "| e2e latency mean (s) |" in text
    assert f"**{'PASS' if seen[0].passed else 'FAIL'}**" in capsys.readouterr().out


def built(gated_error: float, ungated_error: float = 10.0) -> ce.Calibration:
    """A calibration whose worst gated row is off by `gated_error` (relative)."""
    spec = ce.CpuSpec(flops=1e11, mem_bw=1e10, step_overhead_s=1e-3, per_seq_s=1e-4)
    rows = [ce.row("e2e latency mean (s)", 1.0, 1.0 + gated_error),
            ce.row("TTFT mean (s)", 2.0, 2.0 * (1 - ce.TARGET / 2)),
            ce.row("e2e latency mean (s), at the run's wall/CPU", 1.0, 1.0 + ungated_error,
                   gated=False)]
    return ce.Calibration(spec, 1.0, 10, 0.01, 1.0, rows, ["built"])


@pytest.mark.parametrize(("gated_error", "verdict"), [
    (0.0, True), (ce.TARGET * 0.99, True), (ce.TARGET * 1.5, False), (1.0, False)])
def test_exit_code_follows_the_verdict(gated_error: float, verdict: bool, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    cal = built(gated_error)  # the ungated row is always far off: it must not decide
    assert cal.passed is verdict
    monkeypatch.setattr(ce, "calibrate", lambda *a, **k: cal)
    code = ce.main(["--model-dir", str(tmp_path), "--requests", "1"])
    assert code == (0 if verdict else 1)
    out = capsys.readouterr().out
    assert f"**{'PASS' if verdict else 'FAIL'}**: every gated metric" in out
    assert f"**{'FAIL' if verdict else 'PASS'}**" not in out


def test_separate_weights_fit_folds_weights_into_the_overhead() -> None:
    from elasticserve.sim.calibrate import StepSample, fit_cpu_spec
    from elasticserve.sim.cost_model import CostModel, StepWork
    from elasticserve.sim.model_shapes import QWEN3_0_6B

    # KV reads slower per byte than streaming weights: one shared mem_bw cannot fit this
    truth = ce.CpuSpec(flops=8e11, mem_bw=2e10, step_overhead_s=4e-3, per_seq_s=1e-4,
                       weights_bw=6e10)
    steps = [((0, n),) for n in (16, 200, 900)] + [
        tuple((c, 1) for _ in range(b)) for b in (1, 8, 40) for c in (100, 3000)]
    cost = CostModel(truth, QWEN3_0_6B)
    samples = [StepSample(QWEN3_0_6B, c, cost.work_time(StepWork.from_chunks(c))) for c in steps]
    fit = fit_cpu_spec(samples, separate_weights=True)
    assert fit.weights_bw == math.inf
    assert fit.mem_bw == pytest.approx(2e10, rel=1e-6)
    assert fit.flops == pytest.approx(8e11, rel=1e-6)
    assert fit.step_overhead_s == pytest.approx(4e-3 + QWEN3_0_6B.weights_bytes / 6e10, rel=1e-6)
    fitted = CostModel(fit, QWEN3_0_6B)
    for s in samples:
        assert fitted.work_time(StepWork.from_chunks(s.chunks)) == pytest.approx(s.seconds)


def test_nnls_finds_terms_that_are_negative_only_beside_others() -> None:
    from elasticserve.sim.calibrate import _nnls

    # unconstrained, the first and third coefficients are negative; the optimum keeps the first
    a = np.array([[0, 3, 2], [3, 3, 2], [3, 1, 0], [2, 2, 0]], dtype=float)
    b = np.array([4, 0, 4, 1], dtype=float)
    coef = _nnls(a, b)
    assert coef[0] > 0 and coef[1] > 0 and coef[2] == 0
    assert float(np.sum((a @ coef - b) ** 2)) == pytest.approx(18.712, abs=1e-3)
