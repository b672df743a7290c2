"""Hugging Face decoder checkpoints (Llama, Mistral, Qwen2, Qwen3) on a paged KV cache."""

from elasticserve.models.hf_config import ModelConfig, RopeScaling, load_config, parse_config
from elasticserve.models.llama import CausalLM, kv_cache_shape
from elasticserve.models.loader import load_model
from elasticserve.models.make_model import make_model
from elasticserve.models.registry import MODEL_REGISTRY
from elasticserve.models.tokenizer import IncrementalDetokenizer, Tokenizer

__all__ = [
    "MODEL_REGISTRY",
    "CausalLM",
    "IncrementalDetokenizer",
    "ModelConfig",
    "RopeScaling",
    "Tokenizer",
    "kv_cache_shape",
    "load_config",
    "load_model",
    "make_model",
    "parse_config",
]
