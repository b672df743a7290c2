"""Checkpoint loading: shards, dtypes, tied embeddings and every error path."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from elasticserve.kernels.attention import AttentionMetadata
from elasticserve.models.llama import kv_cache_shape
from elasticserve.models.loader import load_model
from elasticserve.models.make_model import make_model


def logits(model_dir: str, **kwargs: object) -> torch.Tensor:
    model = load_model(model_dir, **kwargs)  # type: ignore[arg-type]
    ids = torch.tensor([5, 80, 300, 41, 7, 9])
    cache = torch.zeros(kv_cache_shape(model.config, 4, 8), dtype=next(model.parameters()).dtype)
    meta = AttentionMetadata.build([(0, 6, [2])], 8)
    with torch.no_grad():
        return model.compute_logits(model(ids, torch.arange(6), cache, meta))


def copy_model(src: str, dst: os.PathLike) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def test_sharded_checkpoint_loads_identically(tmp_path, tiny_dirs: dict[str, str]) -> None:
    sharded = make_model("qwen2", "tiny", str(tmp_path / "sharded"), num_shards=3)
    files = sorted(f for f in os.listdir(sharded) if f.endswith(".safetensors"))
    assert len(files) == 3 and os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
    torch.testing.assert_close(logits(sharded), logits(tiny_dirs["qwen2"]), atol=0, rtol=0)


def test_tied_and_untied_embeddings(tiny_dirs: dict[str, str]) -> None:
    tied = load_model(tiny_dirs["qwen3"])
    assert tied.config.tie_word_embeddings and tied.lm_head is None
    untied = load_model(tiny_dirs["llama"])
    assert untied.lm_head is not None
    assert not torch.equal(untied.lm_head.weight, untied.model.embed_tokens.weight)


def test_bf16_checkpoint_computes_in_fp32_by_default(tmp_path) -> None:
    bf16 = make_model("llama", "tiny", str(tmp_path / "bf16"), dtype="bfloat16")
    model = load_model(bf16)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert load_model(bf16, dtype=torch.bfloat16).model.norm.weight.dtype == torch.bfloat16
    assert logits(bf16).dtype == torch.float32
    assert torch.isfinite(logits(bf16, dtype=torch.bfloat16)).all()


def test_missing_directory_config_and_weights(tmp_path, tiny_llama: str) -> None:
    with pytest.raises(ValueError, match="nowhere: model directory not found"):
        load_model(str(tmp_path / "nowhere"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"config\.json not found"):
        load_model(str(empty))
    no_weights = copy_model(tiny_llama, tmp_path / "no_weights")
    os.remove(os.path.join(no_weights, "model.safetensors"))
    with pytest.raises(ValueError, match=r"no \*\.safetensors weight files"):
        load_model(no_weights)


def rewrite_weights(model_dir: str, edit) -> str:  # type: ignore[no-untyped-def]
    path = os.path.join(model_dir, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)
    return path


def test_missing_unexpected_and_misshapen_tensors(tmp_path, tiny_llama: str) -> None:
    d = copy_model(tiny_llama, tmp_path / "missing")
    path = rewrite_weights(d, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(ValueError, match=f"{path}: missing tensor 'model.layers.1.self_attn.k_proj"):
        load_model(d)
    d = copy_model(tiny_llama, tmp_path / "extra")
    path = rewrite_weights(d, lambda t: t.update({"model.extra.weight": torch.zeros(3)}))
    with pytest.raises(ValueError, match=f"{path}: unexpected tensor 'model.extra.weight'"):
        load_model(d)
    d = copy_model(tiny_llama, tmp_path / "shape")
    path = rewrite_weights(d, lambda t: t.update({"model.norm.weight": torch.ones(7)}))
    with pytest.raises(ValueError, match=r"'model\.norm\.weight' has shape \[7\], expected \[128\]"):
        load_model(d)
    d = copy_model(tiny_llama, tmp_path / "legacy")
    rewrite_weights(d, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(16)}))
    load_model(d)  # legacy rotary buffers are ignored


def test_unsupported_architecture(tmp_path, tiny_llama: str) -> None:
    d = copy_model(tiny_llama, tmp_path / "gpt2")
    cfg_path = os.path.join(d, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["architectures"] = ["GPT2LMHeadModel"]
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match=f"{cfg_path}: field 'architectures'.*GPT2LMHeadModel"):
        load_model(d)


def test_sharded_index_errors(tmp_path) -> None:
    d = make_model("mistral", "tiny", str(tmp_path / "shards"), num_shards=2)
    index = os.path.join(d, "model.safetensors.index.json")
    shard = os.path.join(d, "model-00002-of-00002.safetensors")
    tensors = load_file(shard)
    victim = sorted(tensors)[0]
    del tensors[victim]
    save_file(tensors, shard)
    with pytest.raises(ValueError, match=f"{shard}: missing tensor '{victim}'"):
        load_model(d)
    os.remove(shard)
    with pytest.raises(ValueError, match=f"{index}: shard file {shard} not found"):
        load_model(d)
    with open(os.path.join(d, "model-00001-of-00002.safetensors"), "wb") as f:
        f.write(b"garbage")
    os.remove(index)
    with pytest.raises(ValueError, match="cannot read safetensors file"):
        load_model(d)
