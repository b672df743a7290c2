"""One decoder covering Llama, Mistral, Qwen2 and Qwen3 (differences are config flags).

Projections are fused (q/k/v into ``qkv_proj``, gate/up into ``gate_up_proj``) to
halve the number of matmuls per layer; :meth:`CausalLM.checkpoint_layout` tells
the loader which rows of a fused parameter each Hugging Face tensor fills.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from elasticserve.kernels.attention import AttentionMetadata, paged_attention
from elasticserve.models.hf_config import ModelConfig
from elasticserve.models.layers import (
    Embedding,
    GatedMLP,
    Linear,
    RMSNorm,
    RotaryEmbedding,
    apply_rope,
)
from elasticserve.models.workspace import StepWorkspace


@dataclass(frozen=True, slots=True)
class TensorSlot:
    """Where a checkpoint tensor lands: rows [start, stop) of parameter ``param``."""

    param: str
    start: int
    stop: int


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.hq, self.hkv, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale = self.d**-0.5
        qkv_out = (self.hq + 2 * self.hkv) * self.d
        self.qkv_proj = Linear(cfg.hidden_size, qkv_out, cfg.attention_bias)
        self.o_proj = Linear(self.hq * self.d, cfg.hidden_size, cfg.o_proj_bias)
        self.native = False  # fused C RoPE (kernels/native_ops.py)
        self.q_norm = RMSNorm(self.d, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.d, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split(
            [self.hq * self.d, self.hkv * self.d, self.hkv * self.d], dim=-1
        )
        q, k, v = q.view(t, self.hq, self.d), k.view(t, self.hkv, self.d), v.view(t, self.hkv, self.d)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        # q and k are views of this layer's fresh qkv output: rotating them in place is safe
        q, k = apply_rope(q, *rope, native=self.native), apply_rope(k, *rope, native=self.native)
        out = paged_attention(q, k, v, kv_cache, self.layer_idx, meta, self.scale)
        return self.o_proj(out.reshape(t, self.hq * self.d))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)

    def forward(
        self,
        h: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        workspace: StepWorkspace | None = None,
    ) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), rope, kv_cache, meta)
        return h + self.mlp(self.post_attention_layernorm(h), workspace)


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)


class CausalLM(nn.Module):
    """Decoder-only LM driven by the engine's model runner.

    Parameters are created uninitialized; build it through ``load_model``.

    ``forward`` runs the new tokens of a flattened batch through every layer,
    writing their K/V into ``kv_cache`` (see :func:`kv_cache_shape`);
    ``compute_logits`` projects only the rows the runner samples from.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = DecoderModel(config)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else Linear(config.hidden_size, config.vocab_size, bias=False)
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        before_layer: Callable[[int], None] | None = None,
        workspace: StepWorkspace | None = None,
    ) -> torch.Tensor:
        """input_ids, positions: [T] -> final-normed hidden states [T, hidden].

        `before_layer(i)` runs before layer i reads or writes the cache: the layer-wise onload
        waits there for layer i's swapped-in KV (worker/layer_onload.py). `workspace`: where
        the MLPs write their intermediates this step (models/workspace.py)."""
        h = self.model.embed_tokens(input_ids)
        rope = self.model.rotary(positions, h.dtype)
        for i, layer in enumerate(self.model.layers):
            if before_layer is not None:
                before_layer(i)
            h = layer(h, rope, kv_cache, meta, workspace)
        return self.model.norm(h)

    def use_native_ops(self, enabled: bool) -> None:
        """Route RMSNorm, RoPE and SiLU-and-mul to the fused C ops (fp32 CPU tensors only;
        anything else keeps the torch path)."""
        for module in self.modules():
            if hasattr(module, "native"):
                setattr(module, "native", enabled)  # noqa: B010 (mypy: Module's __setattr__)

    def pack_linears(self) -> int:
        """Prepack every Linear's weight for oneDNN (kernels/mkldnn_linear.py), in place;
        returns how many were packed. A tied output projection stays plain: it is also the
        embedding table, which is gathered from."""
        linears = [m for m in self.modules() if isinstance(m, Linear)]
        for module in linears:
            module.pack()
        return len(linears)

    @property
    def linears_packed(self) -> bool:
        """Whether the Linear weights are oneDNN-packed (all or none are)."""
        return any(isinstance(m, Linear) and m.weight.is_mkldnn for m in self.modules())

    def compute_logits(self, hidden: torch.Tensor,
                       workspace: StepWorkspace | None = None) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab] (fp32 regardless of model dtype), in the
        step's workspace when it is active and the projection has an `out=` form."""
        into = None if workspace is None else workspace.logits(hidden.shape[0])
        if into is not None and hidden.dim() == 2 and self.logits_placeable:
            raw, out = into
            if self.lm_head is not None:
                self.lm_head.forward_into(hidden, raw)
            else:
                torch.mm(hidden, self.model.embed_tokens.weight.t(), out=raw)
            return out if raw is out else out.copy_(raw)
        if self.lm_head is not None:
            return self.lm_head(hidden).float()
        return F.linear(hidden, self.model.embed_tokens.weight).float()

    @property
    def logits_placeable(self) -> bool:
        """Whether the output projection can write into a given tensor (not oneDNN-packed)."""
        return self.lm_head is None or not self.lm_head.weight.is_mkldnn

    def checkpoint_layout(self) -> dict[str, TensorSlot]:
        """Every Hugging Face tensor name this model expects, and where it goes."""
        cfg = self.config
        layout: dict[str, TensorSlot] = {}
        for name, param in self.named_parameters():
            layout[name] = TensorSlot(name, 0, param.shape[0])
        q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        inter = cfg.intermediate_size
        for i in range(cfg.num_hidden_layers):
            pre = f"model.layers.{i}"
            for suffix in ("weight", "bias") if cfg.attention_bias else ("weight",):
                fused = f"{pre}.self_attn.qkv_proj.{suffix}"
                del layout[fused]
                layout[f"{pre}.self_attn.q_proj.{suffix}"] = TensorSlot(fused, 0, q)
                layout[f"{pre}.self_attn.k_proj.{suffix}"] = TensorSlot(fused, q, q + kv)
                layout[f"{pre}.self_attn.v_proj.{suffix}"] = TensorSlot(fused, q + kv, q + 2 * kv)
            for suffix in ("weight", "bias") if cfg.mlp_bias else ("weight",):
                fused = f"{pre}.mlp.gate_up_proj.{suffix}"
                del layout[fused]
                layout[f"{pre}.mlp.gate_proj.{suffix}"] = TensorSlot(fused, 0, inter)
                layout[f"{pre}.mlp.up_proj.{suffix}"] = TensorSlot(fused, inter, 2 * inter)
        return layout


def kv_cache_shape(config: ModelConfig, num_blocks: int, block_size: int) -> tuple[int, ...]:
    """[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim] (block-major)."""
    return (
        num_blocks,
        config.num_hidden_layers,
        2,
        block_size,
        config.num_key_value_heads,
        config.head_dim,
    )
