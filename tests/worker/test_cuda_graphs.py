"""Static decode buffers: buckets, padding, copy-in, slice-out; eager parity on the CPU and
graph capture/replay on a GPU."""

from __future__ import annotations

import pytest
import torch

from elasticserve import LLM, SamplingParams
from elasticserve.worker.cuda_graphs import DecodeGraphs, decode_buckets
from tests.engine.conftest import mixed_prompts


def test_buckets_cover_every_batch_size_up_to_the_maximum():
    assert decode_buckets(1) == [1]
    assert decode_buckets(6) == [1, 2, 4, 6]
    assert decode_buckets(40) == [1, 2, 4, 8, 16, 32, 40]
    graphs = DecodeGraphs(40, 4, 16, "cpu")
    assert [graphs.bucket_for(n) for n in (1, 3, 5, 9, 17, 33, 40)] == [1, 4, 8, 16, 32, 40, 40]
    assert graphs.bucket_for(41) is None
    with pytest.raises(ValueError, match="max_batch"):
        decode_buckets(0)


def test_load_pads_with_the_last_sequence_and_fills_the_kernel_tables():
    graphs = DecodeGraphs(8, 3, 4, "cpu")
    b = graphs.load([(11, 5, [7, 2]), (12, 0, [3]), (13, 9, [1, 4, 6])])
    assert b == 4
    assert graphs.input_ids[:b].tolist() == [11, 12, 13, 13]
    assert graphs.positions[:b].tolist() == [5, 0, 9, 9]
    # position 5 with blocks of 4 is block 2 (table index 1), offset 1
    assert graphs.slot_blocks[:b].tolist() == [2, 3, 6, 6]
    assert graphs.slot_offsets[:b].tolist() == [1, 0, 1, 1]
    assert graphs.slots[:b].tolist() == [9, 12, 25, 25]
    assert graphs.seq_lens[:b].tolist() == [6, 1, 10, 10]
    assert graphs.block_tables[:b].tolist() == [[7, 2, 0], [3, 0, 0], [1, 4, 6], [1, 4, 6]]
    meta = graphs.meta(b)
    work = meta.triton_work
    assert work is not None and work.decode_seqs.tolist() == [0, 1, 2, 3]
    assert work.query_start.tolist() == [0, 1, 2, 3, 4] and work.prefill_seqs.numel() == 0
    assert meta.query_start_loc == [0, 1, 2, 3, 4] and meta.decode_only
    # the metadata views the static buffers: a later step's data shows through unchanged views
    graphs.load([(20, 1, [5]), (21, 2, [6])])
    assert graphs.meta(4) is meta and work.seq_lens[:2].tolist() == [2, 3]


def test_load_refuses_what_the_buffers_cannot_hold():
    graphs = DecodeGraphs(4, 2, 4, "cpu")
    with pytest.raises(ValueError, match="decode batch of 0"):
        graphs.load([])
    with pytest.raises(ValueError, match="decode batch of 5"):
        graphs.load([(1, 0, [0])] * 5)
    with pytest.raises(ValueError, match="seq 0: block table of 3 blocks"):
        graphs.load([(1, 0, [0, 1, 2])])
    with pytest.raises(ValueError, match="cannot hold position 8"):
        graphs.load([(1, 8, [0, 1])])


def _run(model_dir: str, device: str, **kwargs: object) -> tuple[list[list[int]], LLM]:
    llm = LLM(model_dir, device=device, max_num_seqs=6, **kwargs)  # type: ignore[arg-type]
    params = SamplingParams(max_tokens=6, temperature=0.0, logprobs=1)
    outs = llm.generate([{"prompt_token_ids": p} for p in mixed_prompts(model_dir, 5)], params)
    llm.engine.check_integrity()
    return [o.outputs[0].token_ids for o in outs], llm


def test_static_buffers_give_the_eager_tokens(tiny_llama: str, device: str):
    """The whole engine with cuda_graphs on (eager replay of the static buffers on a CPU,
    captured graphs on a GPU) decodes exactly what the eager Triton path decodes."""
    eager, _ = _run(tiny_llama, device, attention_backend="triton")
    graphed, llm = _run(tiny_llama, device, cuda_graphs=True)
    graphs = llm.engine.runner.graphs
    assert graphs is not None and graphs.buckets == [1, 2, 4, 6]
    assert graphs.runs > 0  # decode steps really went through the buffers (5 seqs: bucket 6)
    assert graphed == eager
    assert (graphs.replays > 0) is (device == "cuda")


def test_cuda_graphs_need_the_triton_kernel(tiny_llama: str):
    with pytest.raises(ValueError, match="cuda_graphs needs attention_backend 'triton'"):
        LLM(tiny_llama, cuda_graphs=True, attention_backend="torch")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_bucket_is_captured_once_and_replayed(tiny_llama: str):
    _, llm = _run(tiny_llama, "cuda", cuda_graphs=True)
    graphs = llm.engine.runner.graphs
    assert graphs is not None and graphs.capture
    assert set(graphs.graphs) <= set(graphs.buckets) and graphs.replays >= len(graphs.graphs)


def test_a_new_model_drops_the_captured_graphs(tiny_llama: str):
    """A wake reloads the weights at new addresses: graphs over the old ones must go."""
    llm = LLM(tiny_llama, cuda_graphs=True, max_num_seqs=4)
    runner = llm.engine.runner
    graphs = runner.graphs
    assert graphs is not None
    graphs.graphs[2], graphs.outputs[2] = object(), torch.zeros(2)  # as if captured
    llm.engine.sleep()
    assert llm.engine.wake()
    assert graphs.graphs == {} and graphs.outputs == {} and runner.graphs is graphs
