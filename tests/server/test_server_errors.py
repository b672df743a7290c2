"""Bad requests get OpenAI error bodies with the right status, and the server keeps serving."""

from __future__ import annotations

import httpx
import openai
import pytest

from elasticserve.errors import InvalidFieldError, PromptTooLargeError
from elasticserve.server.errors import from_value_error


def _post(base_url: str, path: str, body: object) -> httpx.Response:
    if isinstance(body, str | bytes):
        return httpx.post(f"{base_url}{path}", content=body,
                          headers={"content-type": "application/json"}, timeout=30)
    return httpx.post(f"{base_url}{path}", json=body, timeout=30)


def _error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    return error


@pytest.mark.parametrize("body", ['{"model": "tiny", "prompt": ', b"\xff\xfe", "[1, 2]", "null"])
def test_malformed_json_is_400(base_url, body):
    error = _error(_post(base_url, "/v1/completions", body), 400)
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "tiny", "prompt": "x", "max_tokens": "five"}, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "max_tokens": -3}, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "temperature": -1}, "temperature"),
    ({"model": "tiny", "prompt": "x", "top_p": 0}, "top_p"),
    ({"model": "tiny", "prompt": "x", "n": True}, "n"),
    ({"model": "tiny", "prompt": "x", "logprobs": 50}, "logprobs"),
    ({"model": "tiny", "prompt": 42}, "prompt"),
    ({"model": "tiny", "prompt": ""}, "prompt"),
    ({"model": "tiny", "prompt": [1, 2, 99999]}, "prompt_token_ids"),
    ({"model": "tiny", "prompt": "x", "n": 2, "best_of": 1}, "best_of"),
    ({"model": "tiny", "prompt": "x", "n": 2, "best_of": 3, "stream": True}, "best_of"),
    ({"model": "tiny", "prompt": "x", "min_tokens": 9, "max_tokens": 3}, "min_tokens"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "suffix": "y"}, "suffix"),
    ({"prompt": "x"}, "model"),
])
def test_bad_completion_parameters_are_400_naming_the_field(base_url, body, param):
    assert _error(_post(base_url, "/v1/completions", body), 400)["param"] == param


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "tiny", "messages": []}, "messages"),
    ({"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"model": "tiny", "messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "logprobs": True,
      "top_logprobs": 99}, "top_logprobs"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
     "max_tokens"),
])
def test_bad_chat_parameters_are_400_naming_the_field(base_url, body, param):
    assert _error(_post(base_url, "/v1/chat/completions", body), 400)["param"] == param


def test_unknown_model_is_404(base_url, client):
    for stream in (False, True):
        body = {"model": "gpt-9", "prompt": "x", "stream": stream}
        error = _error(_post(base_url, "/v1/completions", body), 404)
        assert error["code"] == "model_not_found" and error["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])


def test_prompt_longer_than_max_model_len_is_413(base_url, client):
    # "small" has max_model_len=256
    error = _error(_post(base_url, "/v1/completions", {"model": "small", "prompt": [5] * 300}), 413)
    assert error["code"] == "context_length_exceeded" and "max_model_len" in error["message"]
    assert error["param"] == "prompt"
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(model="small", prompt=[5] * 300)
    assert info.value.status_code == 413


def test_prompt_larger_than_the_kv_cache_is_413(base_url):
    # "small" holds 8 blocks of 16 tokens: 200 tokens fit max_model_len but never the cache
    error = _error(_post(base_url, "/v1/completions", {"model": "small", "prompt": [5] * 200}), 413)
    assert "KV" in error["message"]


def test_overload_is_503_and_clears(base_url, client, engines, wait_idle):
    # "small" runs one sequence and queues one more; a third concurrent request is refused
    body = {"model": "small", "prompt": "x", "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=base_url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=body) as first, \
                http.stream("POST", "/v1/completions", json=body) as second:
            assert first.status_code == second.status_code == 200
            with pytest.raises(openai.InternalServerError) as info:
                client.completions.create(model="small", prompt="x", max_tokens=2)
            assert info.value.status_code == 503
            assert isinstance(info.value.body, dict) and info.value.body["code"] == "overloaded"
    wait_idle(engines["small"])
    ok = client.completions.create(model="small", prompt="x", max_tokens=2)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_server_keeps_serving_after_errors(base_url, client):
    for _ in range(3):
        _post(base_url, "/v1/completions", "{not json")
        _post(base_url, "/v1/chat/completions", {"model": "nope", "messages": []})
    assert httpx.get(f"{base_url}/health").status_code == 200
    resp = client.completions.create(model="tiny", prompt="import", max_tokens=3, temperature=0)
    assert resp.usage.completion_tokens >= 1


def test_param_comes_from_the_error_not_its_message():
    # a plain ValueError names no field, even when its message starts with one
    assert from_value_error(ValueError("temperature must be >= 0")).param is None
    exc = InvalidFieldError("logprobs", "a message naming no field")
    assert from_value_error(exc).param == "logprobs"
    assert from_value_error(exc, {"logprobs": "top_logprobs"}).param == "top_logprobs"
    big = from_value_error(PromptTooLargeError("prompt", "too long"), {"prompt": "messages"})
    assert (big.status, big.param, big.code) == (413, "messages", "context_length_exceeded")
