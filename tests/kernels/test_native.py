"""The C decode kernel against the torch decode path, its thread split, and backend choice."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from elasticserve.kernels import native
from elasticserve.kernels.attention import AttentionMetadata, paged_attention

needs_kernel = pytest.mark.skipif(not native.available(), reason="no C compiler for the kernel")


@pytest.fixture()
def two_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _random_batch(num_seqs: int, lens: tuple[int, int], hkv: int, d: int, bs: int, layers: int,
                  seed: int) -> tuple[torch.Tensor, list[tuple[int, int, list[int]]]]:
    """A NaN-filled cache (any read past a context poisons the output), shuffled block ids, and
    decode specs plus one prefill over a cached prefix, so the batch is mixed."""
    rng = random.Random(seed)
    ctx = [rng.randint(*lens) for _ in range(num_seqs)]
    blocks = sum(-(-(n + 1) // bs) for n in ctx) + 8
    cache = torch.full((blocks, layers, 2, bs, hkv, d), float("nan"))
    free = list(range(blocks))
    rng.shuffle(free)
    specs = []
    for i, n in enumerate(ctx):
        table = [free.pop() for _ in range(-(-(n + 1) // bs))]
        for b, block in enumerate(table):  # written context only: the tail stays NaN
            used = min(bs, n + 1 - b * bs)
            cache[block, :, :, :used] = torch.randn(layers, 2, used, hkv, d)
        new = 1 if i % 7 else 3  # every 7th sequence is a 3-token chunk over a cached prefix
        specs.append((n + 1 - new, new, table + [0] * rng.randint(0, 2)))
    return cache, specs


@needs_kernel
# head_dim 24 takes the portable loops; multiples of 16 take the AVX-512 ones where compiled in
@pytest.mark.parametrize(("hq", "hkv", "d", "bs"),
                         [(8, 4, 64, 16), (6, 1, 32, 4), (4, 4, 16, 8), (4, 2, 24, 4)])
def test_native_matches_torch_path_with_thread_split(two_threads: None, hq: int, hkv: int, d: int,
                                                     bs: int) -> None:
    """64 sequences, contexts 20-700: enough context that both the native kernel and the torch
    decode path split their work across a helper thread (>= 2 torch threads)."""
    torch.manual_seed(0)
    layers = 2
    cache, specs = _random_batch(64, (20, 700), hkv, d, bs, layers, seed=hq + d)
    total = sum(n for _, n, _ in specs)
    by_torch = AttentionMetadata.build(specs, bs)
    by_native = AttentionMetadata.build(specs, bs, native_decode=True)
    assert by_native.native_decode is not None and not by_native.decode_chunks
    assert by_native.native_decode.total_tokens >= native._SPLIT_MIN_TOKENS
    for layer in range(layers):
        q = torch.randn(total, hq, d)
        k, v = torch.randn(total, hkv, d), torch.randn(total, hkv, d)
        # each call writes the new tokens' K/V first; both write the same values to the same slots
        expect = paged_attention(q, k, v, cache, layer, by_torch, scale=d**-0.5)
        got = paged_attention(q, k, v, cache, layer, by_native, scale=d**-0.5)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, expect, atol=2e-5, rtol=1e-4)


@needs_kernel
def test_native_handles_strided_queries() -> None:
    """q as the model produces it: a view into a fused qkv projection, not contiguous."""
    torch.manual_seed(1)
    cache, specs = _random_batch(5, (3, 40), 2, 16, 4, 1, seed=3)
    total = sum(n for _, n, _ in specs)
    qkv = torch.randn(total, (4 + 2 + 2) * 16)
    q = qkv[:, :64].view(total, 4, 16)
    k, v = qkv[:, 64:96].view(total, 2, 16), qkv[:, 96:].view(total, 2, 16)
    assert not q.is_contiguous()
    expect = paged_attention(q, k, v, cache, 0, AttentionMetadata.build(specs, 4), 0.25)
    got = paged_attention(q, k, v, cache, 0, AttentionMetadata.build(specs, 4, native_decode=True),
                          0.25)
    torch.testing.assert_close(got, expect, atol=2e-5, rtol=1e-4)


def test_backend_choice() -> None:
    cache = torch.zeros(2, 1, 2, 4, 1, 8)
    assert native.use_native("torch", cache, torch.float32) is False
    with pytest.raises(ValueError, match="attention_backend"):
        native.use_native("flash", cache, torch.float32)
    with pytest.raises(ValueError, match="fp32"):
        native.use_native("native", cache.bfloat16(), torch.bfloat16)
    assert native.use_native("auto", cache.bfloat16(), torch.bfloat16) is False
    assert native.use_native("auto", cache, torch.float32) is native.available()


def test_missing_compiler_falls_back(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_load_error", None)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    cache = torch.zeros(2, 1, 2, 4, 1, 8)
    assert native.use_native("auto", cache, torch.float32) is False
    with pytest.raises(native.NativeUnavailableError, match="no C compiler"):
        native.use_native("native", cache, torch.float32)


@needs_kernel
def test_work_threads_split_a_call_on_one_torch_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """A decode step runs on 1 torch thread; `NativeDecode.threads` still splits the attention
    call (over a context past the split size), with the same output as one part."""
    torch.manual_seed(2)
    cache, specs = _random_batch(32, (100, 400), 4, 64, 16, 1, seed=5)
    total = sum(n for _, n, _ in specs)
    meta = AttentionMetadata.build(specs, 16, native_decode=True)
    assert meta.native_decode is not None
    assert meta.native_decode.total_tokens >= native._SPLIT_MIN_TOKENS
    q, k, v = torch.randn(total, 8, 64), torch.randn(total, 4, 64), torch.randn(total, 4, 64)
    parts: list[int] = []
    split = native.run_split
    monkeypatch.setattr(native, "run_split", lambda fn, n: (parts.append(n), split(fn, n))[1])
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = paged_attention(q, k, v, cache, 0, meta, scale=0.125)
        meta.native_decode.threads = 2
        two = paged_attention(q, k, v, cache, 0, meta, scale=0.125)
    finally:
        torch.set_num_threads(before)
    assert parts == [1, 2]
    torch.testing.assert_close(two, one, atol=1e-6, rtol=1e-6)
