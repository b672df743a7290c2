"""Where an engine's weights come from: the checkpoint on disk, or a copy shared between
processes (procs/weights.py). `LLMEngine` loads through a `WeightsSource` at start and on every
wake, and tells it when a sleep has dropped the model."""

from __future__ import annotations

from typing import Protocol

import torch

from elasticserve.config import EngineConfig
from elasticserve.kernels.mkldnn_linear import use_mkldnn
from elasticserve.models.hf_config import load_config
from elasticserve.models.llama import CausalLM
from elasticserve.models.loader import build_model, default_dtype, load_model


class WeightsSource(Protocol):
    """Gives an engine its model, ready to run."""

    def load(self, config: EngineConfig) -> CausalLM:
        """The model of `config.model`, weights filled (raises on a bad checkpoint)."""
        ...

    def release(self) -> None:
        """The engine dropped the model `load` returned (sleep, or a wake undone)."""
        ...


def model_dtype(config: EngineConfig) -> torch.dtype | None:
    """The dtype `config.model.dtype` names; None for "auto" (the loader chooses)."""
    name = config.model.dtype
    return None if name == "auto" else getattr(torch, name)


def pack_linears(model: CausalLM, config: EngineConfig) -> bool:
    """Prepack the linear weights for oneDNN where `config.model.linear_backend` resolves to
    it (kernels/mkldnn_linear.py). Done here, by every load (start and wake), and before a
    shared copy is written (procs/weights.py writes what `DiskWeights.load` returns), so the
    replicas map the packed bytes too. Returns whether it packed."""
    weight = model.model.embed_tokens.weight
    if not use_mkldnn(config.model.linear_backend, weight.dtype, weight.device):
        return False
    model.pack_linears()
    return True


class DiskWeights:
    """Each engine reads its own copy of the checkpoint (safetensors) into private memory."""

    def load(self, config: EngineConfig) -> CausalLM:
        # "auto" lets the loader choose (fp32 on CPU, the checkpoint's on a GPU); the KV cache
        # then takes the weights' dtype. Parameters are allocated on the device and filled there.
        model = load_model(config.model.path, dtype=model_dtype(config),
                           device=config.device.device)
        pack_linears(model, config)  # oneDNN's prepacked layout where it applies (fp32 CPU)
        return model

    def release(self) -> None:
        """Nothing to do: the engine's model held the only copy."""

    @staticmethod
    def skeleton(config: EngineConfig) -> CausalLM:
        """The model with no weights at all (meta tensors), in the dtype `load` would give:
        for a caller that adopts weights which already exist."""
        dtype = model_dtype(config)
        if dtype is None:
            dtype = default_dtype(load_config(config.model.path),
                                  torch.device(config.device.device))
        return build_model(config.model.path, dtype=dtype, device="meta")

