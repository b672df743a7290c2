"""Shared fixtures: tiny seeded models of every architecture, and a transformers reference."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

from elasticserve.models.make_model import make_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ARCHS = ["llama", "qwen2", "qwen3", "mistral"]


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    return {arch: make_model(arch, "tiny", str(root / arch), seed=0) for arch in ARCHS}


@pytest.fixture(scope="session")
def tiny_llama(model_dirs: dict[str, str]) -> str:
    return model_dirs["llama"]


@pytest.fixture(scope="session")
def hf_greedy() -> Callable[..., list[list[int]]]:
    """transformers' greedy (or beam) generate, one prompt at a time (no padding effects)."""
    from transformers import AutoModelForCausalLM

    cache: dict[str, torch.nn.Module] = {}

    def run(model_dir: str, prompts: list[list[int]], max_new_tokens: int,
            **kwargs: object) -> list[list[int]]:
        if model_dir not in cache:
            cache[model_dir] = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model = cache[model_dir]
        outs = []
        with torch.inference_mode():
            for ids in prompts:
                x = torch.tensor([ids])
                y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                   max_new_tokens=max_new_tokens, **kwargs)
                outs.extend(row[len(ids):].tolist() for row in y)
        return outs

    return run


def mixed_prompts(tokenizer_dir: str, count: int = 6) -> list[list[int]]:
    """Prompts of 3 to ~70 tokens; two share a long prefix so the prefix cache can hit."""
    from elasticserve.models.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tokenizer_dir)
    base = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1)"
    texts = ["import os", base, base + " + fibonacci(n - 2)\n", "class Engine:\n    pass",
             "for i in range(10):\n    print(i * i, end=' ')\n" * 2, "x = 1"]
    return [tok.encode(t) for t in (texts * 2)[:count]]
