"""EngineArgs -> EngineConfig: every bad value is a ValueError naming its field; good ones
land in the right section."""

from __future__ import annotations

import dataclasses
import mmap
from typing import Any

import pytest

from elasticserve.config import CacheConfig, DeviceConfig, EngineConfig, MemoryConfig, ModelLoadConfig
from elasticserve.engine.args import EngineArgs


def _config(**kwargs: Any) -> EngineConfig:
    return EngineArgs(model="m", **kwargs).create_engine_config(4096)


@pytest.mark.parametrize("kwargs, message", [
    ({"memory_backend": "tape"}, "memory_backend must be one of"),
    ({"page_size": 0}, "page_size must be a positive multiple of the OS page size"),
    ({"page_size": mmap.PAGESIZE + 1}, "page_size must be a positive multiple"),
    ({"kv_reserve_pages": -1}, "kv_reserve_pages must be >= 0"),
    ({"kv_shrink_after_s": -0.1}, "kv_shrink_after_s must be >= 0"),
    ({"kv_keep_peak_s": -1.0}, "kv_keep_peak_s must be >= 0"),
    ({"swap_min_tokens": -1}, "swap_min_tokens must be >= 0"),
    ({"kv_cache_min_bytes": -1}, "kv_cache_min_bytes must be >= 0"),
    ({"kv_cache_max_bytes": 0}, "kv_cache_max_bytes must be > 0"),
    ({"kv_cache_min_bytes": 8 << 20, "kv_cache_max_bytes": 4 << 20},
     "kv_cache_min_bytes must be <= kv_cache_max_bytes"),
    ({"kv_cache_mode": "lazy"}, "kv_cache_mode must be"),
    ({"num_kv_blocks": 0}, "num_kv_blocks must be > 0"),
    ({"kv_cache_bytes": -5}, "kv_cache_bytes must be > 0"),
    ({"swap_space": -1}, "swap_space must be >= 0"),
    ({"block_size": 12}, "block_size must be a positive power of two"),
    ({"preemption_mode": "pause"}, "preemption_mode must be"),
    ({"dtype": "int8"}, "dtype must name a torch dtype"),
    ({"dtype": "floaty"}, "dtype must name a torch dtype"),
    ({"attention_backend": "cuda"}, "attention_backend must be one of"),
    ({"num_threads": 0}, "num_threads must be >= 1"),
    ({"seed": 1.5}, "seed must be an integer"),
    ({"device": "tpu"}, "device must be one of"),
    ({"max_num_seqs": 0}, "max_num_seqs must be a positive integer"),
    ({"max_model_len": 8192}, "max_model_len=8192 exceeds the model's limit"),
    ({"layerwise_onload": "yes"}, "layerwise_onload must be a bool"),
])
def test_bad_value_names_its_field(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _config(**kwargs)


def test_every_argument_lands_in_its_section() -> None:
    cfg = _config(dtype="bfloat16", seed=3, num_threads=2, attention_backend="torch",
                  kv_reserve_pages=0, kv_shrink_after_s=1.5, kv_keep_peak_s=0.0,
                  swap_min_tokens=7, kv_cache_min_bytes=1 << 20, kv_cache_max_bytes=1 << 30,
                  memory_backend="host", page_size=64 * 1024, max_num_seqs=9)
    assert (cfg.model.path, cfg.model.dtype, cfg.model.seed) == ("m", "bfloat16", 3)
    assert (cfg.model.num_threads, cfg.model.attention_backend) == (2, "torch")
    assert (cfg.cache.kv_reserve_pages, cfg.cache.kv_shrink_after_s) == (0, 1.5)
    assert (cfg.cache.kv_keep_peak_s, cfg.cache.swap_min_tokens) == (0.0, 7)
    assert (cfg.cache.kv_cache_min_bytes, cfg.cache.kv_cache_max_bytes) == (1 << 20, 1 << 30)
    assert (cfg.memory.backend, cfg.memory.page_size) == ("host", 64 * 1024)
    assert cfg.scheduler.max_num_seqs == 9 and cfg.scheduler.max_model_len == 4096
    assert cfg.device.device == "cpu"
    assert _config().model.dtype == "auto"  # dtype=None means the loader's choice


def test_layerwise_onload_is_refused_on_cuda() -> None:
    assert _config(layerwise_onload=True).cache.layerwise_onload
    with pytest.raises(ValueError, match="layerwise_onload is CPU-only"):
        EngineConfig(ModelLoadConfig("m"), CacheConfig(layerwise_onload=True),
                     MemoryConfig("cuda"), device=DeviceConfig("cuda"))


def test_config_is_frozen() -> None:
    cfg = _config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.cache.kv_reserve_pages = 5  # type: ignore[misc]


@pytest.mark.parametrize("kwargs, blocks", [
    ({"num_kv_blocks": 20}, 20),
    ({"kv_cache_bytes": 10_000}, 10),
    ({"kv_cache_mode": "elastic", "kv_cache_bytes": 10_000, "kv_cache_max_bytes": 3_000}, 3),
    ({"kv_cache_mode": "static", "kv_cache_bytes": 10_000, "kv_cache_max_bytes": 3_000}, 10),
])
def test_kv_limit_bytes(kwargs: dict[str, Any], blocks: int) -> None:
    assert CacheConfig(**kwargs).kv_limit_bytes(1000) == blocks * 1000
