"""The KV storage's device duties: a backend's page pool refilled after each step (off the
grow path), its stream bound only on a GPU, host swap space pinned only for a GPU."""

from __future__ import annotations

import pytest
import torch

from elasticserve import LLM, SamplingParams
from elasticserve.memory import factory
from elasticserve.memory.host import HostBackend


class PoolBackend(HostBackend):
    """A host backend with the CUDA backend's pool and stream hooks, counting calls."""

    fills = 0
    streams: list[int] = []

    def fill_pool(self) -> int:
        PoolBackend.fills += 1
        return 0

    def set_stream(self, stream: int) -> None:
        PoolBackend.streams.append(stream)


def test_pool_refilled_after_every_step_and_no_stream_on_the_cpu(
        tiny_llama: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(factory._REGISTRY, "host",
                        lambda page_size: PoolBackend(page_size=page_size or 1 << 16))
    PoolBackend.fills, PoolBackend.streams = 0, []
    llm = LLM(tiny_llama, swap_space=1 << 20)
    assert isinstance(llm.engine.kv.backend, PoolBackend)
    swap = llm.engine.kv.swap_tensor
    assert swap is not None and not swap.is_pinned()
    steps = 0
    step = llm.engine.step

    def counted() -> object:
        nonlocal steps
        steps += 1
        return step()

    llm.engine.step = counted  # type: ignore[method-assign]
    llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=4, temperature=0))
    assert steps >= 4 and PoolBackend.fills >= steps
    assert PoolBackend.streams == []  # a CPU cache has no stream to wait for


@pytest.mark.gpu
def test_gpu_cache_binds_its_stream_and_pins_swap(tiny_llama: str, device: str):
    if device != "cuda":
        pytest.skip("the GPU half of the test above")
    import torch

    llm = LLM(tiny_llama, device="cuda", swap_space=1 << 20)
    kv = llm.engine.kv
    assert kv.tensor.device.type == "cuda" and kv.backend.name == "cuda"
    assert kv.swap_tensor is not None and kv.swap_tensor.is_pinned()
    assert kv.backend.stream == torch.cuda.current_stream().cuda_stream


def test_a_given_backend_must_serve_the_device(tiny_llama: str):
    """A backend handed in (a worker's shared host budget) that the device cannot read is a
    clear error, not a device mismatch at the first step."""
    from elasticserve.config import CacheConfig, MemoryConfig
    from elasticserve.engine.kv_storage import KVStorage
    from elasticserve.models.hf_config import load_config

    backend = HostBackend(page_size=1 << 16)
    try:
        with pytest.raises(ValueError, match="device='cuda': the KV memory backend 'host'"):
            KVStorage(CacheConfig(), MemoryConfig(), load_config(tiny_llama), torch.float32,
                      backend=backend, device="cuda")
    finally:
        backend.close()
