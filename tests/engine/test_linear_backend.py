"""`linear_backend`: oneDNN-prepacked linear weights ("mkldnn") give the same greedy tokens as
`F.linear` ("torch"), are packed again after a wake reloads the model, replace the plain weights
(counted once), and "auto" falls back to torch where packing does not apply."""

from __future__ import annotations

import pytest
import torch

from elasticserve.engine.args import EngineArgs
from elasticserve.engine.llm_engine import LLMEngine
from elasticserve.sampling_params import SamplingParams
from tests.engine.conftest import mixed_prompts
from tests.helpers import run_until_done, tokens_of


def _engine(path: str, **kw: object) -> LLMEngine:
    return LLMEngine(EngineArgs(model=path, kv_cache_bytes=4 << 20, **kw))  # type: ignore[arg-type]


def _greedy(engine: LLMEngine, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    ids = [engine.add_request({"prompt_token_ids": p}, params) for p in prompts]
    return tokens_of(run_until_done(engine), ids)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # untied lm_head (packed) and tied (plain)
def test_mkldnn_and_torch_give_identical_greedy_tokens(model_dirs: dict[str, str],
                                                       arch: str) -> None:
    path = model_dirs[arch]
    prompts = mixed_prompts(path)
    packed, plain = _engine(path, linear_backend="mkldnn"), _engine(path, linear_backend="torch")
    try:
        assert packed.model.linears_packed and not plain.model.linears_packed
        assert packed.weights_bytes == plain.weights_bytes  # the packed copy replaced the plain
        assert _greedy(packed, prompts) == _greedy(plain, prompts)
        if arch == "llama":
            assert packed.model.lm_head is not None and packed.model.lm_head.weight.is_mkldnn
        packed.sleep()
        assert packed.wake() and packed.model.linears_packed  # the reload is packed again
        assert _greedy(packed, prompts[:2]) == _greedy(plain, prompts[:2])
    finally:
        packed.close()
        plain.close()


def test_auto_packs_fp32_cpu_and_falls_back_to_torch_elsewhere(
        tiny_llama: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fp32 = _engine(tiny_llama)
    bf16 = _engine(tiny_llama, dtype="bfloat16")
    try:
        assert fp32.model.linears_packed
        assert not bf16.model.linears_packed  # not fp32: F.linear
    finally:
        fp32.close()
        bf16.close()
    with pytest.raises(ValueError, match="linear_backend='mkldnn' needs an fp32"):
        _engine(tiny_llama, dtype="bfloat16", linear_backend="mkldnn")
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    no_onednn = _engine(tiny_llama)
    try:
        assert not no_onednn.model.linears_packed  # torch without oneDNN: F.linear
    finally:
        no_onednn.close()


def test_linear_backend_is_validated_by_name(tiny_llama: str) -> None:
    with pytest.raises(ValueError, match="linear_backend must be one of"):
        _engine(tiny_llama, linear_backend="onednn")
