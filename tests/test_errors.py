"""Request-field errors carry their field, through pickling too (a worker process raises them)."""

from __future__ import annotations

import pickle

import pytest

from elasticserve.errors import InvalidFieldError, PromptTooLargeError


@pytest.mark.parametrize("cls", [InvalidFieldError, PromptTooLargeError])
def test_field_and_message_survive_pickling(cls: type[InvalidFieldError]) -> None:
    exc = cls("top_p", "top_p must be in (0, 1], got 0")
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is cls
    assert back.param == "top_p" and str(back) == "top_p must be in (0, 1], got 0"


def test_they_are_value_errors() -> None:
    # callers that only know ValueError (the offline LLM API, older code) still catch them
    assert issubclass(PromptTooLargeError, InvalidFieldError)
    assert issubclass(InvalidFieldError, ValueError)
