"""The Triton paged-attention kernel, run by Triton's CPU interpreter, against a float64 dense
reference over a NaN-filled cache (any read past a context's end poisons the output)."""

from __future__ import annotations

import os
import random

# Before triton is imported: @triton.jit reads it when the kernel is defined. The kernel module
# sets it too on a machine without a GPU; a GPU machine runs these tests compiled instead.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from elasticserve.kernels import triton_attention  # noqa: E402
from elasticserve.kernels.attention import AttentionMetadata, paged_attention  # noqa: E402

Spec = tuple[int, int, list[int]]


def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of the last q.shape[0] positions over k/v ([L, Hkv, D]), in float64."""
    n, hq, _ = q.shape
    total, hkv, _ = k.shape
    kk = k.double().repeat_interleave(hq // hkv, dim=1)
    vv = v.double().repeat_interleave(hq // hkv, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), kk) * scale
    q_pos = torch.arange(total - n, total)[:, None]
    scores = scores.masked_fill(torch.arange(total)[None, :] > q_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, -1), vv)


class Batch:
    """A NaN-filled cache of ``layers`` (a strided view when ``spare_layers``: the block stride
    is then larger than one block of the viewed layers), shuffled block ids, cached prefixes."""

    def __init__(self, cases: list[tuple[int, int]], hkv: int, d: int, bs: int, layers: int = 2,
                 spare_layers: int = 0, dtype: torch.dtype = torch.float32, seed: int = 0) -> None:
        rng = random.Random(seed)
        torch.manual_seed(seed)
        blocks = sum(-(-(p + n) // bs) for p, n in cases) + 4
        full = torch.full((blocks, layers + spare_layers, 2, bs, hkv, d), float("nan"), dtype=dtype)
        self.cache = full[:, :layers]
        free = list(range(blocks))
        rng.shuffle(free)
        self.specs: list[Spec] = []
        self.prefix: list[torch.Tensor] = []  # [layers, 2, prefix, hkv, d] per sequence
        for prefix, n in cases:
            table = [free.pop() for _ in range(-(-(prefix + n) // bs))]
            kv = torch.randn(layers, 2, prefix, hkv, d).to(dtype)
            for pos in range(prefix):
                self.cache[table[pos // bs], :, :, pos % bs] = kv[:, :, pos]
            self.prefix.append(kv)
            self.specs.append((prefix, n, table + [0] * rng.randint(0, 2)))  # padded tables

    def check(self, hq: int, layer: int, atol: float = 1e-5, q: torch.Tensor | None = None) -> None:
        """One layer through the Triton backend vs the dense reference, sequence by sequence."""
        total = sum(n for _, n, _ in self.specs)
        _, _, _, bs, hkv, d = self.cache.shape
        q = torch.randn(total, hq, d) if q is None else q
        k, v = torch.randn(total, hkv, d), torch.randn(total, hkv, d)
        meta = AttentionMetadata.build(self.specs, bs, triton=True)
        assert meta.triton_work is not None and not meta.prefills and not meta.decode_chunks
        out = paged_attention(q, k, v, self.cache, layer, meta, scale=d**-0.5)
        assert torch.isfinite(out).all()
        for i, (_, n, _) in enumerate(self.specs):
            lo = meta.query_start_loc[i]
            ks = torch.cat([self.prefix[i][layer, 0].float(), k[lo:lo + n].to(self.cache.dtype).float()])
            vs = torch.cat([self.prefix[i][layer, 1].float(), v[lo:lo + n].to(self.cache.dtype).float()])
            ref = _dense(q[lo:lo + n], ks, vs, d**-0.5)
            torch.testing.assert_close(out[lo:lo + n].double(), ref, atol=atol, rtol=atol)


def _lengths(bs: int) -> list[tuple[int, int]]:
    """Decode contexts on and around block boundaries, a fresh prefill, a chunk over a prefix
    that ends mid-block, and a chunk longer than one prefill tile."""
    decodes = [(p, 1) for p in (0, bs - 2, bs - 1, bs, 2 * bs - 1, 3 * bs, 37)]
    return [*decodes, (0, 9), (11, 5), (2 * bs, bs), (20, 70)]


@pytest.mark.parametrize(("hq", "hkv", "d", "bs"),
                         [(4, 4, 16, 4), (8, 2, 32, 8), (6, 1, 24, 16), (4, 2, 16, 5)])
def test_matches_dense_reference(hq: int, hkv: int, d: int, bs: int) -> None:
    """GQA groups of 1, 4 and 6 (not a power of two), head_dim 24 (padded tile), block size 5
    (not a power of two), decode and prefill in one batch."""
    batch = Batch(_lengths(bs), hkv, d, bs, layers=2, seed=hq * d + bs)
    batch.check(hq, layer=1)


def test_strided_blocks_and_layers() -> None:
    """A block stride larger than the viewed layers' block (the KV view of a bigger cache): the
    kernel must take the block stride from the tensor, not assume contiguity."""
    batch = Batch([(5, 1), (17, 1), (3, 6), (0, 4)], hkv=2, d=16, bs=4, layers=3, spare_layers=2)
    assert not batch.cache.is_contiguous()
    for layer in (2, 0):
        batch.check(8, layer)


def test_strided_queries_and_bf16_cache() -> None:
    """q as the model produces it (a view into a fused qkv row) over a bf16 cache."""
    batch = Batch([(9, 1), (4, 3)], hkv=2, d=16, bs=4, dtype=torch.bfloat16)
    qkv = torch.randn(4, 8 * 16)
    q = qkv[:, :64].view(4, 4, 16)
    assert not q.is_contiguous()
    batch.check(4, 0, q=q)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_queries_and_cache(dtype: torch.dtype) -> None:
    """bf16/fp16 models: q, cache and output in the model's dtype (fp32 softmax inside)."""
    batch = Batch([(9, 1), (4, 3), (0, 5)], hkv=2, d=16, bs=4, dtype=dtype, seed=3)
    batch.check(8, 1, atol=3e-2, q=torch.randn(9, 8, 16).to(dtype))


def test_agrees_with_torch_backend_over_steps() -> None:
    """Decode steps after a prefill, both backends writing the same cache slots."""
    torch.manual_seed(5)
    cache = torch.full((12, 1, 2, 4, 2, 16), float("nan"))
    tables = [[3, 7, 1], [10, 0, 5]]
    specs: list[Spec] = [(0, 6, tables[0]), (0, 3, tables[1])]
    for _ in range(3):
        total = sum(n for _, n, _ in specs)
        q, k, v = torch.randn(total, 4, 16), torch.randn(total, 2, 16), torch.randn(total, 2, 16)
        by_torch = paged_attention(q, k, v, cache, 0, AttentionMetadata.build(specs, 4), 0.25)
        by_triton = paged_attention(q, k, v, cache, 0, AttentionMetadata.build(specs, 4, triton=True),
                                    0.25)
        torch.testing.assert_close(by_triton, by_torch, atol=2e-5, rtol=1e-4)
        specs = [(start + n, 1, table) for start, n, table in specs]


def test_metadata_and_bad_input() -> None:
    assert triton_attention.interpreted() == (not torch.cuda.is_available()
                                              or os.environ["TRITON_INTERPRET"] == "1")
    meta = AttentionMetadata.build([(0, 3, [1]), (4, 1, [2, 3]), (2, 4, [4, 5])], 4, triton=True)
    work = meta.triton_work
    assert work is not None
    assert work.decode_seqs.tolist() == [1] and work.prefill_seqs.tolist() == [0, 2]
    assert work.query_start.tolist() == [0, 3, 4, 8] and work.max_prefill == 4
    moved = meta.to("meta")
    assert moved.triton_work is not None and moved.triton_work.block_tables.is_meta
    with pytest.raises(ValueError, match="attention_backend"):
        AttentionMetadata.build([(0, 3, [1])], 4, native_decode=True, triton=True)
    cache = torch.zeros(4, 1, 2, 4, 3, 16)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        triton_attention.attend(torch.zeros(3, 4, 16), cache, 0, work, 0.25, torch.zeros(3, 4, 16))


def test_missing_triton_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from elasticserve.kernels.attention import require_triton

    require_triton()
    monkeypatch.setitem(sys.modules, "elasticserve.kernels.triton_attention", None)  # import fails
    with pytest.raises(ValueError, match="attention_backend='triton' needs the triton package"):
        require_triton()


@pytest.mark.skipif(torch.cuda.is_available(), reason="compiled mode is right on a GPU")
def test_compiled_triton_without_gpu_is_refused() -> None:
    """triton imported before TRITON_INTERPRET, no GPU: a clear ImportError, not a crash later."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import triton\nfrom elasticserve.kernels import triton_attention"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0 and "set TRITON_INTERPRET=1" in done.stderr
