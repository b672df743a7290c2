"""Parse a Hugging Face ``config.json`` into a frozen :class:`ModelConfig`.

Accepts both transformers-4 spellings (``rope_theta``, ``rope_scaling``,
``torch_dtype``) and transformers-5 spellings (``rope_parameters``, ``dtype``).
Defaults for absent optional keys follow the transformers config classes of
each architecture, so a checkpoint means the same thing here as there.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}

# Per-architecture defaults for keys a config.json may omit (as transformers does).
_ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": {"max_position_embeddings": 2048, "bos_token_id": 1, "eos_token_id": 2},
    "MistralForCausalLM": {
        "max_position_embeddings": 4096 * 32,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "sliding_window": 4096,
        "num_key_value_heads": 8,
    },
    "Qwen2ForCausalLM": {"max_position_embeddings": 32768},
    "Qwen3ForCausalLM": {"max_position_embeddings": 32768, "head_dim": 128},
}
SUPPORTED_ARCHITECTURES = tuple(_ARCH_DEFAULTS)


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """Non-default RoPE frequency scaling (``linear`` or ``llama3``)."""

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Architecture hyper-parameters of a decoder-only checkpoint.

    ``sliding_window`` is set only when the model really restricts attention to a
    window smaller than ``max_position_embeddings``. The engine implements full
    attention only, so it must cap ``max_model_len`` at :attr:`max_model_len`;
    within that cap sliding-window and full attention are identical.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # bias on q/k/v projections
    o_proj_bias: bool
    mlp_bias: bool
    qk_norm: bool  # per-head RMSNorm on q and k (Qwen3)
    sliding_window: int | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    dtype: torch.dtype  # checkpoint dtype; compute dtype is the loader's choice

    @property
    def max_model_len(self) -> int:
        """Longest context this engine may serve with full attention."""
        if self.sliding_window is None:
            return self.max_position_embeddings
        return min(self.max_position_embeddings, self.sliding_window)

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads


def load_config(model_dir: str) -> ModelConfig:
    """Read ``<model_dir>/config.json``; ValueError names the file and field on problems."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: config.json not found")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot parse config.json: {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: top level must be a JSON object")
    return parse_config(raw, path)


class _Fields:
    """Typed access to raw config keys with errors that name the file and field."""

    def __init__(self, raw: dict[str, Any], path: str, defaults: dict[str, Any]):
        self.raw, self.path, self.defaults = raw, path, defaults

    def error(self, field: str, why: str) -> ValueError:
        return ValueError(f"{self.path}: field '{field}' {why}")

    def get(self, field: str, default: Any = None) -> Any:
        value = self.raw.get(field)
        if value is None:
            value = self.defaults.get(field, default)
        return value

    def integer(self, field: str, default: int | None = None, minimum: int = 1) -> int:
        value = self.get(field, default)
        if value is None:
            raise self.error(field, "is missing")
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.error(field, f"must be an integer >= {minimum}, got {value!r}")
        return value

    def number(self, field: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise self.error(field, f"must be a positive number, got {value!r}")
        return float(value)

    def boolean(self, field: str, default: bool) -> bool:
        value = self.get(field, default)
        if not isinstance(value, bool):
            raise self.error(field, f"must be true or false, got {value!r}")
        return value

    def opt_token(self, field: str) -> int | None:
        value = self.get(field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise self.error(field, f"must be an integer or null, got {value!r}")
        return value


def parse_config(raw: dict[str, Any], path: str = "config.json") -> ModelConfig:
    """Build a ModelConfig from an already-loaded config dict (``path`` is for messages)."""
    arch = _architecture(raw, path)
    f = _Fields(raw, path, _ARCH_DEFAULTS[arch])
    hidden = f.integer("hidden_size")
    heads = f.integer("num_attention_heads")
    kv_heads = f.integer("num_key_value_heads", heads)
    if heads % kv_heads:
        raise f.error("num_key_value_heads", f"({kv_heads}) must divide num_attention_heads ({heads})")
    if f.get("hidden_act", "silu") != "silu":
        raise f.error("hidden_act", f"must be 'silu', got {raw.get('hidden_act')!r}")
    max_pos = f.integer("max_position_embeddings")
    theta, scaling = _rope(f, max_pos)
    is_qwen = arch.startswith("Qwen")
    attention_bias = f.boolean("attention_bias", False)
    return ModelConfig(
        architecture=arch,
        vocab_size=f.integer("vocab_size"),
        hidden_size=hidden,
        intermediate_size=f.integer("intermediate_size"),
        num_hidden_layers=f.integer("num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=f.integer("head_dim", hidden // heads),
        rms_norm_eps=f.number("rms_norm_eps", f.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=max_pos,
        tie_word_embeddings=f.boolean("tie_word_embeddings", False),
        # Qwen2 hard-codes q/k/v bias (and no o_proj bias) regardless of the config.
        attention_bias=True if arch == "Qwen2ForCausalLM" else attention_bias,
        o_proj_bias=False if arch == "Qwen2ForCausalLM" else attention_bias,
        mlp_bias=f.boolean("mlp_bias", False) if arch == "LlamaForCausalLM" else False,
        qk_norm=arch == "Qwen3ForCausalLM",
        sliding_window=_sliding_window(f, max_pos, is_qwen),
        bos_token_id=f.opt_token("bos_token_id"),
        eos_token_ids=_eos(f),
        dtype=_dtype(f),
    )


def _architecture(raw: dict[str, Any], path: str) -> str:
    archs = raw.get("architectures")
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
        raise ValueError(f"{path}: field 'architectures' is missing or not a non-empty list")
    if archs[0] not in _ARCH_DEFAULTS:
        raise ValueError(
            f"{path}: field 'architectures' names unsupported {archs[0]!r}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return archs[0]


def _rope(f: _Fields, max_pos: int) -> tuple[float, RopeScaling | None]:
    params = f.raw.get("rope_parameters")
    field = "rope_parameters"
    if params is None:
        params, field = f.raw.get("rope_scaling"), "rope_scaling"
    params = dict(params or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise f.error(field, "with per-layer-type RoPE is not supported")
    theta = f.number(f"{field}.rope_theta", params.get("rope_theta", f.get("rope_theta", 10000.0)))
    if params.get("partial_rotary_factor", f.get("partial_rotary_factor", 1.0)) != 1.0:
        raise f.error("partial_rotary_factor", "other than 1.0 is not supported")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type not in ("linear", "llama3"):
        raise f.error(f"{field}.rope_type", f"{rope_type!r} is not supported (default, linear, llama3)")

    def num(key: str) -> float:
        if key not in params:
            raise f.error(f"{field}.{key}", f"is required for rope_type {rope_type!r}")
        return f.number(f"{field}.{key}", params[key])

    if rope_type == "linear":
        return theta, RopeScaling("linear", num("factor"))
    original = params.get("original_max_position_embeddings", max_pos)
    scaling = RopeScaling(
        "llama3",
        num("factor"),
        num("low_freq_factor"),
        num("high_freq_factor"),
        int(f.number(f"{field}.original_max_position_embeddings", original)),
    )
    if scaling.high_freq_factor <= scaling.low_freq_factor:
        raise f.error(f"{field}.high_freq_factor", "must exceed low_freq_factor")
    return theta, scaling


def _sliding_window(f: _Fields, max_pos: int, is_qwen: bool) -> int | None:
    # Qwen configs carry a sliding_window value that is inert unless use_sliding_window.
    if is_qwen and not f.raw.get("use_sliding_window", False):
        return None
    window = f.raw["sliding_window"] if "sliding_window" in f.raw else f.defaults.get("sliding_window")
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise f.error("sliding_window", f"must be a positive integer or null, got {window!r}")
    return window if window < max_pos else None


def _eos(f: _Fields) -> tuple[int, ...]:
    eos = f.get("eos_token_id")
    if eos is None:
        return ()
    values = eos if isinstance(eos, list) else [eos]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise f.error("eos_token_id", f"must be an integer or a list of integers, got {eos!r}")
    return tuple(values)


def _dtype(f: _Fields) -> torch.dtype:
    name = f.raw.get("dtype", f.raw.get("torch_dtype")) or "float32"
    field = "dtype" if "dtype" in f.raw else "torch_dtype"
    if not isinstance(name, str) or name.removeprefix("torch.") not in _DTYPES:
        raise f.error(field, f"must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name.removeprefix("torch.")]
