"""Torch decode attention: gather each chunk's context into a workspace, one SDPA per chunk.

The fallback when the C kernel (``kernels/native.py``) is off or cannot build, and the path for
non-fp32 caches. Single-token (decode) sequences are sorted by context length and attended in
chunks of similar length: padding stays small and each chunk's gathered K/V stays in cache
between the gather and the SDPA that reads it.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


def layer_rows(kv_cache: torch.Tensor, layer_idx: int, kv: int) -> torch.Tensor:
    """[num_blocks, block_size * Hkv * D] view of one layer's K or V (no copy)."""
    return kv_cache[:, layer_idx, kv].view(kv_cache.shape[0], -1)


# Context tokens gathered per decode SDPA call: a chunk's K and V (2 x 2048 tokens x 1 KiB per
# layer for the small model) stay in L2/L3 between the gather and the attention that reads it.
_DECODE_CHUNK_TOKENS = 2048
# Decode batches gathering fewer blocks per layer stay on one thread (a hand-off costs ~0.1 ms).
_SPLIT_MIN_BLOCKS = 256
_HELPER: ThreadPoolExecutor | None = None
_HELPER_LOCK = threading.Lock()


@dataclass(slots=True)
class DecodeChunk:
    """Single-token sequences of similar context length, attended in one SDPA call."""

    tokens: torch.Tensor  # [n] flat token index of each sequence's query (and output row)
    blocks: torch.Tensor  # [n * num_blocks] block ids, sequence-major, padded with block 0
    num_blocks: int  # blocks per sequence: the longest context in the chunk
    mask: torch.Tensor  # [n, 1, 1, num_blocks * block_size] bool: position < seq_len
    # Flat [n * num_blocks * block_size] positions past each context end; zeroed after the
    # gather because padding slots may hold NaN/inf that a mask alone cannot hide.
    invalid_rows: torch.Tensor


def decode_chunks(
    decode_idx: list[int], seq_lens: list[int], query_start_loc: list[int],
    block_tables: torch.Tensor, block_size: int,
) -> list[DecodeChunk]:
    """The decode sequences, longest first, in chunks of about _DECODE_CHUNK_TOKENS gathered
    context tokens, each padded only to its own longest context."""
    lens = [seq_lens[i] for i in decode_idx]
    width = -(-max(lens, default=1) // block_size) * block_size
    valid = torch.arange(width)[None, :] < torch.tensor(lens, dtype=torch.int64)[:, None]
    order = sorted(range(len(lens)), key=lambda r: -lens[r])
    chunks: list[DecodeChunk] = []
    while order:
        num_blocks = -(-lens[order[0]] // block_size)
        count = max(1, _DECODE_CHUNK_TOKENS // (num_blocks * block_size))
        rows, order = order[:count], order[count:]
        chunk_valid = valid[rows, : num_blocks * block_size]
        chunks.append(DecodeChunk(
            tokens=torch.tensor([query_start_loc[decode_idx[r]] for r in rows], dtype=torch.int64),
            blocks=block_tables[[decode_idx[r] for r in rows], :num_blocks].flatten(),
            num_blocks=num_blocks,
            mask=chunk_valid[:, None, None, :],
            invalid_rows=(~chunk_valid).flatten().nonzero().squeeze(1),
        ))
    return chunks


class _Workspace:
    """Reusable gather buffers, grown on demand and kept across calls.

    A fresh multi-MB tensor per layer costs more in page faults than the copy
    itself, so decode gathers write into these instead. Per thread: several engines
    (one per model, each stepping in its own thread) may run forwards at once.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self, slot: int, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        bufs = self._bufs()
        numel = math.prod(shape)
        key = (slot, like.dtype, like.device)
        buf = bufs.get(key)
        if buf is None or buf.numel() < numel:
            # a normal (not inference-mode) tensor, so callers in either mode may write it
            with torch.inference_mode(False):
                buf = torch.empty(numel, dtype=like.dtype, device=like.device)
            bufs[key] = buf
        return buf[:numel].view(shape)

    def _bufs(self) -> dict[tuple[int, torch.dtype, torch.device], torch.Tensor]:
        bufs = getattr(self._local, "bufs", None)
        if bufs is None:
            bufs = self._local.bufs = {}
        return bufs

    def clear(self) -> None:
        self._bufs().clear()


_WORKSPACE = _Workspace()


def release_workspace() -> None:
    """Free the cached decode gather buffers (e.g. after a large batch)."""
    _WORKSPACE.clear()


def decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, layer_idx: int,
                      chunks: list[DecodeChunk], scale: float, out: torch.Tensor) -> None:
    """One query per sequence; writes the sequences' rows of ``out``. With two or more torch
    threads and enough context, every other chunk runs on a helper thread: a chunk's gather
    and SDPA barely use a second OpenMP thread, two chunks side by side do (-30% per layer)."""
    blocks = sum(c.blocks.numel() for c in chunks)
    if len(chunks) < 2 or blocks < _SPLIT_MIN_BLOCKS or torch.get_num_threads() < 2:
        _attend_chunks(q, kv_cache, layer_idx, chunks, scale, out)
        return
    # chunks are sorted by context length with similar token counts: alternating splits evenly
    job = _helper().submit(_in_modes, torch.is_inference_mode_enabled(), torch.is_grad_enabled(),
                           q, kv_cache, layer_idx, chunks[1::2], scale, out)
    _attend_chunks(q, kv_cache, layer_idx, chunks[0::2], scale, out)
    job.result()


def _in_modes(inference: bool, grad: bool, *args: Any) -> None:
    """_attend_chunks on a helper thread, in the caller's (thread-local) autograd modes."""
    with torch.inference_mode(inference), torch.set_grad_enabled(grad):
        _attend_chunks(*args)


def _helper() -> ThreadPoolExecutor:
    global _HELPER
    with _HELPER_LOCK:
        if _HELPER is None:
            _HELPER = ThreadPoolExecutor(max_workers=2, thread_name_prefix="decode-attention")
        return _HELPER


def _attend_chunks(q: torch.Tensor, kv_cache: torch.Tensor, layer_idx: int,
                   chunks: list[DecodeChunk], scale: float, out: torch.Tensor) -> None:
    """Each chunk: gather its context into this thread's workspace, one batched SDPA."""
    _, _, _, bs, hkv, d = kv_cache.shape
    hq = q.shape[1]
    rows = [layer_rows(kv_cache, layer_idx, kv) for kv in (0, 1)]
    most = max(c.blocks.numel() for c in chunks)
    bufs = [_WORKSPACE.get(kv, (most, rows[kv].shape[1]), kv_cache) for kv in (0, 1)]
    for chunk in chunks:
        num_seqs, width = chunk.tokens.numel(), chunk.num_blocks * bs
        ctx = []
        for kv in (0, 1):
            buf = bufs[kv][: chunk.blocks.numel()]
            torch.index_select(rows[kv], 0, chunk.blocks, out=buf)
            buf.view(-1, hkv * d).index_fill_(0, chunk.invalid_rows, 0.0)
            ctx.append(buf.view(num_seqs, width, hkv, d).transpose(1, 2).to(q.dtype))
        attn = F.scaled_dot_product_attention(
            q.index_select(0, chunk.tokens).view(num_seqs, hq, 1, d), ctx[0], ctx[1],
            attn_mask=chunk.mask, scale=scale, enable_gqa=hq != hkv)
        out.index_copy_(0, chunk.tokens, attn.view(num_seqs, hq, d))
