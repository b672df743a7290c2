"""Torch reference paged attention over a block-major KV cache (CPU-first).

KV cache layout (fixed by the engine so that one block of all layers is one
contiguous commit unit for elastic memory):

    kv_cache: [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]

Index 0 along the ``2`` axis is K, index 1 is V. ``kv_cache[:, layer, kv]`` is a
strided view whose blocks are gathered with ``index_select`` on its block axis.
Single-token (decode) sequences go to the C kernel (``native.py``: reads K/V straight from
the blocks) or to the torch path (``decode_torch.py``: gather, then batched SDPA); which one
is fixed per engine by ``attention_backend`` and recorded in the metadata. Multi-token
sequences (prefill chunks) loop in Python, one SDPA each.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, TypeVar

import torch
import torch.nn.functional as F

from elasticserve.kernels import native
from elasticserve.kernels.decode_torch import (
    DecodeChunk,
    decode_attention,
    decode_chunks,
    layer_rows,
    release_workspace,
)
from elasticserve.kernels.stage_attention import StagedDecode, attend_staged

if TYPE_CHECKING:  # triton is imported only when its backend is used (1 GB, ~2 s to import)
    from elasticserve.kernels.triton_attention import TritonWork

__all__ = ["AttentionMetadata", "PrefillSeq", "paged_attention", "release_workspace",
           "require_triton", "write_kv"]


@dataclass(slots=True)
class PrefillSeq:
    """Per-sequence work item for a sequence with more than one new token."""

    token_start: int
    token_end: int
    seq_len: int
    blocks: torch.Tensor  # [ceil(seq_len / block_size)] int64
    # [n_new, seq_len] bool (True = attend); None when the whole context is new,
    # which lets SDPA use its built-in causal path.
    mask: torch.Tensor | None


@dataclass(slots=True)
class AttentionMetadata:
    """Describes where a flattened batch of new tokens lives in the paged cache.

    Built once per engine step and shared by every layer, so all index and mask
    tensors that do not depend on the layer are precomputed here.
    """

    slot_mapping: torch.Tensor  # [T] int64: block_id * block_size + offset per new token
    query_start_loc: list[int]  # len B+1
    seq_lens: list[int]  # len B: context length after this step (cached + new)
    block_tables: torch.Tensor  # [B, max_blocks] int64, padded with 0
    block_size: int
    slot_blocks: torch.Tensor  # [T] slot_mapping // block_size
    slot_offsets: torch.Tensor  # [T] slot_mapping % block_size
    decode_only: bool  # every sequence has exactly one new token
    # Sequences with one new token are batched together even in mixed batches.
    decode_tokens: torch.Tensor  # [Bd] flat token index of each single-token sequence
    # The decode sequences for one backend: the torch path's chunks (longest contexts first),
    # or, when the native kernel attends them, native_decode (and no chunks).
    decode_chunks: list[DecodeChunk]
    prefills: list[PrefillSeq]
    native_decode: native.NativeDecode | None = None
    # attention_backend="triton": every sequence (decode and prefill) goes to the Triton kernel
    # (kernels/triton_attention.py), and decode_chunks and prefills stay empty
    triton_work: TritonWork | None = None
    # decode rows whose KV is in the host tier, attended over a one-layer stage
    # (kernels/stage_attention.py; set by worker/layer_stream.py, which also takes them out of
    # slot_mapping/slot_* and native_decode)
    staged: StagedDecode | None = None

    @classmethod
    def build(cls, seqs: list[tuple[int, int, list[int]]], block_size: int,
              device: torch.device | str | None = None,
              native_decode: bool = False, triton: bool = False) -> AttentionMetadata:
        """seqs: (start_pos, num_new_tokens, block_table) per sequence, in batch order.

        Index tensors are built on the CPU and moved to ``device`` (the KV cache's) if given.
        ``native_decode``: the decode sequences go to the C kernel (see ``kernels/native.py``);
        ``triton``: all sequences go to the Triton kernel (``kernels/triton_attention.py``).
        """
        if native_decode and triton:
            raise ValueError("attention_backend: native_decode and triton exclude each other")
        starts, nums, seq_lens = _validate(seqs, block_size)
        query_start_loc = list(itertools.accumulate(nums, initial=0))
        max_blocks = max(len(table) for _, _, table in seqs)
        block_tables = torch.tensor(
            [list(table) + [0] * (max_blocks - len(table)) for _, _, table in seqs], dtype=torch.int64)
        slot_mapping = _slot_mapping(starts, nums, query_start_loc, block_tables, block_size)
        decode_idx = [i for i, n in enumerate(nums) if n == 1]
        chunks: list[DecodeChunk] = []
        native_work = triton_work = None
        if triton:
            from elasticserve.kernels.triton_attention import TritonWork

            triton_work = TritonWork.build(query_start_loc, seq_lens, block_tables)
        elif native_decode and decode_idx:
            native_work = native.NativeDecode.build(
                [query_start_loc[i] for i in decode_idx], [seq_lens[i] for i in decode_idx],
                block_tables[decode_idx])
        elif not native_decode:
            chunks = decode_chunks(decode_idx, seq_lens, query_start_loc, block_tables, block_size)
        prefills = [_prefill_seq(query_start_loc[i], nums[i], seq_lens[i], block_tables[i], block_size)
                    for i, n in enumerate(nums) if n > 1 and not triton]
        meta = cls(
            slot_mapping=slot_mapping,
            query_start_loc=query_start_loc,
            seq_lens=seq_lens,
            block_tables=block_tables,
            block_size=block_size,
            slot_blocks=torch.div(slot_mapping, block_size, rounding_mode="floor"),
            slot_offsets=slot_mapping % block_size,
            decode_only=len(decode_idx) == len(seqs),
            decode_tokens=torch.tensor([query_start_loc[i] for i in decode_idx], dtype=torch.int64),
            decode_chunks=chunks,
            prefills=prefills,
            native_decode=native_work,
            triton_work=triton_work,
        )
        return meta if device is None else meta.to(device)

    def to(self, device: torch.device | str) -> AttentionMetadata:
        """Copy with every tensor on ``device``."""
        if self.native_decode is not None:
            raise ValueError("native decode attention runs on the CPU only")
        work = self.triton_work
        return replace(_moved(self, device), prefills=[_moved(p, device) for p in self.prefills],
                       decode_chunks=[_moved(c, device) for c in self.decode_chunks],
                       triton_work=None if work is None else _moved(work, device))


_T = TypeVar("_T", PrefillSeq, DecodeChunk, AttentionMetadata, "TritonWork")


def _moved(obj: _T, device: torch.device | str) -> _T:
    """``obj`` with each of its tensor fields on ``device`` (other fields shared)."""
    return replace(obj, **{f.name: getattr(obj, f.name).to(device, non_blocking=True)
                           for f in fields(obj)
                           if isinstance(getattr(obj, f.name), torch.Tensor)})


def _validate(seqs: list[tuple[int, int, list[int]]],
              block_size: int) -> tuple[list[int], list[int], list[int]]:
    if not seqs:
        raise ValueError("AttentionMetadata.build: empty batch")
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    starts, nums, seq_lens = [], [], []
    for i, (start, n, table) in enumerate(seqs):
        if start < 0 or n < 1:
            raise ValueError(f"seq {i}: need start_pos >= 0 and num_new_tokens >= 1, got {start}, {n}")
        if len(table) * block_size < start + n:
            raise ValueError(f"seq {i}: block table of {len(table)} blocks x {block_size} "
                             f"cannot hold {start + n} tokens")
        starts.append(start)
        nums.append(n)
        seq_lens.append(start + n)
    return starts, nums, seq_lens


def _slot_mapping(starts: list[int], nums: list[int], query_start_loc: list[int],
                  block_tables: torch.Tensor, block_size: int) -> torch.Tensor:
    counts = torch.tensor(nums, dtype=torch.int64)
    seq_of_token = torch.repeat_interleave(torch.arange(len(nums)), counts)
    offset_in_seq = torch.arange(query_start_loc[-1]) - torch.tensor(query_start_loc[:-1])[seq_of_token]
    pos = torch.tensor(starts, dtype=torch.int64)[seq_of_token] + offset_in_seq
    block_ids = block_tables[seq_of_token, torch.div(pos, block_size, rounding_mode="floor")]
    return block_ids * block_size + pos % block_size


def _prefill_seq(token_start: int, n: int, seq_len: int, table: torch.Tensor,
                 block_size: int) -> PrefillSeq:
    num_blocks = -(-seq_len // block_size)
    mask = None
    if seq_len > n:
        q_pos = torch.arange(seq_len - n, seq_len)[:, None]
        mask = torch.arange(seq_len)[None, :] <= q_pos
    return PrefillSeq(token_start, token_start + n, seq_len, table[:num_blocks].clone(), mask)


def require_triton() -> None:
    """Import the Triton backend now: a ValueError naming attention_backend if it cannot."""
    try:
        import elasticserve.kernels.triton_attention  # noqa: F401
    except ImportError as err:
        raise ValueError("attention_backend='triton' needs the triton package "
                         f"(pip install 'elasticserve[triton]'): {err}") from err


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, layer_idx: int,
             meta: AttentionMetadata) -> None:
    """Scatter the new tokens' K/V ([T, Hkv, D]) into their cache slots."""
    kv_cache[meta.slot_blocks, layer_idx, 0, meta.slot_offsets] = k.to(kv_cache.dtype)
    kv_cache[meta.slot_blocks, layer_idx, 1, meta.slot_offsets] = v.to(kv_cache.dtype)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                    layer_idx: int, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Write k/v to the cache, then attend each sequence's new queries over its context.

    q: [T, Hq, D]; k, v: [T, Hkv, D]. Returns [T, Hq, D] in q's dtype. Causality is by
    absolute position: new tokens of sequence i sit at seq_lens[i]-n_i .. seq_lens[i]-1.
    """
    staged = meta.staged
    if staged is None:
        write_kv(k, v, kv_cache, layer_idx, meta)
    else:
        rows = staged.resident_rows
        write_kv(k.index_select(0, rows), v.index_select(0, rows), kv_cache, layer_idx, meta)
    out = torch.empty_like(q)
    if meta.triton_work is not None:
        from elasticserve.kernels import triton_attention

        triton_attention.attend(q, kv_cache, layer_idx, meta.triton_work, scale, out)
        return out
    if meta.native_decode is not None:
        native.decode(q, kv_cache, layer_idx, meta.native_decode, scale, out)
    elif meta.decode_chunks:
        decode_attention(q, kv_cache, layer_idx, meta.decode_chunks, scale, out)
    if staged is not None:
        attend_staged(q, k, v, layer_idx, staged, scale, out)
        assert staged.stage is not None
        for p in staged.prefills:  # a streamed chunk: its context is the stage's layer
            _prefill(q, k, v, staged.stage, 0, p, scale, out)
    for p in meta.prefills:
        _prefill(q, k, v, kv_cache, layer_idx, p, scale, out)
    return out


def _prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
             layer_idx: int, p: PrefillSeq, scale: float, out: torch.Tensor) -> None:
    if p.mask is None:
        # Whole context is new: use the fresh k/v and skip the cache round trip.
        ctx_k, ctx_v = k[p.token_start : p.token_end], v[p.token_start : p.token_end]
    else:
        ctx_k, ctx_v = _gather_seq(kv_cache, layer_idx, p, q.dtype)
    out[p.token_start : p.token_end] = _sdpa(q[p.token_start : p.token_end], ctx_k, ctx_v, p.mask, scale)


def _gather_seq(kv_cache: torch.Tensor, layer_idx: int, p: PrefillSeq,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # Slicing to seq_len drops the unwritten tail of the last block.
    hkv, d = kv_cache.shape[-2:]
    ctx_k = layer_rows(kv_cache, layer_idx, 0).index_select(0, p.blocks)
    ctx_v = layer_rows(kv_cache, layer_idx, 1).index_select(0, p.blocks)
    ctx_k = ctx_k.view(-1, hkv, d)[: p.seq_len]
    ctx_v = ctx_v.view(-1, hkv, d)[: p.seq_len]
    return ctx_k.to(dtype), ctx_v.to(dtype)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
          scale: float) -> torch.Tensor:
    # 4-D inputs: CPU SDPA takes its flash kernel only for [B, H, L, D] (3-D falls back to math)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1)


