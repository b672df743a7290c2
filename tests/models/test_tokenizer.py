"""Tokenizer wrapper, chat template and streaming detokenizer on the tiny model's tokenizer."""

from __future__ import annotations

import json
import os
import random
import shutil

import pytest

from elasticserve.models.make_model import CHATML_TEMPLATE
from elasticserve.models.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = [
    "def main():\n    print('hello, world')\n",
    "naïve café — 日本語のテキスト 🚀🎉 emoji",
    "   leading spaces and\ttabs\r\nwindows newline",
    "",
]


@pytest.fixture(scope="module")
def tok(tiny_llama: str) -> Tokenizer:
    return Tokenizer.from_dir(tiny_llama)


def test_round_trip_and_metadata(tok: Tokenizer) -> None:
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == 512
    assert tok.eos_token_ids == frozenset({0, 2})  # generation_config + tokenizer eos
    assert tok.encode("<|im_start|>user<|im_end|>") == [1, *tok.encode("user"), 2]
    assert tok.decode([1, *tok.encode("hi"), 2]) == "hi"
    assert tok.decode([1, *tok.encode("hi"), 2], skip_special_tokens=False) == "<|im_start|>hi<|im_end|>"
    assert len(tok.encode("def def def")) < len("def def def")  # BPE merges learned


def test_chat_template(tok: Tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    text = tok.apply_chat_template(messages)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert not tok.apply_chat_template(messages, add_generation_prompt=False).endswith("assistant\n")
    ids = tok.encode(text, add_special_tokens=False)
    assert ids.count(1) == 3 and ids.count(2) == 2


def test_chat_template_matches_transformers(tiny_llama: str, tok: Tokenizer) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_llama)
    messages = [{"role": "user", "content": "naïve 🚀"}, {"role": "assistant", "content": "ok"}]
    ref = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(messages) == ref
    assert hf.encode(TEXTS[1]) == tok.encode(TEXTS[1])


def test_template_errors(tmp_path, tiny_llama: str) -> None:
    d = shutil.copytree(tiny_llama, tmp_path / "notemplate")
    cfg_path = os.path.join(d, "tokenizer_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    del cfg["chat_template"]
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match="no chat_template"):
        Tokenizer.from_dir(str(d)).apply_chat_template([{"role": "user", "content": "x"}])
    raising = "{{ raise_exception('only user turns') }}"
    (d / "chat_template.jinja").write_text(raising)
    with pytest.raises(ValueError, match="only user turns"):
        Tokenizer.from_dir(str(d)).apply_chat_template([])
    (d / "chat_template.jinja").write_text("{{ ''.__class__.__mro__ }}")  # sandbox escape
    with pytest.raises(ValueError, match="chat template failed"):
        Tokenizer.from_dir(str(d)).apply_chat_template([])
    (d / "chat_template.jinja").write_text(CHATML_TEMPLATE)
    out = Tokenizer.from_dir(str(d)).apply_chat_template([{"role": "user", "content": "x"}])
    assert out.endswith("<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="tokenizer.json not found"):
        Tokenizer.from_dir(str(tmp_path))


def stream(tok: Tokenizer, ids: list[int], skip: bool = True) -> tuple[str, list[str]]:
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    pieces = [detok.push(i) for i in ids]
    pieces.append(detok.finish())
    assert "".join(pieces) == detok.text
    return detok.text, pieces


def test_incremental_detokenizer_matches_full_decode(tok: Tokenizer) -> None:
    for text in TEXTS:
        ids = tok.encode(text)
        out, pieces = stream(tok, ids)
        assert out == text == tok.decode(ids)
    _, pieces = stream(tok, tok.encode("🚀"))
    assert pieces[0] == ""  # the 4-byte emoji is held back until complete
    rng = random.Random(0)
    for trial in range(50):  # random ids, incl. specials and broken UTF-8 byte runs
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 40))]
        skip = trial % 2 == 0
        assert stream(tok, ids, skip)[0] == tok.decode(ids, skip_special_tokens=skip)
