"""A real uvicorn server on a free loopback port, serving two tiny models plus a small-cache one.

Built once per session: engines take a moment to start, and tests leave them idle.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest.importorskip("uvicorn")
pytest.importorskip("openai")

import openai  # noqa: E402
from fastapi import FastAPI  # noqa: E402

from elasticserve.engine.args import EngineArgs  # noqa: E402
from elasticserve.engine.async_engine import AsyncEngine  # noqa: E402
from elasticserve.engine.llm_engine import LLMEngine  # noqa: E402
from elasticserve.outputs import RequestOutput  # noqa: E402
from elasticserve.sampling_params import SamplingParams  # noqa: E402
from elasticserve.server.api_server import build_app  # noqa: E402
from tests.helpers import run_until_done  # noqa: E402
from tests.uvicorn_server import serve_in_thread  # noqa: E402

# "small": a static cache of 8 blocks x 16 tokens and max_model_len 256, one sequence per step
# and one queued request at most: for 413 and 503
SMALL: dict[str, Any] = dict(kv_cache_mode="static", num_kv_blocks=8, max_model_len=256,
                             max_num_seqs=1)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from elasticserve.models.make_model import make_model

    return make_model("llama", "tiny", str(tmp_path_factory.mktemp("server") / "tiny-llama"))


@pytest.fixture(scope="session")
def engines(model_dir: str) -> Iterator[dict[str, AsyncEngine]]:
    made = {
        "tiny": AsyncEngine(LLMEngine(EngineArgs(model=model_dir)), name="tiny"),
        "tiny-b": AsyncEngine(LLMEngine(EngineArgs(model=model_dir)), name="tiny-b"),
        "small": AsyncEngine(LLMEngine(EngineArgs(model=model_dir, **SMALL)), max_queue=1,
                             name="small"),
    }
    yield made
    for engine in made.values():
        engine.shutdown()


@pytest.fixture(scope="session")
def app(engines: dict[str, AsyncEngine]) -> FastAPI:
    return build_app(engines)


@pytest.fixture(scope="session")
def finished_count(app: FastAPI) -> Callable[[str], float]:
    """finished_count(model): requests of `model` that ran to their end (aborted ones do not)."""

    def count(model: str) -> float:
        value = app.state.metrics.registry.get_sample_value(
            "elasticserve:e2e_request_latency_seconds_count", {"model_name": model})
        return value or 0.0

    return count


@pytest.fixture(scope="session")
def base_url(app: FastAPI) -> Iterator[str]:
    with serve_in_thread(app) as url:
        yield url


@pytest.fixture(scope="session")
def client(base_url: str) -> openai.OpenAI:
    # no retries: a 503 must reach the test, not be retried away
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=30)


@pytest.fixture(scope="session")
def offline(model_dir: str) -> LLMEngine:
    """The same model run without the server, for parity checks."""
    return LLMEngine(EngineArgs(model=model_dir))


@pytest.fixture(scope="session")
def run_offline(offline: LLMEngine) -> Callable[[Any, SamplingParams], RequestOutput]:
    """Run one request to the end on the offline engine."""

    def run(prompt: Any, params: SamplingParams) -> RequestOutput:
        rid = offline.add_request(prompt, params)
        out = run_until_done(offline)[rid]
        assert out.finished
        return out

    return run


def _wait_idle(engine: AsyncEngine, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.num_in_flight or engine.engine.has_unfinished_requests():
        assert time.monotonic() < deadline, f"{engine.name} still busy: {engine.engine.stats()}"
        time.sleep(0.02)
    # the elastic reclaimer may be compacting: check under its lock
    with getattr(engine.engine.kv, "lock", contextlib.nullcontext()):
        assert not engine.engine.has_unfinished_requests()
        engine.engine.check_integrity()
        assert engine.engine.stats()["blocks_used"] == 0


@pytest.fixture(scope="session")
def wait_idle() -> Callable[..., None]:
    """wait_idle(engine): wait until it holds no request, then check every block came back."""
    return _wait_idle
