"""The server needs nothing from an engine beyond `EngineClient`: a fake that implements only
that Protocol (no LLMEngine, no AsyncEngine) is served end to end over HTTP."""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from elasticserve.engine.protocol import (
    EngineClient,
    EnginePrompt,
    OutputObserver,
    RequestTiming,
)
from elasticserve.errors import PromptTooLargeError
from elasticserve.outputs import CompletionOutput, RequestOutput, StepStats
from elasticserve.sampling_params import SamplingParams
from elasticserve.server.api_server import build_app
from tests.uvicorn_server import serve_in_thread


class CharTokenizer:
    """One token per character (its code point)."""

    vocab_size = 0x110000
    bos_token = eos_token = chat_template = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)

    def apply_chat_template(self, messages: list[dict[str, Any]],
                            add_generation_prompt: bool = True, **kwargs: Any) -> str:
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "


class ShoutingEngine:
    """'Generates' its prompt's last line upper-cased, one character per output."""

    observer: OutputObserver | None = None

    def __init__(self) -> None:
        self.name = "shout"
        self.max_model_len = 64
        self.tokenizer = CharTokenizer()
        self.running = False
        self.submitted: list[str] = []
        self.arrivals: list[tuple[float | None, float]] = []  # (arrival_time, generate called)

    def start(self) -> None:
        self.running = True

    def health(self) -> str | None:
        return None if self.running else "not started"

    def validate(self, prompt: EnginePrompt, params: SamplingParams
                 ) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        ids = prompt["prompt_token_ids"]
        if len(ids) > self.max_model_len:
            raise PromptTooLargeError("prompt", "prompt is too long for the shouting engine")
        return prompt.get("prompt"), ids

    async def generate(self, prompt: EnginePrompt, params: SamplingParams,
                       request_id: str | None = None, priority: int = 0,
                       stream: bool = False, arrival_time: float | None = None
                       ) -> AsyncIterator[RequestOutput]:
        text, ids = self.validate(prompt, params)
        rid = request_id or "r"
        self.submitted.append(rid)
        self.arrivals.append((arrival_time, time.monotonic()))
        timing = RequestTiming(arrival_time if arrival_time is not None else time.monotonic())
        answer = self.tokenizer.decode(ids).splitlines()[-1].upper()
        for end in range(1, len(answer) + 1):
            done = end == len(answer)
            comp = CompletionOutput(0, answer[:end], [ord(c) for c in answer[:end]], None, None,
                                    "stop" if done else None)
            out = RequestOutput(rid, text, ids, None, [comp], finished=done)
            if self.observer is not None:
                # one "step" per character: the plain data a worker-process client would relay
                now = time.monotonic()
                step = StepStats(now, now, len(ids) if end == 1 else 1,
                                 len(ids) if end == 1 else 0, 0, 0, {rid: 1})
                self.observer.on_step(step, {rid: timing})
                self.observer.on_output(out, timing, now)
            if stream or done:
                yield out

    def abort(self, request_id: str) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        return {"num_running": 0, "num_waiting": 0, "num_swapped": 0, "preemptions": 0,
                "sleeps": 0, "wakes": 0}

    def memory_stats(self) -> dict[str, int]:
        return {"kv_mapped_bytes": 4096, "kv_used_bytes": 0, "grow_events": 1,
                "shrink_events": 0, "pages_granted": 1, "pages_reclaimed": 0}

    def config_info(self) -> dict[str, str]:
        return {"block_size": "1", "kv_cache_mode": "none"}

    def shutdown(self, timeout: float = 10.0) -> None:
        self.running = False


@pytest.fixture(scope="module")
def fake() -> ShoutingEngine:
    return ShoutingEngine()


@pytest.fixture(scope="module")
def url(fake: ShoutingEngine) -> Iterator[str]:
    engines: dict[str, EngineClient] = {"shout": fake}
    with serve_in_thread(build_app(engines)) as base:
        yield base


def test_the_fake_is_an_engine_client(fake: ShoutingEngine) -> None:
    assert isinstance(fake, EngineClient)
    assert not hasattr(fake, "engine")  # nothing for the server to reach through


def test_a_completion_goes_through_the_fake(url: str, fake: ShoutingEngine) -> None:
    resp = httpx.post(f"{url}/v1/completions", json={"model": "shout", "prompt": "hello"},
                      timeout=30)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["choices"][0]["text"] == "HELLO"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}
    assert fake.submitted[-1].startswith(body["id"])
    # the server passed on when it received the request: latencies count from there
    arrival, called = fake.arrivals[-1]
    assert arrival is not None and arrival <= called
    # the server's metrics observed the fake's outputs
    metrics = httpx.get(f"{url}/metrics").text
    count = re.search(r'e2e_request_latency_seconds_count\{model_name="shout"\} (\S+)', metrics)
    assert count is not None and float(count.group(1)) >= 1
    # ... and its steps: every generated character counted, one first token, four gaps
    assert 'elasticserve:generation_tokens_total{model_name="shout"} 5.0' in metrics
    assert 'elasticserve:time_to_first_token_seconds_count{model_name="shout"} 1.0' in metrics
    assert 'elasticserve:inter_token_latency_seconds_count{model_name="shout"} 4.0' in metrics


def test_a_streamed_chat_uses_the_clients_tokenizer(url: str) -> None:
    body = {"model": "shout", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as resp:
        assert resp.status_code == 200
        events = [line for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[1:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == "ASSISTANT: "  # the template's last line, shouted


def test_an_error_from_the_client_keeps_its_status_and_field(url: str) -> None:
    resp = httpx.post(f"{url}/v1/completions", json={"model": "shout", "prompt": [65] * 65},
                      timeout=30)
    assert resp.status_code == 413
    error = resp.json()["error"]
    assert error["param"] == "prompt" and error["code"] == "context_length_exceeded"


def test_info_routes_and_metrics_read_only_the_protocol(url: str, fake: ShoutingEngine) -> None:
    models = httpx.get(f"{url}/v1/models").json()["data"]
    assert [(m["id"], m["max_model_len"]) for m in models] == [("shout", 64)]
    assert httpx.get(f"{url}/health").status_code == 200
    metrics = httpx.get(f"{url}/metrics").text
    assert 'elasticserve:kv_mapped_bytes{model_name="shout"} 4096.0' in metrics
    assert 'elasticserve:kv_grow_events_total{model_name="shout"} 1.0' in metrics
    assert ('elasticserve:cache_config_info{block_size="1",kv_cache_mode="none",'
            'model_name="shout"} 1.0') in metrics
    fake.shutdown()
    try:
        assert httpx.get(f"{url}/health").status_code == 503
    finally:
        fake.start()
