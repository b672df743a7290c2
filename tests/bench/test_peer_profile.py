"""`bench peer_profile`: the bound's arithmetic and the split of profiler events into parts
(fake events; the profiling run itself is a benchmark, not a test)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from elasticserve.bench import peer_profile
from elasticserve.bench.peer_profile_bound import Shape, decode_step_s, workload_tok_s

SMALL = {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8,
         "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64, "vocab_size": 4096}


def test_shape_counts_every_linear() -> None:
    s = Shape.of(SMALL)
    # per layer: q 512x512, k and v 512x256, o 512x512, gate/up/down 512x1408; lm_head 512x4096
    per_layer = 512 * 512 * 2 + 512 * 256 * 2 + 3 * 512 * 1408
    assert s.linear_params() == 8 * per_layer + 512 * 4096
    assert s.linear_flops(8) == 16 * s.linear_params()
    assert s.kv_bytes(2, 100) == 2 * 100 * 8 * 2 * 4 * 64 * 4


def test_decode_bound_is_weights_or_flops_plus_kv() -> None:
    s = Shape.of(SMALL)
    # memory-bound at B=1: the weights' read dominates the 51 MFLOP
    assert decode_step_s(s, 1, 0, peak=100.0, bw=10.0) == pytest.approx(s.weight_bytes() / 10e9)
    # compute-bound at B=64 on a slow GEMM
    assert decode_step_s(s, 64, 0, peak=1.0, bw=1000.0) == pytest.approx(s.linear_flops(64) / 1e9)
    assert decode_step_s(s, 8, 500, 100.0, 10.0) > decode_step_s(s, 8, 100, 100.0, 10.0)


def test_workload_bound_grows_with_the_machine() -> None:
    s = Shape.of(SMALL)
    slow = workload_tok_s(s, [100, 200], [10, 20], peak=50.0, bw=10.0)
    assert workload_tok_s(s, [100, 200], [10, 20], peak=100.0, bw=20.0) == pytest.approx(2 * slow)
    # one request of 1 output token costs only its prefill
    one = workload_tok_s(s, [100], [1], peak=50.0, bw=10.0)
    assert one == pytest.approx(1 / (s.linear_flops(100) / 50e9))


@dataclass
class _Range:
    us: float

    def elapsed_us(self) -> float:
        return self.us


@dataclass
class _Event:
    name: str
    cpu_parent: _Event | None
    time_range: _Range


def test_split_sorts_direct_children_of_each_step() -> None:
    step = _Event("es::step", None, _Range(10_000))
    lin = _Event("mkldnn::_linear_pointwise", step, _Range(4_000))
    events = [step, lin, _Event("aten::addmm", lin, _Range(3_900)),  # nested: not counted again
              _Event("es::attention", step, _Range(2_000)), _Event("es::sampler", step, _Range(500)),
              _Event("aten::add", step, _Range(1_000)), _Event("aten::mul", None, _Range(9_999))]
    parts = peer_profile.split(events)
    assert parts["linears"] == pytest.approx(0.004)
    assert parts["attention"] == pytest.approx(0.002)
    assert parts["sampler"] == pytest.approx(0.0005)
    assert parts["other torch ops"] == pytest.approx(0.001)
    assert parts["Python outside torch"] == pytest.approx(0.0025)
    assert parts["wall"] == pytest.approx(0.01)
