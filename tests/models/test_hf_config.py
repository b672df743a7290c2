"""config.json parsing: both transformers spellings, defaults, and error messages."""

from __future__ import annotations

import json
import math

import pytest
import torch

from elasticserve.models.hf_config import ModelConfig, load_config, parse_config
from elasticserve.models.layers import rope_inv_freq

BASE = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 100,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
}
LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 1024}


def parse(**overrides: object) -> ModelConfig:
    raw = {**BASE, **overrides}
    return parse_config({k: v for k, v in raw.items() if v is not ...}, "/m/config.json")


def test_hf4_and_hf5_rope_spellings_agree() -> None:
    hf5 = parse(rope_parameters={"rope_theta": 5e5, "rope_type": "llama3", **LLAMA3},
                dtype="bfloat16")
    hf4 = parse(rope_theta=5e5, rope_scaling={"rope_type": "llama3", **LLAMA3},
                torch_dtype="bfloat16")
    assert hf5 == hf4
    assert hf5.rope_theta == 5e5 and hf5.dtype == torch.bfloat16
    assert hf5.rope_scaling is not None and hf5.rope_scaling.original_max_position_embeddings == 1024
    old_type_key = parse(rope_scaling={"type": "linear", "factor": 2.0})
    assert old_type_key.rope_scaling is not None and old_type_key.rope_scaling.rope_type == "linear"


def test_defaults_follow_transformers() -> None:
    cfg = parse(num_key_value_heads=..., max_position_embeddings=...)
    assert (cfg.num_key_value_heads, cfg.head_dim, cfg.max_position_embeddings) == (4, 16, 2048)
    assert (cfg.rope_theta, cfg.rope_scaling, cfg.dtype) == (10000.0, None, torch.float32)
    assert cfg.eos_token_ids == (2,) and not cfg.tie_word_embeddings
    qwen3 = parse(architectures=["Qwen3ForCausalLM"], eos_token_id=[5, 7])
    assert qwen3.head_dim == 128 and qwen3.qk_norm and not qwen3.attention_bias
    assert qwen3.eos_token_ids == (5, 7)
    qwen2 = parse(architectures=["Qwen2ForCausalLM"], sliding_window=16)
    assert qwen2.attention_bias and not qwen2.o_proj_bias
    assert qwen2.sliding_window is None  # inert without use_sliding_window


def test_mistral_sliding_window_caps_max_model_len() -> None:
    mistral = parse(architectures=["MistralForCausalLM"], sliding_window=1024)
    assert mistral.sliding_window == 1024 and mistral.max_model_len == 1024
    default = parse(architectures=["MistralForCausalLM"], max_position_embeddings=...)
    assert default.max_position_embeddings == 131072
    assert default.sliding_window == 4096 and default.max_model_len == 4096  # HF defaults
    assert parse(architectures=["MistralForCausalLM"], sliding_window=None).max_model_len == 4096
    wide = parse(architectures=["MistralForCausalLM"], sliding_window=8192)
    assert wide.sliding_window is None and wide.max_model_len == 4096


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"hidden_size": ...}, "hidden_size"),
        ({"vocab_size": "many"}, "vocab_size"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"architectures": ["GPT2LMHeadModel"]}, "architectures"),
        ({"architectures": ...}, "architectures"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, "rope_parameters.rope_type"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling.low_freq_factor"),
        ({"rms_norm_eps": -1}, "rms_norm_eps"),
        ({"eos_token_id": "x"}, "eos_token_id"),
        ({"torch_dtype": "int8"}, "torch_dtype"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"tie_word_embeddings": "yes"}, "tie_word_embeddings"),
    ],
)
def test_bad_fields_name_file_and_field(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=r"/m/config\.json.*'" + field.replace(".", r"\.") + "'"):
        parse(**overrides)


def test_unsupported_architecture_lists_supported() -> None:
    with pytest.raises(ValueError, match="supported: LlamaForCausalLM.*Qwen3ForCausalLM"):
        parse(architectures=["GPT2LMHeadModel"])


def test_load_config_file_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="config.json not found"):
        load_config(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=str(tmp_path / "config.json")):
        load_config(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(BASE))
    assert load_config(str(tmp_path)).hidden_size == 64


def test_rope_frequencies_match_transformers() -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for rope in ({"rope_type": "llama3", **LLAMA3}, {"rope_type": "linear", "factor": 4.0}):
        hf_cfg = LlamaConfig(hidden_size=256, num_attention_heads=2, max_position_embeddings=4096,
                             rope_parameters={"rope_theta": 5e5, **rope})
        ref, _ = ROPE_INIT_FUNCTIONS[str(rope["rope_type"])](hf_cfg, "cpu")
        ours = parse(hidden_size=256, num_attention_heads=2, num_key_value_heads=2,
                     rope_parameters={"rope_theta": 5e5, **rope})
        inv = rope_inv_freq(ours.head_dim, ours.rope_theta, ours.rope_scaling)
        torch.testing.assert_close(inv, ref, atol=0, rtol=1e-6)
    plain = rope_inv_freq(8, 10000.0, None)
    assert math.isclose(float(plain[1]), 10000.0 ** (-2 / 8), rel_tol=1e-6)
