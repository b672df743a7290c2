"""Maps ``architectures[0]`` from config.json to the model class that implements it."""

from __future__ import annotations

from elasticserve.models.hf_config import ModelConfig
from elasticserve.models.llama import CausalLM

# All four share one decoder; the per-architecture differences (q/k/v bias,
# q/k norm, sliding window) are already resolved into ModelConfig flags.
MODEL_REGISTRY: dict[str, type[CausalLM]] = {
    "LlamaForCausalLM": CausalLM,
    "MistralForCausalLM": CausalLM,
    "Qwen2ForCausalLM": CausalLM,
    "Qwen3ForCausalLM": CausalLM,
}


def model_class(config: ModelConfig, config_path: str = "config.json") -> type[CausalLM]:
    """Return the class for ``config.architecture`` or raise a ValueError listing the options."""
    cls = MODEL_REGISTRY.get(config.architecture)
    if cls is None:
        raise ValueError(
            f"{config_path}: field 'architectures' names unsupported {config.architecture!r}; "
            f"supported: {', '.join(sorted(MODEL_REGISTRY))}"
        )
    return cls
