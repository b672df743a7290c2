"""vLLM's side routes and HTTP details: /tokenize, /detokenize, /version, X-Request-Id, HEAD on
GET routes, and an OpenAPI schema declaring the error bodies the server really returns."""

from __future__ import annotations

from typing import cast

import httpx
import pytest
from fastapi import FastAPI

import elasticserve
from elasticserve.engine.protocol import ModelPoolClient
from elasticserve.server.admin import add_admin_routes

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello"}]


def _post(base_url: str, path: str, body: dict, **kw: object) -> httpx.Response:
    return httpx.post(f"{base_url}{path}", json=body, timeout=30, **kw)  # type: ignore[arg-type]


def test_tokenize_a_prompt_and_detokenize_it_back(base_url, offline, engines):
    text = "def main(argv):"
    resp = _post(base_url, "/tokenize", {"model": "tiny", "prompt": text})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    ids = offline.tokenizer.encode(text)
    assert body["tokens"] == ids and body["count"] == len(ids)
    assert body["max_model_len"] == engines["tiny"].max_model_len
    bare = _post(base_url, "/tokenize", {"model": "tiny", "prompt": text,
                                         "add_special_tokens": False, "return_token_strs": True})
    assert bare.json()["tokens"] == offline.tokenizer.encode(text, add_special_tokens=False)
    assert "".join(bare.json()["token_strs"]) == text
    back = _post(base_url, "/detokenize", {"model": "tiny", "tokens": bare.json()["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": text}


def test_tokenize_messages_counts_what_chat_completions_sends(client, base_url, offline):
    resp = _post(base_url, "/tokenize", {"model": "tiny", "messages": CHAT})
    assert resp.status_code == 200, resp.text
    rendered = offline.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)
    assert resp.json()["tokens"] == offline.tokenizer.encode(rendered, add_special_tokens=False)
    chat = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=1)
    assert resp.json()["count"] == chat.usage.prompt_tokens
    no_prompt = _post(base_url, "/tokenize", {"model": "tiny", "messages": CHAT,
                                              "add_generation_prompt": False})
    assert no_prompt.json()["count"] < resp.json()["count"]


def test_tokenizer_info(base_url, offline, engines):
    info = httpx.get(f"{base_url}/tokenizer_info", params={"model": "tiny"})
    assert info.status_code == 200, info.text
    body = info.json()
    tok = offline.tokenizer
    assert (body["eos_token"], body["bos_token"]) == (tok.eos_token, tok.bos_token)
    assert body["chat_template"] == tok.chat_template and body["vocab_size"] == tok.vocab_size
    assert body["max_model_len"] == engines["tiny"].max_model_len
    # three models served: which one is a 400, an unknown one a 404
    assert httpx.get(f"{base_url}/tokenizer_info").status_code == 400
    assert httpx.get(f"{base_url}/tokenizer_info", params={"model": "x"}).status_code == 404


@pytest.mark.parametrize(("path", "body", "status", "param"), [
    ("/tokenize", {"model": "tiny"}, 400, "prompt"),
    ("/tokenize", {"model": "tiny", "prompt": "x", "messages": CHAT}, 400, "prompt"),
    ("/tokenize", {"model": "tiny", "prompt": "x", "frobnicate": 1}, 400, "frobnicate"),
    ("/tokenize", {"model": "gpt-9", "prompt": "x"}, 404, "model"),
    ("/tokenize", {"prompt": "x"}, 400, "model"),  # three models served: which one?
    ("/detokenize", {"model": "tiny", "tokens": [1, 99999]}, 400, "tokens"),
    ("/detokenize", {"model": "tiny", "tokens": [-1]}, 400, "tokens"),
    ("/detokenize", {"model": "tiny", "tokens": "abc"}, 400, "tokens"),
])
def test_bad_tokenize_requests(base_url, path, body, status, param):
    resp = _post(base_url, path, body)
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["param"] == param


def test_version(base_url):
    resp = httpx.get(f"{base_url}/version")
    assert resp.status_code == 200 and resp.json() == {"version": elasticserve.__version__}


def test_request_id_is_echoed_or_made(base_url):
    sent = httpx.get(f"{base_url}/health", headers={"X-Request-Id": "abc-123"})
    assert sent.headers["x-request-id"] == "abc-123"
    made = [httpx.get(f"{base_url}/health").headers["x-request-id"] for _ in range(2)]
    assert made[0] and made[0] != made[1]
    # on errors and on completions too
    error = _post(base_url, "/v1/completions", {"model": "gpt-9", "prompt": "x"},
                  headers={"X-Request-Id": "e-1"})
    assert error.status_code == 404 and error.headers["x-request-id"] == "e-1"
    ok = _post(base_url, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 1},
               headers={"X-Request-Id": "c-1"})
    assert ok.status_code == 200 and ok.headers["x-request-id"] == "c-1"


@pytest.mark.parametrize("path", ["/health", "/v1/models", "/version", "/metrics",
                                  "/tokenizer_info?model=tiny"])
def test_head_on_get_routes_is_200_without_a_body(base_url, path):
    get = httpx.get(f"{base_url}{path}")
    head = httpx.head(f"{base_url}{path}")
    assert head.status_code == 200 == get.status_code
    assert head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]


def test_openapi_declares_the_error_bodies(base_url):
    schema = httpx.get(f"{base_url}/openapi.json").json()
    assert schema["info"]["version"] == elasticserve.__version__
    paths = schema["paths"]
    for path in ("/v1/completions", "/v1/chat/completions"):
        responses = paths[path]["post"]["responses"]
        assert {"400", "401", "404", "413", "503"} <= set(responses), path
        assert "422" not in responses  # FastAPI's default; the server answers 400
        ref = responses["400"]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/ErrorResponse")
    assert "503" in paths["/health"]["get"]["responses"]
    assert {"400", "404"} <= set(paths["/tokenize"]["post"]["responses"])
    assert "/detokenize" in paths and "/version" in paths
    assert "ErrorResponse" in schema["components"]["schemas"]


def test_openapi_declares_the_admin_error_bodies():
    app = FastAPI()
    add_admin_routes(app, cast(ModelPoolClient, object()), "token")  # the schema only
    paths = app.openapi()["paths"]
    assert "401" in paths["/admin/memory"]["get"]["responses"]
    assert {"400", "401", "404"} <= set(paths["/admin/models/{name}/limits"]["post"]["responses"])
    assert {"401", "404", "503"} <= set(paths["/admin/models/{name}/wake"]["post"]["responses"])
