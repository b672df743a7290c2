"""Model shapes for the cost model: parameter counts, FLOPs per token and KV bytes per token.

Built-ins use the values of the published Hugging Face ``config.json`` files of each checkpoint
(Qwen/Qwen3-0.6B, meta-llama/Llama-3.1-8B, Qwen/Qwen2.5-14B, meta-llama/Llama-3.1-70B). Any other
decoder-only model can be described with :func:`shape_from_hf_config` on its config dict.
Torch-free: ``elasticserve.models.hf_config`` imports torch, so this module parses on its own.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4,
                "float8_e4m3fn": 1, "int8": 1}


@dataclass(frozen=True, slots=True)
class ModelShape:
    """Decoder-only transformer dimensions. ``tp`` is the tensor-parallel degree."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    max_position_embeddings: int = 131072
    dtype_bytes: int = 2
    tp: int = 1

    def __post_init__(self) -> None:
        dims = (self.hidden_size, self.num_layers, self.num_heads, self.num_kv_heads,
                self.head_dim, self.intermediate_size, self.vocab_size, self.dtype_bytes, self.tp)
        if any(d <= 0 for d in dims):
            raise ValueError(f"{self.name}: every dimension must be positive, got {dims}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.name}: num_heads must be a multiple of num_kv_heads")

    @property
    def layer_matmul_params(self) -> int:
        """Weights one token multiplies through in one layer (attention projections + MLP)."""
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return h * q + 2 * h * kv + q * h + 3 * h * self.intermediate_size

    @property
    def matmul_params(self) -> int:
        """Every layer plus the LM head: the weights behind 2 FLOPs per parameter per token."""
        return self.num_layers * self.layer_matmul_params + self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        """All parameters: matmuls, embeddings (once if tied), norms and biases."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        per_layer = 2 * h  # two RMSNorms
        if self.qkv_bias:
            per_layer += self.num_heads * self.head_dim + 2 * kv
        if self.qk_norm:
            per_layer += 2 * self.head_dim
        embed = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.matmul_params + self.num_layers * per_layer + embed + h

    @property
    def weights_bytes(self) -> int:
        """Bytes of all weights, summed over the ``tp`` GPUs (what the page budget holds)."""
        return self.num_params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token in every layer, summed over the ``tp`` GPUs.

        With fewer KV heads than GPUs each GPU keeps a replica, as vLLM does."""
        heads = max(self.num_kv_heads, self.tp)
        return 2 * self.num_layers * heads * self.head_dim * self.dtype_bytes

    @property
    def attn_flops_per_pair(self) -> int:
        """FLOPs of one (query token, key token) pair over all layers: QK^T and PV."""
        return 4 * self.num_layers * self.num_heads * self.head_dim

    def kv_block_bytes(self, block_size: int) -> int:
        """One KV block of ``block_size`` tokens, as the engine's ``kv_block_bytes``."""
        return block_size * self.kv_bytes_per_token

    def with_tp(self, tp: int) -> ModelShape:
        return dataclasses.replace(self, tp=tp)


def shape_from_hf_config(config: dict[str, Any], name: str | None = None, tp: int = 1,
                         dtype_bytes: int | None = None) -> ModelShape:
    """Build a shape from a Hugging Face ``config.json`` dict (Llama/Qwen2/Qwen3/Mistral style).

    ``dtype_bytes`` overrides the checkpoint dtype (e.g. 4 when the engine runs in float32)."""
    try:
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        shape = ModelShape(
            name=name or str(config.get("_name_or_path") or config.get("model_type", "model")),
            hidden_size=hidden,
            num_layers=int(config["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            intermediate_size=int(config["intermediate_size"]),
            vocab_size=int(config["vocab_size"]),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases; Llama has them only with attention_bias
            qkv_bias=config.get("model_type") == "qwen2" or bool(config.get("attention_bias")),
            qk_norm=config.get("model_type") == "qwen3",
            max_position_embeddings=int(config.get("max_position_embeddings", 131072)),
            dtype_bytes=dtype_bytes or _DTYPE_BYTES.get(
                str(config.get("torch_dtype") or config.get("dtype") or "bfloat16"), 2),
            tp=tp,
        )
    except KeyError as e:
        raise ValueError(f"config.json lacks required key {e.args[0]!r}") from None
    return shape


# Values from each checkpoint's published config.json.
QWEN3_0_6B = ModelShape("Qwen3-0.6B", hidden_size=1024, num_layers=28, num_heads=16,
                        num_kv_heads=8, head_dim=128, intermediate_size=3072, vocab_size=151936,
                        tie_word_embeddings=True, qk_norm=True, max_position_embeddings=40960)
LLAMA_3_1_8B = ModelShape("Llama-3.1-8B", hidden_size=4096, num_layers=32, num_heads=32,
                          num_kv_heads=8, head_dim=128, intermediate_size=14336, vocab_size=128256)
QWEN2_5_14B = ModelShape("Qwen2.5-14B", hidden_size=5120, num_layers=48, num_heads=40,
                         num_kv_heads=8, head_dim=128, intermediate_size=13824,
                         vocab_size=152064, qkv_bias=True)
LLAMA_3_1_70B = ModelShape("Llama-3.1-70B", hidden_size=8192, num_layers=80, num_heads=64,
                           num_kv_heads=8, head_dim=128, intermediate_size=28672,
                           vocab_size=128256)

BUILTIN_SHAPES: dict[str, ModelShape] = {
    s.name: s for s in (QWEN3_0_6B, LLAMA_3_1_8B, QWEN2_5_14B, LLAMA_3_1_70B)
}


def get_shape(name: str, tp: int = 1) -> ModelShape:
    """A built-in shape by name (case-insensitive), with tensor parallelism ``tp``."""
    for key, shape in BUILTIN_SHAPES.items():
        if key.lower() == name.lower():
            return shape.with_tp(tp)
    raise KeyError(f"unknown model {name!r}; built-ins: {', '.join(BUILTIN_SHAPES)}")
