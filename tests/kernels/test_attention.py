"""Paged attention vs a dense float64 causal reference."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
import torch

from elasticserve.kernels import native
from elasticserve.kernels.attention import AttentionMetadata, paged_attention


@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Iterator[None]:
    # Small ops: OpenMP hand-off on a shared 2-core box costs more than the work.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Sim:
    """Tracks full K/V history per sequence and issues steps through the paged kernel."""

    def __init__(self, hq: int, hkv: int, d: int, bs: int, layers: int = 2, blocks: int = 64,
                 native: bool = False):
        self.hq, self.hkv, self.d, self.bs, self.layers = hq, hkv, d, bs, layers
        self.native = native  # decode sequences through the C kernel (kernels/native.py)
        # NaN-filled cache: any read of an unwritten/padded slot would poison the output.
        self.cache = torch.full((blocks, layers, 2, bs, hkv, d), float("nan"))
        self.free = list(range(blocks))  # block 0 is a real block too
        random.Random(0).shuffle(self.free)
        self.tables: list[list[int]] = []
        self.hist: list[list[tuple[torch.Tensor, torch.Tensor]]] = []  # per seq, per layer

    def add_seq(self) -> int:
        self.tables.append([])
        empty = torch.empty(0, self.hkv, self.d)
        self.hist.append([(empty, empty) for _ in range(self.layers)])
        return len(self.tables) - 1

    def length(self, s: int) -> int:
        return self.hist[s][0][0].shape[0]

    def step(
        self, news: list[tuple[int, int]], layer: int = 0, pad: int = 0
    ) -> AttentionMetadata:
        """news: (seq, n_new). Runs `layer`, checking against the dense reference."""
        specs = []
        for s, n in news:
            need = -(-(self.length(s) + n) // self.bs)
            while len(self.tables[s]) < need:
                self.tables[s].append(self.free.pop())
            specs.append((self.length(s), n, self.tables[s] + [0] * pad))
        meta = AttentionMetadata.build(specs, self.bs, native_decode=self.native)
        total = sum(n for _, n in news)
        q = torch.randn(total, self.hq, self.d)
        k = torch.randn(total, self.hkv, self.d)
        v = torch.randn(total, self.hkv, self.d)
        out = paged_attention(q, k, v, self.cache, layer, meta, scale=self.d**-0.5)
        assert out.shape == q.shape and torch.isfinite(out).all()
        for (s, n), lo in zip(news, meta.query_start_loc, strict=False):
            ok, ov = self.hist[s][layer]
            self.hist[s][layer] = (torch.cat([ok, k[lo : lo + n]]), torch.cat([ov, v[lo : lo + n]]))
            ref = dense_ref(q[lo : lo + n], *self.hist[s][layer], self.d**-0.5)
            torch.testing.assert_close(out[lo : lo + n].double(), ref, atol=1e-5, rtol=1e-5)
        return meta


def dense_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    n, hq, _ = q.shape
    total = k.shape[0]
    g = hq // k.shape[1]
    kk = k.double().repeat_interleave(g, dim=1)
    vv = v.double().repeat_interleave(g, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), kk) * scale
    q_pos = torch.arange(total - n, total)[:, None]
    scores = scores.masked_fill(torch.arange(total)[None, :] > q_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, -1), vv)


BACKENDS = [pytest.param(False, id="torch"),
            pytest.param(True, id="native", marks=pytest.mark.skipif(
                not native.available(), reason="no C compiler for the native kernel"))]


@pytest.mark.parametrize("use_native", BACKENDS)
@pytest.mark.parametrize(("hq", "hkv"), [(4, 4), (8, 2), (6, 1)])
def test_mixed_batches_match_dense(hq: int, hkv: int, use_native: bool) -> None:
    torch.manual_seed(0)
    sim = Sim(hq, hkv, d=16, bs=4, layers=1, native=use_native)
    a, b, c, d = (sim.add_seq() for _ in range(4))
    sim.step([(a, 7), (b, 1)])  # fresh prefill + single-token prompt
    sim.step([(b, 1), (a, 5), (c, 3)])  # decode, prefill over a cached prefix, chunk 1 of c
    sim.step([(c, 6), (a, 1), (d, 9)])  # chunk 2 of c, decode, fresh prefill
    sim.step([(c, 2), (b, 1), (d, 1)], pad=3)  # chunk 3 of c, padded block tables
    for _ in range(5):
        sim.step([(a, 1), (b, 1), (c, 1), (d, 1)], pad=2)


@pytest.mark.parametrize("use_native", BACKENDS)
def test_decode_only_batch_is_vectorized_and_matches(use_native: bool) -> None:
    torch.manual_seed(1)
    sim = Sim(8, 2, d=8, bs=4, layers=1, blocks=200, native=use_native)
    seqs = [sim.add_seq() for _ in range(12)]
    assert not sim.step([(s, 1 + 3 * i) for i, s in enumerate(seqs)]).decode_only
    for _ in range(6):
        assert sim.step([(s, 1) for s in seqs], pad=4).decode_only


def test_layers_are_independent() -> None:
    torch.manual_seed(2)
    cache = torch.full((6, 3, 2, 4, 2, 8), float("nan"))
    table = [4, 1]
    meta = AttentionMetadata.build([(0, 6, table)], 4)
    kvs = [(torch.randn(6, 2, 8), torch.randn(6, 2, 8)) for _ in range(3)]
    for layer, (k, v) in enumerate(kvs):  # same slots, every layer
        paged_attention(torch.randn(6, 4, 8), k, v, cache, layer, meta, scale=0.3)
    dec = AttentionMetadata.build([(6, 1, table)], 4)
    for layer in (2, 0, 1):
        q, k, v = torch.randn(1, 4, 8), torch.randn(1, 2, 8), torch.randn(1, 2, 8)
        out = paged_attention(q, k, v, cache, layer, dec, scale=0.3)
        hk, hv = kvs[layer]
        exp = dense_ref(q, torch.cat([hk, k]), torch.cat([hv, v]), 0.3)
        torch.testing.assert_close(out.double(), exp, atol=1e-5, rtol=1e-5)


def test_slot_mapping_and_metadata() -> None:
    meta = AttentionMetadata.build([(0, 3, [5]), (6, 2, [2, 9]), (3, 1, [7])], block_size=4)
    assert meta.slot_mapping.tolist() == [20, 21, 22, 9 * 4 + 2, 9 * 4 + 3, 7 * 4 + 3]
    assert meta.query_start_loc == [0, 3, 5, 6]
    assert meta.seq_lens == [3, 8, 4]
    assert meta.block_tables.tolist() == [[5, 0], [2, 9], [7, 0]]
    assert not meta.decode_only
    assert meta.decode_tokens.tolist() == [5]


def test_bf16_cache_with_fp32_compute() -> None:
    torch.manual_seed(3)
    cache = torch.zeros(8, 1, 2, 4, 2, 8, dtype=torch.bfloat16)
    meta = AttentionMetadata.build([(0, 6, [3, 6])], 4)
    q, k, v = torch.randn(6, 4, 8), torch.randn(6, 2, 8), torch.randn(6, 2, 8)
    paged_attention(q, k, v, cache, 0, meta, scale=0.35)
    meta2 = AttentionMetadata.build([(6, 1, [3, 6])], 4)
    q2, k2, v2 = torch.randn(1, 4, 8), torch.randn(1, 2, 8), torch.randn(1, 2, 8)
    out = paged_attention(q2, k2, v2, cache, 0, meta2, scale=0.35)
    assert out.dtype == torch.float32
    kk = torch.cat([k, k2]).bfloat16().float()
    vv = torch.cat([v, v2]).bfloat16().float()
    torch.testing.assert_close(out.double(), dense_ref(q2, kk, vv, 0.35), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("seqs", "match"),
    [
        ([(0, 5, [1])], "cannot hold"),
        ([(0, 0, [1])], "num_new_tokens"),
        ([], "empty"),
    ],
)
def test_build_rejects_bad_input(seqs: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AttentionMetadata.build(seqs, 4)


def test_metadata_to_device_copies_every_tensor() -> None:
    meta = AttentionMetadata.build([(0, 3, [1]), (4, 1, [2, 3])], 4, device="cpu")
    moved = meta.to("meta")
    assert moved.slot_mapping.is_meta and moved.decode_tokens.is_meta
    assert moved.decode_chunks[0].mask.is_meta
    assert moved.prefills[0].blocks.is_meta and not meta.slot_mapping.is_meta
    assert moved.query_start_loc == meta.query_start_loc
