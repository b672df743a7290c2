"""User-facing sampling parameters, shaped like vLLM's ``SamplingParams``.

Pure Python on purpose: the scheduler and the API server import this module and
must not pull in torch.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from dataclasses import dataclass
from typing import Any

from elasticserve.errors import InvalidFieldError

# Below this temperature sampling is treated as greedy (argmax); dividing logits
# by such a small number only amplifies float noise.
GREEDY_TEMPERATURE_EPS = 1e-5
MAX_LOGPROBS = 20


class SamplingType(enum.IntEnum):
    """How the next token of a request is chosen."""

    GREEDY = 0
    RANDOM = 1
    RANDOM_SEED = 2
    BEAM = 3


def _is_int(value: object) -> bool:
    # bool is an int subclass, but True as max_tokens is a caller bug, not 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value: object, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not _is_int(value):
        raise InvalidFieldError(name, f"{name} must be an int, got {value!r}")


def _check_float(name: str, value: object) -> None:
    if not (_is_int(value) or isinstance(value, float)):
        raise InvalidFieldError(name, f"{name} must be a number, got {value!r}")
    if not math.isfinite(float(value)):  # type: ignore[arg-type]
        raise InvalidFieldError(name, f"{name} must be finite, got {value!r}")


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise InvalidFieldError(name, f"{name} must be a bool, got {value!r}")


def _check_range(name: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise InvalidFieldError(name, f"{name} must be in [{lo}, {hi}], got {value}")


@dataclass(slots=True, frozen=True)
class StructuredOutputsParams:
    """Constrain the output to a grammar (vLLM's ``StructuredOutputsParams``); set exactly one.

    ``json``: a JSON schema (dict or JSON text); ``json_object``: any JSON object; ``regex``;
    ``choice``: exactly one of these strings; ``grammar``: a Lark grammar (llguidance's dialect).
    The engine compiles it when the request is validated (a bad schema is an
    ``InvalidFieldError`` on ``structured_outputs``) and masks every sampled token with it.
    """

    json: dict[str, Any] | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        kinds = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        kinds += ["json_object"] if self.json_object is True else []
        if len(kinds) != 1:
            raise InvalidFieldError(
                "structured_outputs",
                f"structured_outputs needs exactly one of json, json_object, regex, choice, "
                f"grammar; got {kinds or 'none'}")
        _check_bool("json_object", self.json_object)
        if isinstance(self.json, str):
            try:
                schema = json.loads(self.json)
            except ValueError as exc:
                raise InvalidFieldError("structured_outputs", f"json is not valid JSON: {exc}") \
                    from exc
            object.__setattr__(self, "json", schema)
        if self.json is not None and not isinstance(self.json, dict):
            raise InvalidFieldError("structured_outputs",
                                    f"json must be a JSON schema object, got {self.json!r:.80}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and value):
                raise InvalidFieldError("structured_outputs", f"{name} must be a non-empty string")
        if self.choice is not None and not (
                isinstance(self.choice, list | tuple) and self.choice
                and all(isinstance(c, str) and c for c in self.choice)):
            raise InvalidFieldError("structured_outputs",
                                    "choice must be a non-empty list of non-empty strings")

    @property
    def kind(self) -> str:
        """Which constraint is set: json, json_object, regex, choice or grammar."""
        if self.json_object:
            return "json_object"
        return next(k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None)


@dataclass(slots=True)
class SamplingParams:
    """Sampling parameters for one request (vLLM-compatible names and defaults).

    ``__post_init__`` validates every field (raising ``ValueError`` naming the
    field) and normalizes: ``stop`` becomes a ``list[str]``, ``stop_token_ids`` a
    ``list[int]``, ``best_of`` defaults to ``n``, ``top_k=-1`` becomes ``0`` (both
    mean "off"), and for greedy requests ``top_p``/``top_k``/``min_p`` are reset to
    their no-op values since they cannot change an argmax.

    Beam search is requested with ``use_beam_search=True`` (width ``best_of``) or
    with ``beam_width`` (which then also sets ``best_of``). Beams are expanded
    deterministically by log-probability: ``temperature``, ``top_p``, ``top_k``,
    ``min_p`` and ``seed`` are accepted but have no effect on beam search.
    """

    n: int = 1
    best_of: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    use_beam_search: bool = False
    beam_width: int | None = None
    length_penalty: float = 1.0
    early_stopping: bool = False
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured_outputs: StructuredOutputsParams | None = None
    # per-request latency targets (None: the model's default); the "slo" scheduling policy
    # and admission control read them (core/slo.py)
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None

    def __post_init__(self) -> None:
        self._check_types()
        self._check_slo()
        self._normalize_stops()
        self._resolve_best_of()
        self._check_ranges()
        self._check_structured()
        if self.top_k == -1:
            self.top_k = 0
        if self.is_greedy and not self.use_beam_search:
            # n > 1 greedy is allowed (unlike vLLM): the children are identical, which makes a
            # cheap check that forked sequences share and copy-on-write their blocks correctly
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0

    def _check_types(self) -> None:
        for name in ("n", "top_k", "min_tokens"):
            _check_int(name, getattr(self, name))
        for name in ("best_of", "seed", "beam_width", "max_tokens", "logprobs", "prompt_logprobs"):
            _check_int(name, getattr(self, name), optional=True)
        for name in (
            "temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
            "repetition_penalty", "length_penalty",
        ):
            _check_float(name, getattr(self, name))
        for name in (
            "use_beam_search", "early_stopping", "ignore_eos", "skip_special_tokens",
            "include_stop_str_in_output",
        ):
            _check_bool(name, getattr(self, name))

    def _check_slo(self) -> None:
        for name in ("slo_ttft_ms", "slo_tpot_ms"):
            value = getattr(self, name)
            if value is None:
                continue
            _check_float(name, value)
            if value <= 0:
                raise InvalidFieldError(name, f"{name} must be > 0 milliseconds, got {value}")

    def _normalize_stops(self) -> None:
        stop = self.stop
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list | tuple) or not all(isinstance(s, str) and s for s in stop):
            raise InvalidFieldError(
                "stop", f"stop must be a non-empty string or a list of them, got {stop!r}")
        self.stop = list(stop)
        ids = [] if self.stop_token_ids is None else self.stop_token_ids
        if not isinstance(ids, list | tuple) or not all(_is_int(t) and t >= 0 for t in ids):
            raise InvalidFieldError(
                "stop_token_ids",
                f"stop_token_ids must be a list of non-negative ints, got {ids!r}")
        self.stop_token_ids = list(ids)

    def _resolve_best_of(self) -> None:
        if self.beam_width is not None:
            if self.best_of is not None and self.best_of != self.beam_width:
                raise InvalidFieldError(
                    "beam_width",
                    f"beam_width must equal best_of when both are set, got "
                    f"beam_width={self.beam_width}, best_of={self.best_of}"
                )
            self.use_beam_search = True
            self.best_of = self.beam_width
        if self.best_of is None:
            self.best_of = self.n
        if self.use_beam_search:
            self.beam_width = self.best_of

    def _check_ranges(self) -> None:
        if self.n < 1:
            raise InvalidFieldError("n", f"n must be >= 1, got {self.n}")
        if self.actual_best_of < self.n:
            what = "beam_width" if self.use_beam_search else "best_of"
            raise InvalidFieldError(
                what, f"{what} must be >= n, got {what}={self.best_of}, n={self.n}")
        if self.temperature < 0:
            raise InvalidFieldError(
                "temperature", f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidFieldError("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise InvalidFieldError(
                "top_k", f"top_k must be -1, 0 (disabled) or positive, got {self.top_k}")
        _check_range("min_p", self.min_p, 0.0, 1.0)
        _check_range("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        if self.repetition_penalty <= 0:
            raise InvalidFieldError(
                "repetition_penalty",
                f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise InvalidFieldError(
                "max_tokens", f"max_tokens must be > 0 (or None), got {self.max_tokens}")
        if self.min_tokens < 0:
            raise InvalidFieldError("min_tokens", f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidFieldError(
                "min_tokens",
                f"min_tokens must be <= max_tokens, got min_tokens={self.min_tokens}, "
                f"max_tokens={self.max_tokens}"
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _check_range(name, value, 0, MAX_LOGPROBS)

    def _check_structured(self) -> None:
        spec = self.structured_outputs
        if spec is None:
            return
        if not isinstance(spec, StructuredOutputsParams):
            raise InvalidFieldError(
                "structured_outputs", "structured_outputs must be StructuredOutputsParams, "
                f"got {type(spec).__name__}")
        if self.use_beam_search:
            # beams would each need a grammar state forked and dropped with the beam
            raise InvalidFieldError(
                "structured_outputs", "structured_outputs is not supported with beam search")

    @property
    def is_greedy(self) -> bool:
        """True when the next token is the argmax (temperature below 1e-5)."""
        return self.temperature < GREEDY_TEMPERATURE_EPS

    @property
    def sampling_type(self) -> SamplingType:
        """BEAM for beam search, else GREEDY when ``is_greedy``, else RANDOM(_SEED).

        ``top_k == 1`` is *not* reported as GREEDY (the sampler still takes the
        argmax for it); the type only reflects the temperature, as in vLLM.
        """
        if self.use_beam_search:
            return SamplingType.BEAM
        if self.is_greedy:
            return SamplingType.GREEDY
        return SamplingType.RANDOM if self.seed is None else SamplingType.RANDOM_SEED

    @property
    def actual_best_of(self) -> int:
        """Number of sequences generated per request (``best_of``, never None)."""
        return self.n if self.best_of is None else self.best_of

    @property
    def stop_strings(self) -> list[str]:
        """``stop`` as a list (it always is after construction; typed for callers)."""
        assert isinstance(self.stop, list)
        return self.stop

    @property
    def stop_ids(self) -> list[int]:
        """``stop_token_ids`` as a list (it always is after construction)."""
        assert self.stop_token_ids is not None
        return self.stop_token_ids

    def clone(self) -> SamplingParams:
        """Independent copy (the list fields are not shared with the original)."""
        return dataclasses.replace(
            self, stop=list(self.stop_strings), stop_token_ids=list(self.stop_ids)
        )
