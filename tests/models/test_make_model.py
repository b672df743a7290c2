"""Seeded model maker: determinism, sizes, per-architecture choices."""

from __future__ import annotations

import filecmp
import os

import pytest
import torch

from elasticserve.models.hf_config import load_config, parse_config
from elasticserve.models.llama import CausalLM
from elasticserve.models.make_model import SIZES, _config, make_model

FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
         "generation_config.json")


def param_count(arch: str, size: str) -> int:
    cfg = parse_config(_config(arch, SIZES[size], "hf5", "float32"))
    with torch.device("meta"):
        return sum(p.numel() for p in CausalLM(cfg).parameters())


def test_same_seed_same_bytes(tmp_path, tiny_dirs: dict[str, str]) -> None:
    again = make_model("qwen3", "tiny", str(tmp_path / "again"), seed=0)
    other = make_model("qwen3", "tiny", str(tmp_path / "other"), seed=1)
    for name in FILES:
        assert filecmp.cmp(os.path.join(again, name), os.path.join(tiny_dirs["qwen3"], name),
                           shallow=False), name
    assert not filecmp.cmp(os.path.join(other, "model.safetensors"),
                           os.path.join(again, "model.safetensors"), shallow=False)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_sizes(arch: str) -> None:
    assert 0.3e6 < param_count(arch, "tiny") < 0.7e6
    assert 20e6 < param_count(arch, "small") < 40e6


def test_architecture_choices(tiny_dirs: dict[str, str]) -> None:
    llama = load_config(tiny_dirs["llama"])
    assert llama.rope_scaling is not None and llama.rope_scaling.rope_type == "llama3"
    assert not llama.tie_word_embeddings and llama.num_kv_groups == 2
    assert load_config(tiny_dirs["qwen2"]).tie_word_embeddings
    assert load_config(tiny_dirs["qwen2"]).attention_bias
    assert load_config(tiny_dirs["qwen3"]).qk_norm
    mistral = load_config(tiny_dirs["mistral"])
    assert mistral.sliding_window == 1024 and mistral.max_model_len == 1024
    for d in tiny_dirs.values():
        assert load_config(d).max_position_embeddings >= 1024
    small = parse_config(_config("llama", SIZES["small"], "hf5", "float32"))
    assert small.max_position_embeddings >= 2048


def test_rejects_bad_arguments(tmp_path) -> None:
    for kwargs, match in (
        ({"arch": "gpt2"}, "arch"),
        ({"size": "huge"}, "size"),
        ({"config_style": "hf3"}, "config_style"),
    ):
        args = {"arch": "llama", "size": "tiny", "out_dir": str(tmp_path), **kwargs}
        with pytest.raises(ValueError, match=match):
            make_model(**args)  # type: ignore[arg-type]
