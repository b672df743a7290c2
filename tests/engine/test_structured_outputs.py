"""Structured outputs in the engine: even the random-weight tiny model's output follows the
grammar (JSON schemas of several shapes, choice, regex), with n > 1, through recompute
preemption, and an abort frees the grammar state with the blocks."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from elasticserve.engine.args import EngineArgs
from elasticserve.engine.llm_engine import LLMEngine
from elasticserve.errors import InvalidFieldError
from elasticserve.sampling_params import SamplingParams, StructuredOutputsParams
from tests.helpers import run_until_done
from tests.json_schema_check import check

# bounded strings, numbers and arrays: a random model closes what it must close
PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 16},
                   "age": {"type": "integer", "minimum": 0, "maximum": 120},
                   "role": {"enum": ["admin", "user", "guest"]}},
    "required": ["name", "age", "role"], "additionalProperties": False,
}
ORDER: dict[str, Any] = {
    "type": "object",
    "properties": {
        "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object", "properties": {"sku": {"type": "string", "maxLength": 8},
                                             "qty": {"type": "integer", "minimum": 1,
                                                     "maximum": 9}},
            "required": ["sku", "qty"], "additionalProperties": False}},
        "address": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 12},
            "geo": {"type": "object", "properties": {"lat": {"type": "integer", "minimum": -90,
                                                             "maximum": 90}},
                    "required": ["lat"], "additionalProperties": False}},
            "required": ["city", "geo"], "additionalProperties": False},
        "express": {"type": "boolean"},
    },
    "required": ["items", "address", "express"], "additionalProperties": False,
}
SCORES: dict[str, Any] = {"type": "array", "minItems": 2, "maxItems": 4,
                          "items": {"type": "integer", "minimum": 0, "maximum": 99}}


@pytest.fixture(scope="module")
def engine(tiny_llama: str) -> Iterator[LLMEngine]:
    eng = LLMEngine(EngineArgs(model=tiny_llama))
    yield eng
    eng.close()


def _run(engine: LLMEngine, params: SamplingParams, prompt: str = "Give me JSON:") -> Any:
    rid = engine.add_request(prompt, params)
    out = run_until_done(engine)[rid]
    assert out.finished and out.error is None
    return out


@pytest.mark.parametrize("schema", [PERSON, ORDER, SCORES], ids=["person", "order", "scores"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_output_validates_against_the_schema(engine: LLMEngine, schema: dict[str, Any],
                                             temperature: float) -> None:
    params = SamplingParams(temperature=temperature, seed=7, n=2, max_tokens=400,
                            structured_outputs=StructuredOutputsParams(json=schema))
    for comp in _run(engine, params).outputs:
        assert comp.finish_reason == "stop", comp.text
        check(json.loads(comp.text), schema)
    engine.check_integrity()


def test_n_children_each_follow_their_own_grammar_state(engine: LLMEngine) -> None:
    # four children forked from one prompt: each advances its own copy of the matcher
    params = SamplingParams(temperature=1.0, seed=3, n=4, max_tokens=400,
                            structured_outputs=StructuredOutputsParams(json=PERSON))
    texts = [c.text for c in _run(engine, params).outputs]
    for text in texts:
        check(json.loads(text), PERSON)
    assert len(set(texts)) > 1  # distinct samples, not one state shared


def test_choice_and_regex(engine: LLMEngine) -> None:
    choice = StructuredOutputsParams(choice=["red pill", "blue pill"])
    for seed in range(3):
        out = _run(engine, SamplingParams(temperature=1.0, seed=seed, structured_outputs=choice))
        assert out.outputs[0].text in ("red pill", "blue pill")
    regex = StructuredOutputsParams(regex=r"[a-z]{3}-[0-9]{2}")
    text = _run(engine, SamplingParams(temperature=0.0, structured_outputs=regex)).outputs[0].text
    assert len(text) == 6 and text[3] == "-" and text[4:].isdigit() and text[:3].isalpha()


def test_unconstrained_rows_in_the_same_batch_are_unchanged(engine: LLMEngine) -> None:
    plain = SamplingParams(temperature=0.0, max_tokens=12)
    alone = _run(engine, plain, "import os").outputs[0].token_ids
    a = engine.add_request("import os", plain)
    b = engine.add_request("x", SamplingParams(temperature=0.0, max_tokens=200,
                                               structured_outputs=StructuredOutputsParams(json=PERSON)))
    done = run_until_done(engine)
    assert done[a].outputs[0].token_ids == alone
    check(json.loads(done[b].outputs[0].text), PERSON)


def test_recompute_preemption_keeps_the_grammar_consistent(tiny_llama: str) -> None:
    # 10 blocks of 16 tokens for 4 requests that each need ~6: some are preempted and recomputed
    eng = LLMEngine(EngineArgs(model=tiny_llama, kv_cache_mode="static", num_kv_blocks=10,
                               max_model_len=160, preemption_mode="recompute"))
    try:
        params = SamplingParams(temperature=1.0, seed=11, max_tokens=100,
                                structured_outputs=StructuredOutputsParams(json=PERSON))
        prompt = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1)\n"
        rids = [eng.add_request(prompt * (1 + i % 2), params) for i in range(4)]
        done = run_until_done(eng, each_step=eng.check_integrity)
        assert eng.stats()["recomputes"] > 0
        for rid in rids:
            comp = done[rid].outputs[0]
            if comp.finish_reason == "stop":
                check(json.loads(comp.text), PERSON)
            else:  # cut by max_tokens / max_model_len: still a prefix the grammar allowed
                assert comp.finish_reason == "length"
        assert sum(done[r].outputs[0].finish_reason == "stop" for r in rids) >= 2
    finally:
        eng.close()


def test_abort_frees_the_grammar_state_and_blocks(engine: LLMEngine) -> None:
    # PERSON takes more than 5 tokens: both children are still generating when aborted
    params = SamplingParams(temperature=1.0, seed=1, n=2, max_tokens=300,
                            structured_outputs=StructuredOutputsParams(json=PERSON))
    rid = engine.add_request("abort me", params)
    for _ in range(5):
        engine.step()
    assert len(engine.runner.grammars.matchers) == 2
    engine.abort_request(rid)
    engine.step()  # the runner learns of finished sequences with the next step
    assert engine.runner.grammars.matchers == {}
    engine.check_integrity()
    assert engine.stats()["blocks_used"] == 0


@pytest.mark.parametrize("spec", [
    {"json": {"type": "no-such-type"}},
    {"regex": "(unclosed"},
    {"grammar": "start: missing_rule"},
])
def test_a_bad_constraint_is_an_invalid_field_and_the_engine_keeps_serving(
        engine: LLMEngine, spec: dict[str, Any]) -> None:
    with pytest.raises(InvalidFieldError) as err:
        engine.add_request("x", SamplingParams(structured_outputs=StructuredOutputsParams(**spec)))
    assert err.value.param == "structured_outputs"
    assert not engine.has_unfinished_requests()
    assert _run(engine, SamplingParams(max_tokens=3)).outputs[0].finish_reason == "length"


@pytest.mark.parametrize("kwargs", [
    {}, {"json": {}, "regex": "a"}, {"json": "{not json"}, {"json": [1]}, {"choice": []},
    {"choice": ["a", ""]}, {"regex": ""},
])
def test_structured_outputs_params_validate(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidFieldError) as err:
        StructuredOutputsParams(**kwargs)
    assert err.value.param == "structured_outputs"


def test_beam_search_with_a_grammar_is_refused() -> None:
    with pytest.raises(InvalidFieldError, match="beam search"):
        SamplingParams(use_beam_search=True, best_of=2,
                       structured_outputs=StructuredOutputsParams(json_object=True))
    # a JSON string schema is parsed
    assert StructuredOutputsParams(json='{"type": "object"}').json == {"type": "object"}
