"""The engine takes its model from a WeightsSource: at start, and again on every wake, and tells
it when a sleep dropped the model. A source serving weights from a read-only memfd mapping
(adopted by the model) gives the same greedy tokens as the checkpoint on disk."""

from __future__ import annotations

import gc
import os

import torch

from elasticserve.config import EngineConfig
from elasticserve.engine.args import EngineArgs
from elasticserve.engine.llm_engine import LLMEngine
from elasticserve.engine.weights import DiskWeights
from elasticserve.memory.shared_weights import adopt_weights, map_weights, write_weights
from elasticserve.models.llama import CausalLM
from elasticserve.sampling_params import SamplingParams
from tests.helpers import run_until_done, tokens_of

PROMPTS = [[5, 17, 42, 9], [300, 2, 77], [11] * 20]


class MemfdWeights:
    """In-process stand-in for a shared copy: the checkpoint copied into a memfd, mapped
    read-only, adopted by a model built without weights (the skeleton), as a replica would."""

    def __init__(self) -> None:
        self.loads = self.releases = 0

    def load(self, config: EngineConfig) -> CausalLM:
        fd = os.memfd_create("engine-weights")
        try:
            manifest = write_weights(fd, DiskWeights().load(config).state_dict())
            model = DiskWeights.skeleton(config)
            adopt_weights(model, map_weights(fd, manifest))
        finally:
            os.close(fd)
        self.loads += 1
        return model

    def release(self) -> None:
        self.releases += 1


def greedy(engine: LLMEngine, max_tokens: int = 12) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    ids = [engine.add_request({"prompt_token_ids": p}, params) for p in PROMPTS]
    return tokens_of(run_until_done(engine), ids)


def _mapped() -> bool:
    with open("/proc/self/maps") as f:
        return any("memfd:engine-weights" in line for line in f)


def test_shared_mapping_source_matches_disk_and_follows_sleep_and_wake(
        model_dirs: dict[str, str]) -> None:
    path = model_dirs["qwen3"]  # tied embeddings: the logits read the shared embedding table
    disk = LLMEngine(EngineArgs(model=path, kv_cache_bytes=4 << 20))
    want = greedy(disk)
    disk.close()
    source = MemfdWeights()
    engine = LLMEngine(EngineArgs(model=path, kv_cache_bytes=4 << 20), weights=source)
    try:
        assert engine.model.lm_head is None
        assert all(not p.is_meta for p in engine.model.parameters())
        assert engine.weights_bytes == sum(p.numel() * 4 for p in engine.model.parameters())
        assert greedy(engine) == want and _mapped()
        engine.sleep()
        gc.collect()
        assert (source.loads, source.releases) == (1, 1) and not _mapped()
        assert engine.wake()
        assert source.loads == 2 and _mapped()
        assert greedy(engine) == want
    finally:
        engine.close()


def test_default_source_reads_the_checkpoint(tiny_llama: str) -> None:
    engine = LLMEngine(EngineArgs(model=tiny_llama, kv_cache_bytes=4 << 20, dtype="bfloat16"))
    try:
        assert isinstance(engine.weights, DiskWeights)
        assert engine.model.model.norm.weight.dtype == torch.bfloat16
        skeleton = DiskWeights.skeleton(engine.config)
        assert all(p.is_meta for p in skeleton.parameters())  # no memory behind it
        assert {n: (p.shape, p.dtype) for n, p in skeleton.named_parameters()} == {
            n: (p.shape, p.dtype) for n, p in engine.model.named_parameters()}
    finally:
        engine.close()
