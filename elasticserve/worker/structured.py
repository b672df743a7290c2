"""Structured outputs: compile a request's constraint with llguidance, mask its logits each step.

Why llguidance (vLLM's "guidance" backend, llama.cpp's): a ~3 MB wheel with no dependencies
that builds its tokenizer view straight from our ``tokenizers`` JSON, compiles JSON schemas,
regexes and Lark grammars in about a millisecond, and computes a token mask per step lazily
(no up-front automaton over the vocabulary). xgrammar would pull triton and needs transformers
at run time. See docs/ARCHITECTURE.md.

One ``LLMatcher`` per sampled sequence lives in the runner (``GrammarStates``), keyed by
sequence id like the seeded generators: created on the sequence's first sample, copied for
n > 1 children before the parent advances, advanced by every token sampled for it and dropped
when the scheduler reports the sequence finished (stop, length, abort, failure). A recomputed
sequence replays its tokens without sampling, so its matcher stays consistent without rollback.
"""

from __future__ import annotations

import functools
import json
import logging
from typing import TYPE_CHECKING

import llguidance
import torch
from torch import Tensor

from elasticserve.errors import InvalidFieldError
from elasticserve.models.tokenizer import Tokenizer
from elasticserve.sampling_params import StructuredOutputsParams

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions  # only in the type stubs

logger = logging.getLogger(__name__)

# Compact JSON (no free whitespace between tokens): a model, above all a random-weight one,
# cannot then wander in whitespace forever, and the output is what json.dumps would give.
_JSON_OPTIONS: JsonCompileOptions = {"whitespace_flexible": False}
# Rust-regex metacharacters (regex_syntax::escape's set), for `choice` alternatives
_REGEX_META = set("\\.+*?()|[]{}^$#&-~")


def _escape_regex(text: str) -> str:
    return "".join("\\" + c if c in _REGEX_META else c for c in text)


def grammar_source(spec: StructuredOutputsParams) -> str:
    """llguidance's grammar text for a constraint (not yet checked against a tokenizer)."""
    if spec.json is not None or spec.json_object:
        schema = spec.json if isinstance(spec.json, dict) else {"type": "object"}
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
        except ValueError as exc:
            raise InvalidFieldError("structured_outputs", f"bad JSON schema: {exc}") from exc
    if spec.regex is not None:
        return llguidance.LLMatcher.grammar_from_regex(spec.regex)
    if spec.choice is not None:
        alternatives = "|".join(_escape_regex(c) for c in spec.choice)
        return llguidance.LLMatcher.grammar_from_regex(f"({alternatives})")
    assert spec.grammar is not None
    return llguidance.LLMatcher.grammar_from_lark(spec.grammar)


def _spec_key(spec: StructuredOutputsParams) -> str:
    return json.dumps([spec.kind, spec.json, spec.regex, spec.choice, spec.grammar],
                      sort_keys=True)


class GrammarCompiler:
    """Compiles constraints against one model's tokenizer; compiled grammars are cached."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        """``vocab_size``: the width of the model's logits (may exceed the tokenizer's)."""
        self.vocab_size = vocab_size
        self._tokenizer = tokenizer
        self._compiled: dict[str, str] = {}

    @functools.cached_property
    def lltokenizer(self) -> llguidance.LLTokenizer:
        # built on first use: a 150k vocabulary takes a moment, and most engines never need it
        tok = self._tokenizer
        n_vocab = max(self.vocab_size, tok.vocab_size)
        return llguidance.LLTokenizer(tok.hf.to_str(), n_vocab=n_vocab,
                                      eos_token=sorted(tok.eos_token_ids))

    def compile(self, spec: StructuredOutputsParams) -> str:
        """The checked grammar for ``spec``; raises InvalidFieldError('structured_outputs')."""
        key = _spec_key(spec)
        grammar = self._compiled.get(key)
        if grammar is None:
            grammar = grammar_source(spec)
            error = llguidance.LLMatcher.validate_grammar(grammar, self.lltokenizer)
            if error:
                raise InvalidFieldError("structured_outputs",
                                        f"cannot compile the {spec.kind} constraint: {error}")
            if len(self._compiled) >= 256:  # a bound, not an LRU: schemas rarely vary that much
                self._compiled.clear()
            self._compiled[key] = grammar
        return grammar

    def matcher(self, spec: StructuredOutputsParams) -> llguidance.LLMatcher:
        return llguidance.LLMatcher(self.lltokenizer, self.compile(spec), log_level=0)


class GrammarStates:
    """The runner's matchers, one per constrained sequence id."""

    def __init__(self, compiler: GrammarCompiler) -> None:
        self.compiler = compiler
        self.matchers: dict[int, llguidance.LLMatcher] = {}

    def for_row(self, seq_id: int, parent_id: int, spec: StructuredOutputsParams
                ) -> llguidance.LLMatcher:
        """The matcher of ``seq_id``: new on its first sample; a child (``parent_id`` differs)
        starts as a copy of its parent's state, taken before the parent advances."""
        matcher = self.matchers.get(seq_id)
        if matcher is None:
            parent = self.matchers.get(parent_id) if parent_id != seq_id else None
            if parent is None:
                parent = self.matchers[parent_id] = self.compiler.matcher(spec)
            matcher = parent if parent_id == seq_id else parent.deep_copy()
            self.matchers[seq_id] = matcher
        return matcher

    def drop(self, seq_ids: list[int]) -> None:
        for seq_id in seq_ids:
            self.matchers.pop(seq_id, None)

    def advance(self, seq_id: int, token_id: int) -> None:
        matcher = self.matchers.get(seq_id)
        if matcher is not None and not matcher.consume_token(token_id):
            # cannot happen for a masked token; the matcher then allows only EOS, ending the row
            logger.warning("grammar rejected token %d of sequence %d: %s", token_id, seq_id,
                           matcher.get_error())


def allowed_tokens(matchers: list[llguidance.LLMatcher], mask_vocab: int, vocab_size: int
                   ) -> Tensor:
    """[len(matchers), vocab_size] bool: the tokens each matcher allows next (``mask_vocab``:
    the llguidance tokenizer's size, which the bitmask must cover)."""
    words = (mask_vocab + 31) // 32
    bitmask = torch.empty((len(matchers), words), dtype=torch.int32)
    # llguidance.torch.fill_next_token_bitmask does this, but importing that module decorates a
    # kernel with torch.compile, which imports torch._dynamo: seconds of start-up, for nothing
    for i, matcher in enumerate(matchers):
        row = bitmask[i]
        matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())
    bits = (bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.view(len(matchers), -1)[:, :vocab_size].bool()
