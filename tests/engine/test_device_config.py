"""`device` and `cuda_graphs` in EngineArgs -> EngineConfig: what "auto" resolves to per device,
and the clear errors (no GPU, a memory backend the device cannot read)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from elasticserve.config import EngineConfig
from elasticserve.engine.args import EngineArgs


def _config(**kwargs: Any) -> EngineConfig:
    return EngineArgs(model="m", **kwargs).create_engine_config(4096)


def test_cuda_without_a_gpu_is_one_error_naming_device(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device='cuda' but torch sees no CUDA device"):
        _config(device="cuda")


def test_auto_resolves_per_device(monkeypatch: pytest.MonkeyPatch):
    cpu = _config()
    assert (cpu.device.device, cpu.memory.backend, cpu.model.attention_backend) == \
        ("cpu", "host", "auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the config only asks
    gpu = _config(device="cuda", cuda_graphs=True)
    assert (gpu.device.device, gpu.device.cuda_graphs) == ("cuda", True)
    # the KV over CUDA VMM and the Triton kernel on a GPU unless told otherwise
    assert (gpu.memory.backend, gpu.model.attention_backend) == ("cuda", "triton")
    assert _config(device="cuda", attention_backend="torch").model.attention_backend == "torch"
    # graphs need static launch shapes: Triton on the CPU too
    assert _config(cuda_graphs=True).model.attention_backend == "triton"


@pytest.mark.parametrize("kwargs, message", [
    ({"device": "cpu", "memory_backend": "cuda"}, "memory_backend 'cuda' cannot serve device='cpu'"),
    ({"device": "cuda", "memory_backend": "host"}, "memory_backend 'host' cannot serve"),
    ({"cuda_graphs": True, "attention_backend": "native"}, "cuda_graphs needs attention_backend"),
    ({"cuda_graphs": 1}, "cuda_graphs must be a bool"),
    ({"device": "gpu"}, "device must be one of"),
])
def test_bad_device_settings_name_their_field(monkeypatch: pytest.MonkeyPatch,
                                              kwargs: dict[str, Any], message: str):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError, match=message):
        _config(**kwargs)
