"""SLO admission control over HTTP: 503 with Retry-After and an OpenAI error body; the SLO
targets are accepted as extra request fields and reach SamplingParams."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.testclient import TestClient

from elasticserve.errors import SLOUnattainableError
from elasticserve.server.errors import install_error_handlers
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
