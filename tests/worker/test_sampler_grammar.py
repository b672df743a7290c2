"""The sampler's grammar masks, and the runner-side grammar states (llguidance matchers)."""

from __future__ import annotations

import json

import pytest
import torch

from elasticserve.models.make_model import make_model
from elasticserve.models.tokenizer import Tokenizer
from elasticserve.sampling_params import SamplingParams, StructuredOutputsParams
from elasticserve.worker.sampler import Sampler, SamplingRow, apply_allowed
from elasticserve.worker.structured import GrammarCompiler, GrammarStates, allowed_tokens

V = 16


def row(params: SamplingParams, allowed: list[int] | None = None, banned: tuple[int, ...] = (),
        generator: torch.Generator | None = None) -> SamplingRow:
    mask = None
    if allowed is not None:
        mask = torch.zeros(V, dtype=torch.bool)
        mask[allowed] = True
    return SamplingRow(params, [], [], generator, frozenset(banned), 0, allowed=mask)


def test_greedy_and_random_rows_pick_only_allowed_tokens() -> None:
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(0))
    best = int(logits[0].argmax())
    allowed = [t for t in range(V) if t != best][:3]
    greedy, rand = SamplingParams(temperature=0.0), SamplingParams(temperature=1.0)
    for seed in range(20):
        rows = [row(greedy, allowed), row(rand, allowed, generator=torch.Generator().manual_seed(seed)),
                row(greedy)]
        out = Sampler()(logits, rows)
        assert out[0].token_id == max(allowed, key=lambda t: float(logits[0, t]))
        assert out[1].token_id in allowed
        assert out[2].token_id == int(logits[2].argmax())  # the unconstrained row is untouched


def test_rows_without_a_grammar_pay_nothing() -> None:
    logits = torch.randn(2, V)
    rows = [row(SamplingParams()), row(SamplingParams())]
    assert apply_allowed(logits, logits, rows) is logits


def test_grammar_wins_when_min_tokens_bans_its_only_token() -> None:
    # the grammar allows only EOS (id 2) while min_tokens bans it: follow the grammar
    logits = torch.randn(1, V)
    out = Sampler()(logits, [row(SamplingParams(temperature=0.0), [2], banned=(2,))])
    assert out[0].token_id == 2


@pytest.fixture(scope="module")
def compiler(tmp_path_factory: pytest.TempPathFactory) -> GrammarCompiler:
    path = make_model("llama", "tiny", str(tmp_path_factory.mktemp("grammar") / "m"))
    tok = Tokenizer.from_dir(path)
    return GrammarCompiler(tok, tok.vocab_size)


def test_child_state_is_a_copy_taken_before_the_parent_advances(compiler: GrammarCompiler) -> None:
    states = GrammarStates(compiler)
    spec = StructuredOutputsParams(choice=["ab", "cd"])
    parent = states.for_row(1, 1, spec)
    child = states.for_row(2, 1, spec)
    assert child is not parent
    tok = compiler.lltokenizer
    states.advance(1, tok.tokenize_str("ab")[0])
    # the child is still at the start: both alternatives are open to it
    vocab = compiler.vocab_size
    masks = allowed_tokens([parent, child], tok.vocab_size, vocab)
    assert masks[1].sum() > masks[0].sum()
    states.drop([1, 2])
    assert states.matchers == {}


def test_json_mask_forces_the_schema_prefix(compiler: GrammarCompiler) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
              "additionalProperties": False}
    matcher = GrammarStates(compiler).for_row(5, 5, StructuredOutputsParams(json=schema))
    text = ""
    tok = compiler._tokenizer
    for _ in range(30):  # the lowest allowed id each step: deterministic, ends by closing
        mask = allowed_tokens([matcher], compiler.lltokenizer.vocab_size, compiler.vocab_size)[0]
        token = int(mask.nonzero()[0])
        if token in tok.eos_token_ids:
            break
        assert matcher.consume_token(token)
        text += tok.decode([token])
    assert set(json.loads(text)) == {"a"}
