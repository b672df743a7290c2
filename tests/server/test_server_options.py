"""One served model with vLLM's serve options: `model` optional, other names (--served-model-name,
the model's path), --api-key, --allowed-origins (CORS) and --chat-template."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from elasticserve.engine.args import EngineArgs
from elasticserve.engine.async_engine import AsyncEngine
from elasticserve.engine.llm_engine import LLMEngine
from elasticserve.server.api_server import build_app
from elasticserve.server.options import ModelNames, ServeOptions, load_chat_template
from tests.uvicorn_server import serve_in_thread

KEY = "sk-test-key"
ORIGIN = "http://notebook.example"
TEMPLATE = "{% for m in messages %}<<{{ m.role }}>>{{ m.content }}\n{% endfor %}ANSWER:"
CHAT = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def solo(model_dir: str) -> Iterator[AsyncEngine]:
    # its own engine: an app installs its metrics observer on the engines it serves
    engine = AsyncEngine(LLMEngine(EngineArgs(model=model_dir)), name="solo")
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def url(solo: AsyncEngine, model_dir: str) -> Iterator[str]:
    options = ServeOptions(api_key=KEY, allowed_origins=(ORIGIN,), chat_template=TEMPLATE,
                           aliases={"solo-alias": "solo", model_dir: "solo"})
    with serve_in_thread(build_app({"solo": solo}, options=options)) as base:
        yield base


def _auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_model_is_optional_and_aliases_answer_under_the_served_name(url, model_dir):
    for model in (None, "solo", "solo-alias", model_dir):
        body = {"prompt": "x", "max_tokens": 1, **({"model": model} if model else {})}
        resp = httpx.post(f"{url}/v1/completions", json=body, headers=_auth(), timeout=30)
        assert resp.status_code == 200, (model, resp.text)
        assert resp.json()["model"] == "solo"
    unknown = httpx.post(f"{url}/v1/completions", json={"model": "other", "prompt": "x"},
                         headers=_auth(), timeout=30)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    listed = httpx.get(f"{url}/v1/models", headers=_auth()).json()["data"]
    assert [(m["id"], m["root"]) for m in listed] == [("solo", "solo"), ("solo-alias", "solo"),
                                                      (model_dir, "solo")]
    tokens = httpx.post(f"{url}/tokenize", json={"prompt": "x"}, timeout=30)
    assert tokens.status_code == 200  # /tokenize is outside /v1: no key, as in vLLM


def test_lm_eval_remote_tokenizer_probe(url, solo):
    # lm_eval.utils.check_remote_tokenizer_support, then RemoteTokenizer.encode / decode: no
    # model named, no key (the routes are outside /v1)
    info = httpx.get(f"{url}/tokenizer_info").json()
    assert info["eos_token"] == solo.tokenizer.eos_token and info["chat_template"] == TEMPLATE
    ids = httpx.post(f"{url}/tokenize", json={"prompt": "test", "add_special_tokens": False}
                     ).json()["tokens"]
    assert ids == solo.tokenizer.encode("test", add_special_tokens=False)
    assert httpx.post(f"{url}/detokenize", json={"tokens": ids}).json() == {"prompt": "test"}


def test_api_key_guards_v1_routes(url):
    for headers in ({}, _auth("wrong"), {"Authorization": KEY}):
        resp = httpx.get(f"{url}/v1/models", headers=headers)
        assert resp.status_code == 401
        error = resp.json()["error"]
        assert error["code"] == "invalid_api_key" and error["type"] == "authentication_error"
    assert httpx.get(f"{url}/health").status_code == 200  # probes need no key
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=30)
    assert [m.id for m in client.models.list().data][0] == "solo"


def test_cors_preflight_and_headers(url):
    preflight = httpx.options(f"{url}/v1/completions", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in preflight.headers["access-control-allow-methods"]
    # a browser can read a 401 (and the request id) from an allowed origin
    denied = httpx.get(f"{url}/v1/models", headers={"Origin": ORIGIN})
    assert denied.status_code == 401
    assert denied.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.options(f"{url}/v1/models", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "GET"})
    assert "access-control-allow-origin" not in other.headers


def test_chat_template_replaces_the_models_own(url, solo):
    resp = httpx.post(f"{url}/v1/chat/completions", headers=_auth(), timeout=30,
                      json={"messages": CHAT, "max_tokens": 1})
    assert resp.status_code == 200, resp.text
    rendered = "<<user>>Hello\nANSWER:"
    expected = solo.tokenizer.encode(rendered, add_special_tokens=False)
    assert resp.json()["usage"]["prompt_tokens"] == len(expected)
    tokens = httpx.post(f"{url}/tokenize", json={"messages": CHAT}, timeout=30).json()
    assert tokens["tokens"] == expected


def test_load_chat_template_from_file_or_inline(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text(TEMPLATE)
    assert load_chat_template(str(path)) == TEMPLATE
    assert load_chat_template(TEMPLATE) == TEMPLATE
    with pytest.raises(ValueError, match="neither a file nor"):
        load_chat_template(str(tmp_path / "missing.jinja"))


def test_model_names_reject_bad_aliases():
    names = ModelNames(["a", "b"], {"x": "a"})
    assert names.resolve("x") == "a" and names.resolve("b") == "b"
    with pytest.raises(ValueError, match="not served"):
        ModelNames(["a"], {"x": "zzz"})
    with pytest.raises(ValueError, match="already a served"):
        ModelNames(["a", "b"], {"b": "a"})


def test_solo_engine_idle_and_intact(url, solo, wait_idle):
    wait_idle(solo)
