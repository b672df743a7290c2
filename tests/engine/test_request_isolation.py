"""A failure caused by one request's data fails that request only: it ends with
FinishReason.ERROR and frees its blocks, the rest of the batch completes, the engine keeps
serving. Failures are injected at each place where per-request work happens."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from elasticserve import SamplingParams
from elasticserve.engine.llm_engine import LLMEngine
from elasticserve.engine.output_processor import OutputProcessor
from elasticserve.request import FinishReason, SequenceGroup
from elasticserve.worker.model_runner import ModelRunner
from elasticserve.worker.sampler import Sampler
from tests.helpers import run_until_done

BAD_SEED = 666


class Boom(RuntimeError):
    pass


def _raise_for(bad: Callable[..., bool], original: Callable[..., Any]) -> Callable[..., Any]:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if bad(*args, **kwargs):
            raise Boom("injected")
        return original(*args, **kwargs)

    return wrapped


def _is_bad_group(_self: Any, group: SequenceGroup, *_: Any) -> bool:
    return group.request_id == "bad"


# where the failure is injected; each is per-request work inside LLMEngine.step
INJECTIONS: dict[str, tuple[type, str, Callable[..., bool]]] = {
    "detokenize": (OutputProcessor, "decode", _is_bad_group),
    "stop check": (OutputProcessor, "check_stop", _is_bad_group),
    "output": (OutputProcessor, "request_output", _is_bad_group),
    "sampling row": (ModelRunner, "_row", lambda _self, item, *_: item.request_id == "bad"),
    "sampler batch": (Sampler, "__call__",
                      lambda _self, _logits, rows: any(r.params.seed == BAD_SEED for r in rows)),
}


@pytest.fixture(scope="module")
def engine(tiny_llama: str) -> Iterator[LLMEngine]:
    engine = LLMEngine.from_args(tiny_llama)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def narrow(tiny_llama: str) -> Iterator[LLMEngine]:
    engine = LLMEngine.from_args(tiny_llama, max_num_seqs=2)
    yield engine
    engine.close()


@pytest.mark.parametrize("stream", [False, True], ids=["final", "stream"])
@pytest.mark.parametrize("where", list(INJECTIONS))
def test_a_failing_request_fails_alone(engine: LLMEngine, monkeypatch: pytest.MonkeyPatch,
                                       where: str, stream: bool) -> None:
    owner, name, bad = INJECTIONS[where]
    monkeypatch.setattr(owner, name, _raise_for(bad, getattr(owner, name)))
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, stop=["\x00"])
    seeded = SamplingParams(max_tokens=6, temperature=1.0, ignore_eos=True, seed=BAD_SEED,
                            stop=["\x00"])
    for rid in ("good-1", "bad", "good-2"):
        engine.add_request({"prompt_token_ids": [5, 6, 7]}, seeded if rid == "bad" else greedy,
                           request_id=rid, stream=stream)
    done = run_until_done(engine)
    assert done["bad"].finished and done["bad"].error is not None
    assert "Boom: injected" in done["bad"].error
    assert all(c.finish_reason is FinishReason.ERROR for c in done["bad"].outputs)
    for rid in ("good-1", "good-2"):
        assert done[rid].error is None
        assert [c.finish_reason for c in done[rid].outputs] == [FinishReason.LENGTH]
        assert len(done[rid].outputs[0].token_ids) == 6
    assert not engine.groups and engine.stats()["blocks_used"] == 0
    engine.check_integrity()
    monkeypatch.undo()  # the engine serves the next request normally
    rid = engine.add_request({"prompt_token_ids": [5, 6, 7]}, greedy)
    assert run_until_done(engine)[rid].outputs[0].finish_reason is FinishReason.LENGTH


def test_n_children_fail_with_their_parent(engine: LLMEngine, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    # the failure hits after the children forked: every sequence of the group is freed
    def bad(_self: Any, group: SequenceGroup, seq: Any) -> bool:
        return group.request_id == "bad" and seq.index == 2

    monkeypatch.setattr(OutputProcessor, "check_stop",
                        _raise_for(bad, OutputProcessor.check_stop))
    params = SamplingParams(n=3, max_tokens=5, temperature=0.8, seed=1, ignore_eos=True)
    engine.add_request({"prompt_token_ids": [5, 6, 7, 8] * 5}, params, request_id="bad")
    engine.add_request({"prompt_token_ids": [5, 6, 7, 8] * 5}, params, request_id="good")
    done = run_until_done(engine)
    assert done["bad"].error is not None and done["good"].error is None
    assert len(done["good"].outputs) == 3
    assert engine.stats()["blocks_used"] == 0
    engine.check_integrity()


@pytest.mark.parametrize("seed", [2**64, 2**64 + 5, -1, -(2**70), 2**200])
def test_any_int_is_a_seed(engine: LLMEngine, seed: int) -> None:
    """vLLM's SamplingParams takes any int; the generator's range is [-2**63, 2**64)."""
    params = SamplingParams(n=2, max_tokens=4, temperature=1.0, seed=seed, ignore_eos=True)
    rid = engine.add_request({"prompt_token_ids": [5, 6, 7]}, params)
    out = run_until_done(engine)[rid]
    assert out.error is None and all(len(c.token_ids) == 4 for c in out.outputs)
    if seed == 2**64 + 5:  # reduced modulo 2**64: the same stream as seed 5
        same = engine.add_request({"prompt_token_ids": [5, 6, 7]},
                                  SamplingParams(n=2, max_tokens=4, temperature=1.0, seed=5,
                                                 ignore_eos=True))
        again = run_until_done(engine)[same]
        assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]


@pytest.mark.parametrize(("kwargs", "param"), [
    (dict(n=3), "n"),
    (dict(n=1, best_of=3), "best_of"),
    (dict(use_beam_search=True, best_of=3, temperature=0.0), "beam_width"),
    (dict(beam_width=3, temperature=0.0), "beam_width"),
])
def test_a_group_wider_than_max_num_seqs_is_refused(narrow: LLMEngine, kwargs: dict[str, Any],
                                                    param: str) -> None:
    # before: admitted, then never scheduled (a group runs all its sequences in one step)
    with pytest.raises(ValueError, match="max_num_seqs=2") as info:
        narrow.add_request("hello", SamplingParams(max_tokens=2, **kwargs))
    assert getattr(info.value, "param", None) == param
    assert not narrow.has_unfinished_requests()
    ok = narrow.add_request("hello", SamplingParams(n=2, max_tokens=2, temperature=0.0))
    assert len(run_until_done(narrow)[ok].outputs) == 2


@pytest.mark.parametrize("prompt", ["\ud800x", "ok \udfff", "a\ud83d"])
def test_lone_surrogates_are_a_field_error(engine: LLMEngine, prompt: str) -> None:
    with pytest.raises(ValueError, match="surrogate") as info:
        engine.add_request(prompt, SamplingParams(max_tokens=2))
    assert getattr(info.value, "param", None) == "prompt"
    assert not engine.has_unfinished_requests()
