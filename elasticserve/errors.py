"""Errors about a request's input that every layer shares. Torch-free.

They name the offending field themselves, so a server can report it (OpenAI's `param`) without
parsing the message, and they survive pickling, so an engine in another process can raise them
and its client re-raise them unchanged.
"""

from __future__ import annotations


class InvalidFieldError(ValueError):
    """A request field has a bad value; `param` is the field's name (e.g. "temperature")."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param

    def __reduce__(self) -> tuple[type[InvalidFieldError], tuple[str, str]]:
        # the default rebuilds from self.args == (message,) and would lose `param`
        return type(self), (self.param, str(self))


class PromptTooLargeError(InvalidFieldError):
    """The request can never fit: longer than max_model_len, or than the whole KV cache."""


def check_unicode(param: str, text: str) -> None:
    """Raise InvalidFieldError unless `text` is valid Unicode: JSON's "\\ud800" escapes decode to
    lone surrogates, which no tokenizer (and no UTF-8 encoder) accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidFieldError(
            param, f"{param} is not valid Unicode: lone surrogate {text[exc.start]!r} at "
                   f"character {exc.start}") from None


class SLOUnattainableError(RuntimeError):
    """Admission control (``admission="slo"``) refused a request: the queue ahead of it makes
    its predicted time to first token exceed its target. Not a ValueError: the request is fine,
    the engine is busy; a server answers 503 with ``Retry-After: retry_after_s``."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple[type[SLOUnattainableError], tuple[str, int]]:
        # a worker process raises it and its client re-raises it with `retry_after_s`
        return type(self), (str(self), self.retry_after_s)
