"""Our paged models vs transformers on the same seeded checkpoints."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from elasticserve.kernels.attention import AttentionMetadata
from elasticserve.models.hf_config import load_config
from elasticserve.models.llama import kv_cache_shape
from elasticserve.models.loader import load_model
from elasticserve.models.make_model import make_model
from elasticserve.models.tokenizer import Tokenizer

ARCHS = ("llama", "mistral", "qwen2", "qwen3")
PROMPTS = (
    "def fibonacci(n):\n    if n < 2:",
    "import os",
    "class Queue:\n    \"\"\"A FIFO queue with a bounded size.\"\"\"\n\n    def __init__(self, maxsize=0):",
)


def prefill_logits(model_dir: str, ids: torch.Tensor) -> torch.Tensor:
    model = load_model(model_dir)
    n = ids.numel()
    cache = torch.full(kv_cache_shape(model.config, 8, 16), float("nan"))
    meta = AttentionMetadata.build([(0, n, [6, 1, 3])], 16)
    with torch.no_grad():
        return model.compute_logits(model(ids, torch.arange(n), cache, meta))


def hf_model(model_dir: str) -> Any:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_logits_match_transformers(arch: str, tiny_dirs: dict[str, str]) -> None:
    ids = torch.randint(3, 512, (40,), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = hf_model(tiny_dirs[arch])(ids[None]).logits[0]
    ours = prefill_logits(tiny_dirs[arch], ids)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_paged_greedy_matches_transformers_generate(
    arch: str, tiny_dirs: dict[str, str], greedy: Callable
) -> None:
    model_dir = tiny_dirs[arch]
    tok = Tokenizer.from_dir(model_dir)
    prompts = [tok.encode(p) for p in PROMPTS]
    result = greedy(load_model(model_dir), prompts, max_new=20, eos=tok.eos_token_ids)
    hf = hf_model(model_dir)
    for prompt, ours in zip(prompts, result.tokens, strict=True):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = hf.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False
            )
        assert ours == out[0, len(prompt) :].tolist()
    assert sum(len(t) for t in result.tokens) >= 30  # mostly full-length runs, not early EOS
    assert result.min_margin > 1e-3  # argmaxes are far above fp32 noise (~1e-5)


def test_hf4_and_hf5_configs_give_same_model(tmp_path, tiny_llama: str) -> None:
    hf4 = make_model("llama", "tiny", str(tmp_path / "hf4"), seed=0, config_style="hf4")
    assert load_config(hf4) == load_config(tiny_llama)
    assert load_config(hf4).rope_scaling is not None
    ids = torch.randint(3, 512, (12,), generator=torch.Generator().manual_seed(3))
    ours = prefill_logits(hf4, ids)
    torch.testing.assert_close(ours, prefill_logits(tiny_llama, ids), atol=0, rtol=0)
    with torch.no_grad():
        ref = hf_model(hf4)(ids[None]).logits[0]
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-5)
