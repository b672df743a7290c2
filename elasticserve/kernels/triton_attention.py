"""Triton paged attention over the block-major KV cache (decode and prefill, GQA).

Layout: ``kv[num_blocks, layers, 2, block_size, kv_heads, head_dim]`` addressed through its
strides, so one layer's consecutive blocks are ``stride(0)`` elements apart (the block stride
is a parameter, as the layout needs). One program attends ``BLOCK_Q`` query tokens of one
sequence for every query head of one KV head: the ``G`` heads sharing a KV head are rows of the
same tile, so each K/V tile is loaded once per group (vLLM's unified-attention layout). Keys
are walked ``BLOCK_N`` tokens at a time, each token's block looked up in the block table, with
an online softmax in fp32.

Two launches of the same kernel per layer: decode sequences (one query token, ``BLOCK_Q``
small so a tile is ~16 rows) and prefill chunks (several tokens over an optional cached
prefix: causal inside the chunk, full over the prefix). Slots past a context's end are never
read (masked loads), so unwritten blocks may hold anything, NaN included.

Without a CUDA device the kernel runs in Triton's interpreter on CPU tensors (correct, slow):
``TRITON_INTERPRET=1`` is set before triton is imported when torch sees no GPU, because the
``@triton.jit`` decorator reads it when a function is defined. If something imported triton
earlier without it, importing this module raises ImportError (the engine reports it as a bad
``attention_backend``): set ``TRITON_INTERPRET=1`` in the environment instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402 - after TRITON_INTERPRET is settled
import triton.language as tl  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

if not torch.cuda.is_available() and isinstance(tl.zeros, JITFunction):
    # triton was imported before TRITON_INTERPRET was set: its own library is compiled-only,
    # and nothing here could run it
    raise ImportError("no GPU and triton was imported in compiled mode: set TRITON_INTERPRET=1 "
                      "in the environment before starting to run Triton kernels on the CPU")

__all__ = ["TritonWork", "attend", "interpreted"]

# Query rows per tile: tl.dot needs >= 16 on a GPU; prefill tiles take more query tokens.
_DECODE_ROWS = 16
_PREFILL_ROWS = 64
_BLOCK_N = 32  # key tokens per inner step (may span several KV blocks)


def interpreted() -> bool:
    """True when kernels run in Triton's CPU interpreter (no GPU, or TRITON_INTERPRET=1)."""
    return bool(triton.knobs.runtime.interpret)


@dataclass(slots=True)
class TritonWork:
    """One step's sequences, split into the decode and prefill launches (int32 index tensors)."""

    query_start: torch.Tensor  # [B + 1] flat index of each sequence's first new token
    seq_lens: torch.Tensor  # [B] context length after this step
    block_tables: torch.Tensor  # [B, max_blocks]
    decode_seqs: torch.Tensor  # [Bd] batch indices with one new token
    prefill_seqs: torch.Tensor  # [Bp] batch indices with several new tokens
    max_prefill: int  # most new tokens of a prefill sequence (sizes the grid)

    @classmethod
    def build(cls, query_start: list[int], seq_lens: list[int],
              block_tables: torch.Tensor) -> TritonWork:
        """Index tensors for a batch laid out as ``AttentionMetadata`` describes it."""
        nums = [query_start[i + 1] - query_start[i] for i in range(len(seq_lens))]
        i32 = torch.int32
        return cls(torch.tensor(query_start, dtype=i32), torch.tensor(seq_lens, dtype=i32),
                   block_tables.to(i32).contiguous(),
                   torch.tensor([i for i, n in enumerate(nums) if n == 1], dtype=i32),
                   torch.tensor([i for i, n in enumerate(nums) if n > 1], dtype=i32),
                   max([n for n in nums if n > 1], default=0))


@triton.jit
def _key_tile(q, m_i, l_i, acc, base, table, start, kv_end, q_pos, d, d_ok,
              stride_block, stride_kv, stride_slot, block_size, scale,
              BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    """One online-softmax step over key positions start .. start + BLOCK_N."""
    pos = start + tl.arange(0, BLOCK_N)
    pos_ok = pos < kv_end
    blk = tl.load(table + pos // block_size, mask=pos_ok, other=0)
    slot = blk.to(tl.int64) * stride_block + (pos % block_size) * stride_slot
    k = tl.load(base + slot[None, :] + d[:, None], mask=pos_ok[None, :] & d_ok[:, None],
                other=0.0).to(q.dtype)
    v = tl.load(base + stride_kv + slot[:, None] + d[None, :], mask=pos_ok[:, None] & d_ok[None, :],
                other=0.0).to(q.dtype)
    if IEEE:  # fp32 models: no TF32 rounding, so fp32 parity holds on a GPU
        s = tl.dot(q, k, input_precision="ieee")
    else:
        s = tl.dot(q, k)
    s = tl.where((pos[None, :] <= q_pos[:, None]) & pos_ok[None, :], s * scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp(s - m_new[:, None])
    alpha = tl.exp(m_i - m_new)
    if IEEE:
        pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    return m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None] + pv


@triton.jit
def _paged_attention_kernel(
    q_ptr, out_ptr, kv_ptr, seq_ids_ptr, query_start_ptr, seq_lens_ptr, tables_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_block, stride_layer, stride_kv, stride_slot, stride_head, stride_table,
    layer, block_size, head_dim, scale,
    G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    seq = tl.load(seq_ids_ptr + tl.program_id(0))
    kvh = tl.program_id(1)
    q_block = tl.program_id(2)
    tok0 = tl.load(query_start_ptr + seq)
    n_new = tl.load(query_start_ptr + seq + 1) - tok0
    if q_block * BLOCK_Q < n_new:
        seq_len = tl.load(seq_lens_ptr + seq)
        rows = tl.arange(0, BLOCK_Q * G_PAD)
        q_idx = q_block * BLOCK_Q + rows // G_PAD  # new-token index within the sequence
        head = kvh * G + rows % G_PAD
        row_ok = (q_idx < n_new) & (rows % G_PAD < G)
        q_pos = seq_len - n_new + q_idx  # absolute position: causal limit of the row
        d = tl.arange(0, BLOCK_D)
        d_ok = d < head_dim
        q = tl.load(q_ptr + (tok0 + q_idx)[:, None] * stride_qt + head[:, None] * stride_qh
                    + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter's tl.dot is wrong on bf16 (numpy has none): fp32 there
            q = q.to(tl.float32)
        m_i = tl.full([BLOCK_Q * G_PAD], -1.0e30, tl.float32)
        l_i = tl.zeros([BLOCK_Q * G_PAD], tl.float32)
        acc = tl.zeros([BLOCK_Q * G_PAD, BLOCK_D], tl.float32)
        # keys beyond this tile's last query are masked for every row: stop there
        kv_end = tl.minimum(seq_len, seq_len - n_new + (q_block + 1) * BLOCK_Q)
        base = kv_ptr + layer * stride_layer + kvh * stride_head
        table = tables_ptr + seq * stride_table
        for start in range(0, kv_end, BLOCK_N):
            m_i, l_i, acc = _key_tile(q, m_i, l_i, acc, base, table, start, kv_end, q_pos, d, d_ok,
                                      stride_block, stride_kv, stride_slot, block_size, scale,
                                      BLOCK_N, IEEE)
        acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + (tok0 + q_idx)[:, None] * stride_ot + head[:, None] * stride_oh
                 + d[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])


def attend(q: torch.Tensor, kv_cache: torch.Tensor, layer_idx: int, work: TritonWork,
           scale: float, out: torch.Tensor) -> None:
    """Attend every sequence's new queries (``q``: [T, Hq, D]) over its cached context (the new
    tokens' K/V already written) and write ``out`` ([T, Hq, D]); both need unit head-dim stride."""
    _, _, _, block_size, hkv, d = kv_cache.shape
    hq = q.shape[1]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({hkv})")
    if q.stride(2) != 1:
        q = q.contiguous()
    if out.stride(2) != 1 or kv_cache.stride(5) != 1:
        raise ValueError("out and kv_cache need a unit stride along head_dim")
    g = hq // hkv
    g_pad = triton.next_power_of_2(g)
    common = (q, out, kv_cache)
    tail = (q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            *(kv_cache.stride(i) for i in range(5)), work.block_tables.stride(0),
            layer_idx, block_size, d, scale)
    upcast = interpreted() and q.dtype != torch.float32
    meta = dict(G=g, G_PAD=g_pad, BLOCK_N=_BLOCK_N, BLOCK_D=max(16, triton.next_power_of_2(d)),
                IEEE=q.dtype == torch.float32 or upcast, UPCAST=upcast)
    for seqs, rows, most in ((work.decode_seqs, _DECODE_ROWS, 1),
                             (work.prefill_seqs, _PREFILL_ROWS, work.max_prefill)):
        if seqs.numel() == 0:
            continue
        block_q = max(1, rows // g_pad)
        grid = (seqs.numel(), hkv, triton.cdiv(most, block_q))
        _paged_attention_kernel[grid](*common, seqs, work.query_start, work.seq_lens,
                                      work.block_tables, *tail, BLOCK_Q=block_q, **meta)
