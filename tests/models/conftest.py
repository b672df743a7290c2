"""Shared fixtures: tiny seeded models built once per session, and a paged greedy driver."""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch

from elasticserve.kernels.attention import AttentionMetadata
from elasticserve.models.llama import CausalLM, kv_cache_shape
from elasticserve.models.make_model import make_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ARCHS = ("llama", "mistral", "qwen2", "qwen3")


@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Iterator[None]:
    """Tiny-model ops take microseconds; on a shared 2-core box OpenMP's thread
    hand-off alone costs ~30 ms per op, so these tests run single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: make_model(arch, "tiny", str(root / arch), seed=0) for arch in ARCHS}


@pytest.fixture(scope="session")
def tiny_llama(tiny_dirs: dict[str, str]) -> str:
    return tiny_dirs["llama"]


@dataclass
class GreedyResult:
    tokens: list[list[int]]
    min_margin: float  # smallest top1 - top2 logit gap over all sampled steps


class PagedRun:
    """Greedy decoding of several prompts at once through the paged cache.

    Prompts are fed in random-size chunks (chunked prefill across calls), so steps mix
    prefill chunks and decodes; blocks come from a shuffled free list, tables are padded,
    and the cache starts as NaN so any stray read shows up.
    """

    def __init__(self, model: CausalLM, prompts: list[list[int]], max_new: int, block_size: int,
                 seed: int):
        self.model, self.max_new, self.bs = model, max_new, block_size
        self.rng = random.Random(seed)
        worst = max(len(p) for p in prompts) + max_new
        num_blocks = len(prompts) * (-(-worst // block_size)) + 2
        self.cache = torch.full(kv_cache_shape(model.config, num_blocks, block_size), float("nan"))
        self.free = list(range(num_blocks))
        self.rng.shuffle(self.free)
        self.tables: list[list[int]] = [[] for _ in prompts]
        self.pending = [list(p) for p in prompts]
        self.lens = [0] * len(prompts)
        self.outs: list[list[int]] = [[] for _ in prompts]

    def step(self, active: list[int]) -> tuple[list[int], torch.Tensor]:
        """Feed the next chunk of every active sequence; return (finished-prompt seqs, logits)."""
        specs: list[tuple[int, int, list[int]]] = []
        ids: list[int] = []
        pos: list[int] = []
        rows: list[int] = []
        who: list[int] = []
        for i in active:
            feed = self.pending[i][: self.rng.randint(2, 7)]
            self.pending[i] = self.pending[i][len(feed) :]
            while len(self.tables[i]) * self.bs < self.lens[i] + len(feed):
                self.tables[i].append(self.free.pop())
            specs.append((self.lens[i], len(feed), self.tables[i] + [0] * self.rng.randint(0, 2)))
            ids += feed
            pos += range(self.lens[i], self.lens[i] + len(feed))
            self.lens[i] += len(feed)
            if not self.pending[i]:
                rows.append(len(ids) - 1)
                who.append(i)
        meta = AttentionMetadata.build(specs, self.bs)
        with torch.no_grad():
            hidden = self.model(torch.tensor(ids), torch.tensor(pos), self.cache, meta)
            return who, self.model.compute_logits(hidden[rows])


def paged_greedy(
    model: CausalLM,
    prompts: list[list[int]],
    max_new: int,
    eos: frozenset[int] = frozenset(),
    block_size: int = 4,
    seed: int = 0,
) -> GreedyResult:
    """Greedy-decode ``prompts`` together; stops each at EOS or ``max_new`` tokens."""
    run = PagedRun(model, prompts, max_new, block_size, seed)
    active = list(range(len(prompts)))
    margin = float("inf")
    while active:
        who, logits = run.step(active)
        if who:
            top2 = logits.topk(2, dim=-1).values
            margin = min(margin, float((top2[:, 0] - top2[:, 1]).min()))
        for i, row_logits in zip(who, logits, strict=True):
            tok = int(row_logits.argmax())
            run.outs[i].append(tok)
            run.pending[i] = [tok]
            if tok in eos or len(run.outs[i]) == max_new:
                active.remove(i)
    return GreedyResult(run.outs, margin)


@pytest.fixture(scope="session")
def greedy() -> Callable[..., GreedyResult]:
    return paged_greedy
