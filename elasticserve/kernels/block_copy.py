"""Moving KV blocks: between the device cache and host swap space, and within the cache.

Host areas (swap space) are pinned when the cache is on a GPU, so their copies are true
asynchronous DMA on the current stream (`non_blocking=True`): stream order keeps a swap-out
before any later kernel that reuses the block, and a swap-in before the forward pass that reads
it, without a host sync. From pageable memory (the CPU case) the same calls are plain copies.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["copy_rows", "host_empty", "index_tensors", "pin_for", "runs"]


def pin_for(device: torch.device | str) -> bool:
    """Whether host buffers that talk to `device` should be pinned (only for a GPU: pinning
    needs a CUDA build and costs page-locked memory for nothing on the CPU)."""
    return torch.device(device).type == "cuda"


def host_empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device | str
               ) -> torch.Tensor:
    """An uninitialised host tensor for traffic with `device`: pinned for a GPU (untouched
    pages otherwise stay unallocated until written)."""
    return torch.empty(tuple(shape), dtype=dtype, pin_memory=pin_for(device))


def runs(pairs: Sequence[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(src, dst, length) runs of consecutive pairs: a swap of a sequence's blocks is usually a
    few runs, each one copy instead of one copy per block."""
    out: list[tuple[int, int, int]] = []
    for src, dst in pairs:
        if out and out[-1][0] + out[-1][2] == src and out[-1][1] + out[-1][2] == dst:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + 1)
        else:
            out.append((src, dst, 1))
    return out


def copy_rows(dst: torch.Tensor, src: torch.Tensor, pairs: Sequence[tuple[int, int]]) -> None:
    """dst[d] = src[s] for every (s, d) in `pairs`, along dim 0, possibly across devices
    (device cache <-> host swap): one asynchronous `copy_` per run of consecutive rows."""
    for s, d, n in runs(pairs):
        dst[d:d + n].copy_(src[s:s + n], non_blocking=True)


def index_tensors(pairs: Sequence[tuple[int, int]], device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sources, destinations) as int64 index tensors on `device` (built on the host, one
    asynchronous copy each)."""
    a = torch.tensor([p[0] for p in pairs], dtype=torch.long)
    b = torch.tensor([p[1] for p in pairs], dtype=torch.long)
    return a.to(device, non_blocking=True), b.to(device, non_blocking=True)
