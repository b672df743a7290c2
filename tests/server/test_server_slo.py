"""SLO admission control over HTTP: 503 with Retry-After and an OpenAI error body, for a
streamed request too (before its stream starts); the SLO targets are accepted as extra request
fields and reach SamplingParams."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from elasticserve.engine.args import EngineArgs
from elasticserve.engine.async_engine import AsyncEngine
from elasticserve.engine.llm_engine import LLMEngine
from elasticserve.errors import SLOUnattainableError
from elasticserve.server.api_server import build_app
from elasticserve.server.errors import install_error_handlers
from elasticserve.server.options import ServeOptions
from elasticserve.server.protocol import CompletionRequest


def test_unattainable_slo_is_503_with_retry_after() -> None:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/late")
    async def late() -> None:
        raise SLOUnattainableError("predicted 3000 ms > slo_ttft_ms=100", retry_after_s=3)

    resp = TestClient(app).get("/late")
    assert resp.status_code == 503
    assert resp.headers["Retry-After"] == "3"
    err = resp.json()["error"]
    assert err["code"] == "slo_unattainable" and "slo_ttft_ms" in err["message"]


def test_slo_fields_reach_sampling_params() -> None:
    req = CompletionRequest(prompt="hi", slo_ttft_ms=250, slo_tpot_ms=40.5)
    params = req.sampling_params()
    assert (params.slo_ttft_ms, params.slo_tpot_ms) == (250, 40.5)
    assert req.unsupported_fields() == []


@pytest.fixture(scope="module")
def slo_engine(model_dir: str) -> Iterator[AsyncEngine]:
    # a step predicted at 1 s: a 50 ms TTFT target cannot be met, no target always can
    args = EngineArgs(model=model_dir, admission="slo", slo_step_cost=(1.0, 0.0, 0.0))
    engine = AsyncEngine(LLMEngine(args), name="tiny")
    yield engine
    engine.shutdown()


STREAMS = [("/v1/completions", {"prompt": "Hello there"}),
           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello"}]})]


@pytest.mark.parametrize(("path", "body"), STREAMS)
def test_a_refused_stream_is_503_before_the_stream_starts(
        slo_engine: AsyncEngine, path: str, body: dict[str, Any]) -> None:
    app = build_app({"tiny": slo_engine}, options=ServeOptions(admission="slo"))
    with TestClient(app) as client:
        late = {**body, "stream": True, "max_tokens": 4, "slo_ttft_ms": 50}
        with client.stream("POST", path, json=late) as resp:
            assert resp.status_code == 503
            assert resp.headers["content-type"].startswith("application/json")
            assert int(resp.headers["Retry-After"]) >= 1
            err = json.loads(resp.read())["error"]
        assert err["code"] == "slo_unattainable" and "slo_ttft_ms=50" in err["message"]
        # admitted (no target): held until its first token, then the whole stream
        with client.stream("POST", path, json={**body, "stream": True, "max_tokens": 4}) as resp:
            assert resp.status_code == 200
            events = [line for line in resp.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and len(events) >= 3
        assert not any('"error"' in e for e in events)
    assert slo_engine.num_in_flight == 0


def test_without_hold_a_refused_stream_starts_then_fails(slo_engine: AsyncEngine) -> None:
    """What `ServeOptions.admission="slo"` changes: otherwise the refusal is an error event."""
    with TestClient(build_app({"tiny": slo_engine})) as client:
        late = {"prompt": "Hello", "stream": True, "max_tokens": 4, "slo_ttft_ms": 50}
        with client.stream("POST", "/v1/completions", json=late) as resp:
            assert resp.status_code == 200
            text = resp.read().decode()
        assert "slo_ttft_ms=50" in text and text.rstrip().endswith("data: [DONE]")


def test_serve_options_admission_is_checked() -> None:
    with pytest.raises(ValueError, match="admission"):
        ServeOptions(admission="fast")
