"""Linear layers through oneDNN with prepacked weights (what vLLM-CPU does for its linears).

`pack` reorders a weight [out, in] once into oneDNN's blocked layout for inner products (an
opaque `torch._mkldnn` tensor, same bytes as the plain weight, different order); `linear` then
runs `y = x W^T + b` from it with no per-call reorder. Why: torch's `F.linear` goes to MKL
sgemm, which is slow for decode-sized batches; with packed weights the decode step of the
`small` model went from 23.8 to 13.4 ms at batch 8 (docs/BENCHMARKS.md, `peer` commentary).
Not bit-identical to `F.linear` (a different summation order, |diff| ~1e-6 relative).
"""

from __future__ import annotations

import torch

BACKENDS = ("auto", "mkldnn", "torch")
# the batch size oneDNN picks the weight layout for; correct for any batch. 32 is what the
# measurement in BENCHMARKS.md used (decode batches of 1-32 all gained with it).
PACK_BATCH = 32


def available(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether packed linears apply: fp32 weights on the CPU, torch built with oneDNN."""
    return (device.type == "cpu" and dtype == torch.float32
            and bool(torch.backends.mkldnn.is_available()))


def use_mkldnn(backend: str, dtype: torch.dtype, device: torch.device) -> bool:
    """Resolve ``linear_backend``: "auto" packs where `available`, "torch" never packs,
    "mkldnn" packs or raises ValueError naming the field where it cannot."""
    if backend not in BACKENDS:
        raise ValueError(f"linear_backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    ok = available(dtype, device)
    if backend == "mkldnn" and not ok:
        raise ValueError(f"linear_backend='mkldnn' needs an fp32 CPU model and torch built with "
                         f"oneDNN (got {dtype} on {device.type}); use 'auto' or 'torch'")
    return backend != "torch" and ok


def pack(weight: torch.Tensor) -> torch.Tensor:
    """The oneDNN-packed copy of a plain fp32 weight [out, in] (an opaque mkldnn tensor)."""
    if weight.dim() != 2 or weight.dtype != torch.float32 or weight.device.type != "cpu":
        raise ValueError(f"weight: packing needs a 2-D fp32 CPU tensor, got {weight.dtype}"
                         f"{list(weight.shape)} on {weight.device.type}")
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), PACK_BATCH)


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] @ packed^T (+ bias) -> [..., out], a plain tensor."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
