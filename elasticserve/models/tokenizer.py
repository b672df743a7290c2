"""Tokenizer, chat template and streaming detokenizer for a Hugging Face model directory."""

from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.decoders import DecodeStream


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot parse: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: top level must be a JSON object")
    return data


def _token_text(value: Any) -> str | None:
    # tokenizer_config stores special tokens either as strings or AddedToken dicts.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _id_list(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


class Tokenizer:
    """Wraps ``tokenizers.Tokenizer`` with the model directory's special-token metadata.

    ``eos_token_ids`` is the union of the generation config's ``eos_token_id`` (or
    config.json's when there is no generation_config.json) and the tokenizer's
    ``eos_token``, so generation stops on any of them.
    """

    def __init__(
        self,
        tokenizer: HFTokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        add_bos_token: bool = False,
        chat_template: str | None = None,
        eos_token_ids: frozenset[int] = frozenset(),
        source: str = "tokenizer",
    ):
        self.hf = tokenizer
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_token_id = tokenizer.token_to_id(bos_token) if bos_token else None
        eos_id = tokenizer.token_to_id(eos_token) if eos_token else None
        self.add_bos_token = add_bos_token and self.bos_token_id is not None
        self.chat_template = chat_template
        self.eos_token_ids: frozenset[int] = eos_token_ids | (
            frozenset() if eos_id is None else frozenset({eos_id})
        )
        self.source = source

    @classmethod
    def from_dir(cls, model_dir: str) -> Tokenizer:
        """Load tokenizer.json, tokenizer_config.json and generation_config.json."""
        path = os.path.join(model_dir, "tokenizer.json")
        if not os.path.isfile(path):
            raise ValueError(f"{path}: tokenizer.json not found")
        try:
            hf = HFTokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"{path}: cannot load tokenizer: {e}") from e
        tok_cfg = _read_json(os.path.join(model_dir, "tokenizer_config.json"))
        gen_cfg = _read_json(os.path.join(model_dir, "generation_config.json"))
        if "eos_token_id" not in gen_cfg:
            gen_cfg = _read_json(os.path.join(model_dir, "config.json"))
        return cls(
            hf,
            bos_token=_token_text(tok_cfg.get("bos_token")),
            eos_token=_token_text(tok_cfg.get("eos_token")),
            add_bos_token=bool(tok_cfg.get("add_bos_token", False)),
            chat_template=_chat_template(model_dir, tok_cfg),
            eos_token_ids=frozenset(_id_list(gen_cfg.get("eos_token_id"))),
            source=model_dir,
        )

    @property
    def vocab_size(self) -> int:
        """Number of token ids including added special tokens."""
        return int(self.hf.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for ``text``. Pass ``add_special_tokens=False`` for chat-template output,
        which already carries any BOS the template wants."""
        # encode_batch releases the GIL for the whole encode; encode does not always (a 2 MB
        # prompt held it for seconds, stalling every thread of the server)
        ids: list[int] = self.hf.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        if add_special_tokens and self.add_bos_token and (not ids or ids[0] != self.bos_token_id):
            assert self.bos_token_id is not None
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return str(self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
        chat_template: str | None = None, **kwargs: Any
    ) -> str:
        """Render the model's Jinja chat template in a sandbox (extra kwargs reach the template).

        `chat_template` replaces the model's own (transformers' argument of that name)."""
        template_text = chat_template or self.chat_template
        if not template_text:
            raise ValueError(f"{self.source}: model has no chat_template in tokenizer_config.json")
        try:
            template = _jinja_env().from_string(template_text)
            return template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                **kwargs,
            )
        except TemplateError as e:
            raise ValueError(f"{self.source}: chat template failed: {e}") from e


def _chat_template(model_dir: str, tok_cfg: dict[str, Any]) -> str | None:
    # Newer transformers save the template as its own file next to tokenizer_config.json.
    jinja_path = os.path.join(model_dir, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            return f.read()
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _jinja_env() -> ImmutableSandboxedEnvironment:
    # Same environment options as transformers so templates render identically.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class IncrementalDetokenizer:
    """Streams text for generated ids; ``text`` always equals a full decode of the ids.

    ``push`` may return "" while a multi-byte character is still incomplete;
    ``finish`` flushes whatever a full decode has beyond what was streamed (e.g. a
    trailing replacement character for bytes that never completed).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self.token_ids: list[int] = []
        self.text = ""

    def push(self, token_id: int) -> str:
        """Append one id and return the newly completed text (possibly empty)."""
        self.token_ids.append(token_id)
        piece = self._stream.step(self.tokenizer.hf, token_id)
        if piece is None:
            return ""
        self.text += piece
        return str(piece)

    def finish(self) -> str:
        """Return any text still held back so that ``text`` equals the full decode."""
        full = self.tokenizer.decode(self.token_ids, self.skip_special_tokens)
        if full.startswith(self.text):
            rest = full[len(self.text) :]
        else:  # decoders whose output depends on the whole sequence; resync
            rest = ""
        self.text = full
        return rest
