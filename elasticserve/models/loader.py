"""Load a Hugging Face safetensors checkpoint from a local directory."""

from __future__ import annotations

import glob
import json
import logging
import os
import time
from typing import Any

import torch
from safetensors import safe_open

from elasticserve.models.hf_config import ModelConfig, load_config
from elasticserve.models.llama import CausalLM, TensorSlot
from elasticserve.models.registry import model_class

INDEX_FILE = "model.safetensors.index.json"
log = logging.getLogger(__name__)


def default_dtype(config: ModelConfig, device: torch.device) -> torch.dtype:
    """fp32 on CPU (bf16/fp16 matmuls are slow or lossy there); checkpoint dtype elsewhere."""
    return torch.float32 if device.type == "cpu" else config.dtype


def load_model(
    model_dir: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> CausalLM:
    """Build the model named by ``config.json`` and fill it from ``*.safetensors``.

    Every checkpoint problem (missing directory/config/weights, missing, unexpected or
    misshapen tensor) raises one ValueError naming the file and the tensor or field.
    When embeddings are tied an ``lm_head.weight`` in the checkpoint is ignored, as
    are legacy ``rotary_emb.inv_freq`` buffers.
    """
    start = time.monotonic()
    model = build_model(model_dir, dtype, device)
    _load_weights(model, model_dir)
    # a server logs at INFO: start-up and every wake (which reloads) say what loading cost
    log.info("loaded %s (%.1fM parameters) in %.2f s", model_dir,
             sum(p.numel() for p in model.parameters()) / 1e6, time.monotonic() - start)
    return model


def build_model(model_dir: str, dtype: torch.dtype | None = None,
                device: str | torch.device = "cpu") -> CausalLM:
    """The model named by ``config.json`` with its parameters allocated but not filled.

    On ``device="meta"`` nothing is allocated: for a caller that points every parameter at
    weights that already exist (memory/shared_weights.py's ``adopt_weights``); pass ``dtype``
    then, as the meta device's default would be the checkpoint's."""
    if not os.path.isdir(model_dir):
        raise ValueError(f"{model_dir}: model directory not found")
    config = load_config(model_dir)
    dev = torch.device(device)
    cls = model_class(config, os.path.join(model_dir, "config.json"))
    # Parameters are allocated uninitialized directly on the target device.
    with torch.device(dev):
        model = cls(config).to(dtype or default_dtype(config, dev))
    model.eval()
    model.requires_grad_(False)
    return model


def weight_files(model_dir: str) -> tuple[list[str], dict[str, str]]:
    """Shard paths and, if sharded, the index's tensor -> file map."""
    index_path = os.path.join(model_dir, INDEX_FILE)
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{index_path}: cannot read 'weight_map': {e}") from e
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index_path}: field 'weight_map' must be an object")
        located = {name: os.path.join(model_dir, str(fn)) for name, fn in weight_map.items()}
        files = sorted(set(located.values()))
        for path in files:
            if not os.path.isfile(path):
                raise ValueError(f"{index_path}: shard file {path} not found")
        return files, located
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise ValueError(f"{model_dir}: no *.safetensors weight files found")
    return files, {}


def _ignorable(name: str, config: ModelConfig) -> bool:
    return name.endswith("rotary_emb.inv_freq") or (
        config.tie_word_embeddings and name == "lm_head.weight"
    )


def _load_weights(model: CausalLM, model_dir: str) -> None:
    files, located = weight_files(model_dir)
    loader = _WeightLoader(model)
    for path in files:
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in f.keys():
                    loader.load(f, name, path)
        except ValueError:
            raise
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise ValueError(f"{path}: cannot read safetensors file: {e}") from e
    missing = sorted(set(loader.layout) - set(loader.seen))
    if missing:
        where = located.get(missing[0], files[0] if len(files) == 1 else model_dir)
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"{where}: missing tensor '{missing[0]}'{more}")


class _WeightLoader:
    """Copies checkpoint tensors into (possibly fused) parameters, validating each."""

    def __init__(self, model: CausalLM):
        self.config = model.config
        self.layout: dict[str, TensorSlot] = model.checkpoint_layout()
        self.params = dict(model.named_parameters())
        self.seen: dict[str, str] = {}

    def load(self, f: Any, name: str, path: str) -> None:
        slot = self.layout.get(name)
        if slot is None:
            if _ignorable(name, self.config):
                return
            raise ValueError(f"{path}: unexpected tensor '{name}'")
        if name in self.seen:
            raise ValueError(f"{path}: tensor '{name}' also present in {self.seen[name]}")
        param = self.params[slot.param]
        expected = (slot.stop - slot.start, *param.shape[1:])
        shape = tuple(f.get_slice(name).get_shape())
        if shape != expected:
            raise ValueError(
                f"{path}: tensor '{name}' has shape {list(shape)}, expected {list(expected)}"
            )
        with torch.no_grad():
            param[slot.start : slot.stop].copy_(f.get_tensor(name))
        self.seen[name] = path
