"""The C decode kernel's one-pass path against a float64 reference: chunk and block edges,
GQA groups, head sizes that are and are not multiples of 16, the online softmax's rescaling,
and the split of sequences between calls (first, step)."""

from __future__ import annotations

import random

import pytest
import torch

from elasticserve.kernels import native

needs_kernel = pytest.mark.skipif(not native.available(), reason="no C compiler for the kernel")
LAYERS = 2


def _case(lens: list[int], hq: int, hkv: int, d: int, bs: int, seed: int,
          q_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, native.NativeDecode]:
    """A NaN-filled cache with only each sequence's context written (any read past a context,
    or of another layer, poisons the output), shuffled block ids, tables padded past the end."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    need = [-(-n // bs) for n in lens]
    ids = list(range(sum(need) + 3))
    rng.shuffle(ids)
    cache = torch.full((len(ids), LAYERS, 2, bs, hkv, d), float("nan"))
    width = max(need) + 2
    tables = torch.zeros(len(lens), width, dtype=torch.int64)
    for s, n in enumerate(lens):
        for b in range(need[s]):
            block = ids.pop()
            tables[s, b] = block
            used = min(bs, n - b * bs)
            cache[block, :, :, :used] = torch.randn(LAYERS, 2, used, hkv, d, generator=gen)
    q = torch.randn(len(lens), hq, d, generator=gen) * q_scale
    return cache, q, native.NativeDecode.build(list(range(len(lens))), lens, tables)


def _reference(cache: torch.Tensor, q: torch.Tensor, work: native.NativeDecode, layer: int,
               scale: float) -> torch.Tensor:
    """Softmax attention in float64 over each sequence's gathered context."""
    bs, hkv, d = cache.shape[3:]
    group = q.shape[1] // hkv
    out = torch.zeros(q.shape, dtype=torch.float64)
    for tok, n, table in zip(work.tokens.tolist(), work.seq_lens.tolist(), work.tables, strict=True):
        blocks = cache[table[: -(-n // bs)], layer].double()  # [nb, 2, bs, hkv, d]
        k = blocks[:, 0].reshape(-1, hkv, d)[:n].repeat_interleave(group, dim=1)
        v = blocks[:, 1].reshape(-1, hkv, d)[:n].repeat_interleave(group, dim=1)
        p = torch.softmax(torch.einsum("hd,thd->ht", q[tok].double(), k) * scale, dim=-1)
        out[tok] = torch.einsum("ht,thd->hd", p, v)
    return out


def _run(cache: torch.Tensor, q: torch.Tensor, work: native.NativeDecode, layer: int,
         scale: float) -> torch.Tensor:
    out = torch.full_like(q, float("nan"))
    native.decode(q, cache, layer, work, scale, out)
    return out


@needs_kernel
@pytest.mark.parametrize("bs", [8, 16, 32])
def test_lengths_at_chunk_and_block_edges(bs: int) -> None:
    """Contexts of 1, 15, 16, 17 tokens and past two blocks: partial chunks, partial last
    blocks, block size 32 (two 16-token chunks per block) and 8 (one partial chunk)."""
    lens = [1, 15, 16, 17, 31, 33, 2 * bs + 1, 100]
    cache, q, work = _case(lens, 8, 4, 64, bs, seed=bs)
    for layer in range(LAYERS):
        got = _run(cache, q, work, layer, 0.125)
        torch.testing.assert_close(got.double(), _reference(cache, q, work, layer, 0.125),
                                   atol=2e-5, rtol=1e-4)


@needs_kernel
@pytest.mark.parametrize(("hq", "hkv"), [(4, 4), (8, 4), (8, 2), (4, 1)])
@pytest.mark.parametrize("d", [16, 24, 64, 80, 128, 256, 272])
def test_gqa_groups_and_head_dims(hq: int, hkv: int, d: int) -> None:
    """GQA groups 1, 2, 4 and 8 against every head size path: multiples of 16 (registers sized
    at compile time), 24 and 80 (a masked last vector), and 272: past 256, the portable loops
    (the only path on CPUs without AVX-512)."""
    cache, q, work = _case([1, 17, 40, 70], hq, hkv, d, 16, seed=hq * 1000 + d)
    scale = d**-0.5
    got = _run(cache, q, work, 1, scale)
    torch.testing.assert_close(got.double(), _reference(cache, q, work, 1, scale),
                               atol=2e-5, rtol=1e-4)


@needs_kernel
def test_rising_and_large_scores_rescale_the_running_sums() -> None:
    """Scores that climb along the context (each chunk a new max, many rescales) and scores in
    the hundreds (any overflow of the unnormalised sums shows as inf or NaN)."""
    lens = [300, 129, 47]
    cache, q, work = _case(lens, 8, 4, 64, 16, seed=7, q_scale=30.0)
    row = work.tokens.tolist().index(0)  # sequence 0 (300 tokens): its keys turn toward q
    direction = q[0, ::2] / q[0, ::2].norm(dim=-1, keepdim=True)  # [hkv, d], one q head a group
    for t in range(300):
        block, off = int(work.tables[row, t // 16]), t % 16
        cache[block, 0, 0, off] += direction * (t / 10)
    for layer in range(LAYERS):
        got = _run(cache, q, work, layer, 0.125)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), _reference(cache, q, work, layer, 0.125),
                                   atol=1e-4, rtol=1e-4)


@needs_kernel
def test_split_calls_cover_their_sequences_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Split over 3 parts (first, step), each touches its own sequences' rows: together equal to
    one part; lengths of 0 are skipped and leave their row alone."""
    monkeypatch.setattr(native, "_SPLIT_MIN_TOKENS", 1)
    lens = [5, 300, 0, 17, 64, 1, 250]
    cache, q, work = _case([max(n, 1) for n in lens], 8, 4, 64, 16, seed=11)
    work.seq_lens = torch.tensor([lens[t] for t in work.tokens.tolist()], dtype=torch.int64)
    one = _run(cache, q, work, 0, 0.125)
    work.threads = 3
    three = _run(cache, q, work, 0, 0.125)
    torch.testing.assert_close(three, one, atol=0, rtol=0, equal_nan=True)
    assert torch.isnan(one[2]).all() and torch.isfinite(one[[0, 1, 3, 4, 5, 6]]).all()
