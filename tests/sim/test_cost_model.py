"""Cost model: a hand-computed roofline, monotonicity, transfers, shapes from config.json."""

from __future__ import annotations

import pytest

from elasticserve.sim.cost_model import CostModel, StepWork
from elasticserve.sim.gpu_specs import A100_80GB, H100_80GB, H200, GpuSpec, get_gpu
from elasticserve.sim.model_shapes import (
    BUILTIN_SHAPES,
    LLAMA_3_1_8B,
    QWEN2_5_14B,
    ModelShape,
    get_shape,
    shape_from_hf_config,
)

TINY = ModelShape("tiny", hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4,
                  intermediate_size=16, vocab_size=10)
TOY_GPU = GpuSpec("toy", memory_bytes=1 << 30, hbm_bw=1e4, bf16_flops=1e6, host_bw=100.0,
                  nvlink_bw=1.0, page_map_s=0.5, step_overhead_s=1e-3, flops_eff=1.0,
                  bw_eff=1.0, host_eff=1.0)


def test_tiny_shape_counts_by_hand() -> None:
    # per layer: q 8x8 + k,v 2x(8x4) + o 8x8 + MLP 3x(8x16) = 576; LM head 10x8 = 80
    assert TINY.matmul_params == 656
    # + 2 norms per layer (16) + untied embedding (80) + final norm (8)
    assert TINY.num_params == 760 and TINY.weights_bytes == 1520
    assert TINY.kv_bytes_per_token == 2 * 1 * 1 * 4 * 2
    assert TINY.attn_flops_per_pair == 4 * 1 * 2 * 4


def test_hand_computed_roofline_step() -> None:
    cost = CostModel(TOY_GPU, TINY)
    # a decode at position 9 and a 4-token prefill from 0
    work = StepWork.from_chunks([(9, 1), (0, 4)])
    assert work == StepWork(tokens=5, attn_pairs=10 + 10, kv_tokens_read=14, num_seqs=2)
    flops = 2 * 656 * 5 + 32 * 20  # 7200
    nbytes = 1520 + 16 * 14  # 1744
    assert cost.flops(5, 20) == flops and cost.bytes_moved(14) == nbytes
    # memory bound: 1744 B / 1e4 B/s = 0.1744 s > 7200 / 1e6 = 0.0072 s
    assert cost.work_time(work) == pytest.approx(0.1744 + 1e-3)
    fast_mem = CostModel(TOY_GPU.replace(hbm_bw=1e6), TINY)
    assert fast_mem.work_time(work) == pytest.approx(0.0072 + 1e-3)  # now compute bound
    assert cost.step_time(0, 0, 0, 0) == 0.0


def test_transfers_and_mapping() -> None:
    cost = CostModel(TOY_GPU, TINY)
    assert cost.swap_time(3, 100) == pytest.approx(3.0)  # 300 B over 100 B/s
    assert cost.copy_time(3, 100) == pytest.approx(2 * 300 / 1e4)
    assert cost.page_map_time(4) == pytest.approx(2.0)
    assert cost.load_weights_time() == pytest.approx(1520 / 100)


def test_step_time_is_monotonic() -> None:
    cost = CostModel(H100_80GB, LLAMA_3_1_8B)
    batch = [cost.work_time(StepWork.from_chunks([(512, 1)] * b)) for b in (1, 8, 64, 512)]
    assert batch == sorted(batch) and batch[-1] > batch[0]
    ctx = [cost.work_time(StepWork.from_chunks([(c, 1)] * 32)) for c in (128, 4096, 65536)]
    assert ctx == sorted(ctx) and ctx[-1] > ctx[0]
    prefill = [cost.work_time(StepWork.from_chunks([(0, n)])) for n in (16, 512, 8192)]
    assert prefill == sorted(prefill)
    work = StepWork.from_chunks([(1024, 1)] * 64)
    bigger = CostModel(H100_80GB, QWEN2_5_14B).work_time(work)
    assert bigger > cost.work_time(work)
    gpus = [CostModel(g, LLAMA_3_1_8B).work_time(work) for g in (A100_80GB, H100_80GB, H200)]
    assert gpus[0] > gpus[1] > gpus[2]
    tp4 = CostModel(H100_80GB, LLAMA_3_1_8B.with_tp(4)).work_time(work)
    assert tp4 < cost.work_time(work)


def test_decode_of_an_8b_model_is_weight_bandwidth_bound() -> None:
    cost = CostModel(H100_80GB, LLAMA_3_1_8B)
    t = cost.step_time(1, 1, 1, 1)
    expected = 16.06e9 / (3.35e12 * H100_80GB.bw_eff) + H100_80GB.step_overhead_s
    assert t == pytest.approx(expected, rel=1e-3)


def test_builtin_shapes_match_published_parameter_counts() -> None:
    published = {"Qwen3-0.6B": 0.596e9, "Llama-3.1-8B": 8.03e9, "Qwen2.5-14B": 14.77e9,
                 "Llama-3.1-70B": 70.55e9}
    for name, n in published.items():
        assert BUILTIN_SHAPES[name].num_params == pytest.approx(n, rel=0.005)
    assert get_shape("llama-3.1-70b", tp=4).tp == 4
    with pytest.raises(KeyError):
        get_shape("gpt-5")
    assert get_gpu("h100") is H100_80GB


def test_shape_from_hf_config_matches_builtin() -> None:
    cfg = {"model_type": "qwen2", "hidden_size": 5120, "num_hidden_layers": 48,
           "num_attention_heads": 40, "num_key_value_heads": 8, "intermediate_size": 13824,
           "vocab_size": 152064, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
           "max_position_embeddings": 131072}
    shape = shape_from_hf_config(cfg, name="Qwen2.5-14B")
    assert shape == QWEN2_5_14B
    assert shape_from_hf_config(cfg, dtype_bytes=4).dtype_bytes == 4
    with pytest.raises(ValueError, match="hidden_size"):
        shape_from_hf_config({"num_hidden_layers": 2})
    with pytest.raises(ValueError):
        ModelShape("bad", 8, 1, 3, 2, 4, 16, 10)  # 3 heads over 2 KV heads
