"""Write seeded random models in Hugging Face format (no downloads are possible here).

Weights use unit-variance-preserving init (std = 1/sqrt(fan_in)) and an output
projection scaled for logits of std ~5, so next-token argmaxes have clear margins
and greedy decoding is stable against 1e-6-level numeric noise when comparing
implementations. The tokenizer is a byte-level BPE trained on the Python stdlib.
"""

from __future__ import annotations

import functools
import json
import os
import sysconfig
from dataclasses import dataclass

import torch
from safetensors.torch import save_file
from tokenizers import ByteLevelBPETokenizer

from elasticserve.models.progress import Progress

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 0, 1, 2
# ChatML; with `tools`, a system turn lists them and says how to call one (the JSON array the
# server's tool_choice="required" grammar forces and its "auto" parser reads), and an
# assistant's earlier tool_calls are shown in that same format. Without tools: plain ChatML.
CHATML_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\\n' }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}{% endif %}"
    "{{ 'You may call these tools. To call tools, answer with only a JSON array: '"
    " + '[{\"name\": <function name>, \"parameters\": <arguments object>}]\\n<tools>\\n' }}"
    "{% for tool in tools %}{{ tool | tojson }}{{ '\\n' }}{% endfor %}"
    "{{ '</tools><|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if tools and loop.first and message['role'] == 'system' %}"
    "{% elif message['role'] == 'assistant' and message['tool_calls'] %}"
    "{{ '<|im_start|>assistant\\n' + (message['content'] or '') + '[' }}"
    "{% for call in message['tool_calls'] %}{% if not loop.first %}{{ ', ' }}{% endif %}"
    "{{ '{\"name\": ' + (call['function']['name'] | tojson) + ', \"parameters\": '"
    " + (call['function']['arguments'] | tojson) + '}' }}{% endfor %}"
    "{{ ']<|im_end|>\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_CORPUS_CAP_BYTES = 2_000_000
_LOGIT_STD = 5.0
# Layer outputs dominate the residual stream, so with tied embeddings the input
# token's own embedding does not win the logits and greedy text is not one token
# repeated forever.
_RESIDUAL_GAIN = 4.0

ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "mistral": ("MistralForCausalLM", "mistral"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}


@dataclass(frozen=True, slots=True)
class SizeSpec:
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    max_pos: int
    head_dim: int | None = None  # explicit, when q/k/v heads are wider than hidden // heads


SIZES = {
    "tiny": SizeSpec(512, 128, 2, 4, 2, 384, 2048),  # ~0.5M params
    "small": SizeSpec(4096, 512, 8, 8, 4, 1408, 4096),  # ~28M params
    # cheap to run but with a large KV per token (16 KiB in fp32): memory tests that must map
    # hundreds of MiB of KV without hours of CPU prefill
    "widekv": SizeSpec(512, 64, 2, 16, 16, 128, 2048, head_dim=64),
    # the default served model, trained briefly (models/train.py) so it writes Python-like text:
    # a larger vocabulary puts more characters in each token the run sees
    "demo": SizeSpec(1024, 192, 4, 6, 2, 512, 2048),  # ~2M params
}


def make_model(
    arch: str,
    size: str,
    out_dir: str,
    seed: int = 0,
    config_style: str = "hf5",
    dtype: str = "float32",
    num_shards: int = 1,
) -> str:
    """Write config, weights, tokenizer and generation config to ``out_dir``; return it.

    arch: llama | mistral | qwen2 | qwen3; size: a `SIZES` key; config_style: "hf5"
    (rope_parameters, dtype) or "hf4" (rope_theta/rope_scaling, torch_dtype);
    num_shards > 1 writes a sharded checkpoint with model.safetensors.index.json.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {sorted(ARCHITECTURES)}, got {arch!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    if config_style not in ("hf4", "hf5"):
        raise ValueError(f"config_style must be 'hf4' or 'hf5', got {config_style!r}")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    spec = SIZES[size]
    os.makedirs(out_dir, exist_ok=True)
    config = _config(arch, spec, config_style, dtype)
    _write_json(out_dir, "config.json", config)
    weights = _weights(config, seed, getattr(torch, dtype))
    _save_weights(out_dir, weights, num_shards)
    with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(trained_tokenizer_json(spec.vocab))
    _write_json(out_dir, "tokenizer_config.json", _tokenizer_config(spec))
    generation = {"eos_token_id": [IM_END_ID, ENDOFTEXT_ID], "pad_token_id": ENDOFTEXT_ID}
    _write_json(out_dir, "generation_config.json", generation)
    return out_dir


def _config(arch: str, s: SizeSpec, style: str, dtype: str) -> dict:
    architecture, model_type = ARCHITECTURES[arch]
    cfg: dict = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": s.vocab,
        "hidden_size": s.hidden,
        "intermediate_size": s.intermediate,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "head_dim": s.head_dim or s.hidden // s.heads,
        "hidden_act": "silu",
        "max_position_embeddings": s.max_pos,
        "rms_norm_eps": 1e-6,
        # Qwen models tie embeddings (as small Qwen checkpoints do); Llama/Mistral do not.
        "tie_word_embeddings": arch.startswith("qwen"),
        "bos_token_id": ENDOFTEXT_ID,
        "eos_token_id": ENDOFTEXT_ID,
        "initializer_range": 0.02,
        "use_cache": True,
    }
    if arch in ("llama", "qwen3"):
        cfg["attention_bias"] = False
    if arch.startswith("qwen"):
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=s.layers)
    if arch == "mistral":
        cfg["sliding_window"] = s.max_pos // 2  # exercises the max_model_len cap
    cfg.update(_rope_fields(arch, s, style))
    cfg["dtype" if style == "hf5" else "torch_dtype"] = dtype
    return cfg


def _rope_fields(arch: str, s: SizeSpec, style: str) -> dict:
    theta = {"llama": 500000.0, "mistral": 10000.0}.get(arch, 1000000.0)
    scaling = None
    if arch == "llama":
        scaling = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": s.max_pos // 4,
        }
    if style == "hf5":
        return {"rope_parameters": {"rope_theta": theta, "rope_type": "default", **(scaling or {})}}
    return {"rope_theta": theta, "rope_scaling": scaling}


def _weights(cfg: dict, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    q_out = cfg["num_attention_heads"] * cfg["head_dim"]
    kv_out = cfg["num_key_value_heads"] * cfg["head_dim"]
    tied, arch = cfg["tie_word_embeddings"], cfg["model_type"]

    def randn(*shape: int, std: float, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std + mean

    def linear(out: int, inp: int, gain: float = 1.0) -> torch.Tensor:
        return randn(out, inp, std=gain * inp**-0.5)

    out: dict[str, torch.Tensor] = {}
    # Tied: the embedding doubles as the output projection, so it gets the logit scale.
    embed_std = _LOGIT_STD * hidden**-0.5 if tied else 1.0
    out["model.embed_tokens.weight"] = randn(cfg["vocab_size"], hidden, std=embed_std)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        out[f"{p}.input_layernorm.weight"] = randn(hidden, std=0.1, mean=1.0)
        out[f"{p}.post_attention_layernorm.weight"] = randn(hidden, std=0.1, mean=1.0)
        for name, rows in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)):
            out[f"{p}.self_attn.{name}.weight"] = linear(rows, hidden)
            if arch == "qwen2":
                out[f"{p}.self_attn.{name}.bias"] = randn(rows, std=0.2)
        out[f"{p}.self_attn.o_proj.weight"] = linear(hidden, q_out, _RESIDUAL_GAIN)
        if arch == "qwen3":
            out[f"{p}.self_attn.q_norm.weight"] = randn(cfg["head_dim"], std=0.1, mean=1.0)
            out[f"{p}.self_attn.k_norm.weight"] = randn(cfg["head_dim"], std=0.1, mean=1.0)
        out[f"{p}.mlp.gate_proj.weight"] = linear(inter, hidden)
        out[f"{p}.mlp.up_proj.weight"] = linear(inter, hidden)
        out[f"{p}.mlp.down_proj.weight"] = linear(hidden, inter, _RESIDUAL_GAIN)
    out["model.norm.weight"] = randn(hidden, std=0.1, mean=1.0)
    if not tied:
        out["lm_head.weight"] = randn(cfg["vocab_size"], hidden, std=_LOGIT_STD * hidden**-0.5)
    return {k: v.to(dtype).contiguous() for k, v in out.items()}


def _save_weights(out_dir: str, weights: dict[str, torch.Tensor], num_shards: int) -> None:
    if num_shards <= 1:
        save_file(weights, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        return
    names = list(weights)
    weight_map: dict[str, str] = {}
    for shard in range(num_shards):
        fname = f"model-{shard + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {n: weights[n] for n in names[shard::num_shards]}
        save_file(part, os.path.join(out_dir, fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    total = sum(t.numel() * t.element_size() for t in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    _write_json(out_dir, "model.safetensors.index.json", index)


def _tokenizer_config(s: SizeSpec) -> dict:
    added = {
        str(i): {"content": tok, "special": True, "lstrip": False, "rstrip": False,
                 "normalized": False, "single_word": False}
        for i, tok in enumerate(SPECIAL_TOKENS)
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": s.max_pos,
        "added_tokens_decoder": added,
        "chat_template": CHATML_TEMPLATE,
    }


def stdlib_corpus() -> list[str]:
    """Sorted top-level stdlib modules, capped so training takes well under a second."""
    stdlib = sysconfig.get_paths()["stdlib"]
    texts, total = [], 0
    for name in sorted(os.listdir(stdlib)):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(stdlib, name), "rb") as f:
            text = f.read().decode("utf-8", errors="replace")
        texts.append(text)
        total += len(text)
        if total >= _CORPUS_CAP_BYTES:
            break
    return texts


@functools.lru_cache(maxsize=4)
def trained_tokenizer_json(vocab_size: int) -> str:
    """tokenizer.json text of a byte-level BPE with ``vocab_size`` ids (cached per process)."""
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(
        stdlib_corpus(),
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
    )
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"BPE training produced {tok.get_vocab_size()} ids, wanted {vocab_size}")
    return str(tok.to_str())


def _write_json(out_dir: str, name: str, data: dict) -> None:
    with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


# the model `serve`, `generate` and `demo` use without --model: the demo size, trained on first
# use (models/train.py `ensure_trained_model`)
DEFAULT_MODEL_DIR = os.path.join("models", "demo-llama")


def ensure_model(path: str | None = None, arch: str = "llama", size: str = "tiny",
                 seed: int = 0) -> str:
    """``path`` (default models/<size>-<arch>), made with `make_model` on first use: no model
    can be downloaded here, so the CLI, the server and the benchmarks make their own."""
    path = path or os.path.join("models", f"{size}-{arch}")
    if not os.path.exists(os.path.join(path, "config.json")):
        with Progress(f"making a random {size} {arch} model in {path}"):
            make_model(arch, size, path, seed=seed)
    return path
