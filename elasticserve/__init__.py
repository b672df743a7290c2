"""elasticserve: an LLM serving engine whose KV memory is elastic.

`LLM` and `SamplingParams` are imported lazily so that `elasticserve.core` (torch-free) can be
imported without pulling in torch.
"""

from typing import Any

from elasticserve.version import __version__

__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from elasticserve.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from elasticserve.sampling_params import SamplingParams

        return SamplingParams
    if name == "StructuredOutputsParams":
        from elasticserve.sampling_params import StructuredOutputsParams

        return StructuredOutputsParams
    if name == "RequestOutput":
        from elasticserve.outputs import RequestOutput

        return RequestOutput
    raise AttributeError(f"module 'elasticserve' has no attribute {name!r}")
