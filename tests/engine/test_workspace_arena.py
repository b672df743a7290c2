"""One engine's workspace arena: same outputs, bytes really in its pages, pages given back."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch

from elasticserve import LLM, SamplingParams
from elasticserve.engine.workspace import WorkspaceArena
from tests.engine.conftest import mixed_prompts

KiB = 1 << 10
PAGE = 64 * KiB
PARAMS = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def _prompts(model_dir: str) -> list[dict[str, list[int]]]:
    base = mixed_prompts(model_dir, 6)
    # short ones and a ~400-token one: one chunk of 512, or many of 16
    return [{"prompt_token_ids": p} for p in base[:4]] + [
        {"prompt_token_ids": (base[1] * 20)[:400]}]


def _run(model_dir: str, on: bool, **kwargs: Any) -> tuple[list[list[int]], LLM]:
    llm = LLM(model_dir, runtime_memory_from_budget=on, page_size=PAGE, **kwargs)
    outs = llm.generate(_prompts(model_dir), PARAMS)
    llm.engine.check_integrity()
    return [o.outputs[0].token_ids for o in outs], llm


def _arena(llm: LLM) -> WorkspaceArena:
    arena = llm.engine.kv.workspace
    assert arena is not None
    return arena


@pytest.mark.parametrize("chunk", [16, 512])
@pytest.mark.parametrize("linear", ["torch", "auto"])
def test_greedy_outputs_identical_with_the_arena(tiny_llama: str, chunk: int,
                                                 linear: str) -> None:
    kw = {"max_num_batched_tokens": chunk, "linear_backend": linear}
    off, llm_off = _run(tiny_llama, False, **kw)
    on, llm = _run(tiny_llama, True, **kw)
    assert on == off
    assert llm_off.engine.kv.workspace is None and llm_off.engine.runner.workspace is None
    stats = llm.engine.kv.memory_stats()
    assert stats["workspace_steps"] == llm.engine.stats()["steps"] > 0
    assert stats["workspace_fallbacks"] == 0
    assert stats["workspace_peak_bytes"] >= _arena(llm).view.need_bytes(min(chunk, 400), 1)
    llm.engine.close()
    llm_off.engine.close()


def test_logits_and_mlp_bytes_live_in_the_arena(tiny_llama: str) -> None:
    llm = LLM(tiny_llama, runtime_memory_from_budget=True, page_size=PAGE,
              linear_backend="torch")
    arena = _arena(llm)
    lo = arena.vt.tensor.data_ptr()
    hi = lo + arena.vt.max_pages * PAGE
    model, seen = llm.engine.model, []
    mlp = model.model.layers[0].mlp
    real_logits, real_mm = model.compute_logits, mlp.gate_up_proj.forward_into

    def logits(hidden: torch.Tensor, ws: Any = None) -> torch.Tensor:
        out = real_logits(hidden, ws)
        seen.append(("logits", out.data_ptr()))
        return out

    def gate_up(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        seen.append(("gate_up", out.data_ptr()))
        return real_mm(x, out)

    model.compute_logits = logits  # type: ignore[method-assign]
    mlp.gate_up_proj.forward_into = gate_up  # type: ignore[method-assign]
    llm.generate(_prompts(tiny_llama)[:2], PARAMS)
    assert {kind for kind, _ in seen} == {"logits", "gate_up"}
    assert all(lo <= ptr < hi for _, ptr in seen)
    llm.engine.close()


def test_big_steps_give_pages_back_decode_keeps_a_floor(tiny_llama: str) -> None:
    # retain 2 pages: a 400-token chunk needs ~29, decode of a few sequences fits in 2
    llm = LLM(tiny_llama, runtime_memory_from_budget=True, page_size=PAGE,
              linear_backend="torch", max_num_batched_tokens=512,
              workspace_retain_bytes=2 * PAGE, kv_shrink_after_s=60.0)
    arena = _arena(llm)
    engine = llm.engine
    engine.add_request(_prompts(tiny_llama)[4], SamplingParams(max_tokens=30, ignore_eos=True))
    engine.step()  # the whole prompt in one step: its pages are mapped, then given back
    assert arena.peak_bytes >= 20 * PAGE
    assert arena.mapped_pages <= 2
    grants = arena.grants
    while engine.has_unfinished_requests():
        engine.step()
        engine.check_integrity()
    assert arena.grants <= grants + 1  # decode steps do not map and unmap every step
    assert 0 < arena.mapped_pages <= 2  # the floor stays while steps need it
    arena.shrink_after_s = 0.0  # idle past the hysteresis: its thread gives the floor back
    deadline = time.monotonic() + 5.0
    while arena.mapped_pages and time.monotonic() < deadline:
        time.sleep(0.02)
    assert arena.mapped_pages == 0
    engine.close()


def test_bad_options_name_the_field(tiny_llama: str) -> None:
    with pytest.raises(ValueError, match="workspace_retain_bytes"):
        LLM(tiny_llama, runtime_memory_from_budget=True, workspace_retain_bytes=-1)
    with pytest.raises(ValueError, match="runtime_memory_from_budget"):
        LLM(tiny_llama, runtime_memory_from_budget="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="runtime_memory_from_budget"):
        LLM(tiny_llama, runtime_memory_from_budget=True, cuda_graphs=True)


class _Books:
    """A WorkspaceBroker that only counts: pages granted minus pages released."""

    def __init__(self) -> None:
        self.held = 0

    def grant_spare(self, pages: int) -> int:
        self.held += pages
        return pages

    def release(self, pages: int) -> None:
        assert 0 <= pages <= self.held
        self.held -= pages


def test_a_failed_map_falls_back_and_keeps_the_books(tiny_llama: str) -> None:
    llm = LLM(tiny_llama, runtime_memory_from_budget=True, page_size=PAGE,
              linear_backend="torch", max_num_batched_tokens=512, workspace_retain_bytes=PAGE)
    arena = _arena(llm)
    books = _Books()
    arena.broker = books
    real_map = arena.vt.map_pages

    def map_two_then_fail(n: int) -> int:
        real_map(min(n, 2))
        raise OSError("out of map slots")

    arena.vt.map_pages = map_two_then_fail  # type: ignore[method-assign]
    with llm.engine.kv.lock:
        assert arena.begin(400, 1) is None and arena.fallbacks == 1
        assert books.held == arena.mapped_pages == 2  # what did map stays booked
        arena.end()  # ... until the step ends: back to the retained floor
        assert books.held == arena.mapped_pages <= 1
    arena.vt.map_pages = real_map  # type: ignore[method-assign]
    out = llm.generate(_prompts(tiny_llama)[4:], PARAMS)  # later steps still place
    assert out[0].outputs[0].token_ids and books.held == arena.mapped_pages
    assert arena.steps > 0
    llm.engine.close()
