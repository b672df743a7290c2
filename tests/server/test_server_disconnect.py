"""Clients that go away get their requests aborted; many concurrent streams all complete."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

# a request that runs for seconds if nobody aborts it; `finished_count` tells which happened
LONG = {"max_tokens": 2000, "ignore_eos": True, "temperature": 0}


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/completions", {"model": "tiny", "prompt": "while True:"}),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "go"}]}),
])
def test_stream_closed_early_aborts_the_request(base_url, engines, wait_idle, finished_count,
                                               path, body):
    engine = engines["tiny"]
    finished = finished_count("tiny")
    with httpx.Client(base_url=base_url, timeout=30) as http:
        with http.stream("POST", path, json={**body, **LONG, "stream": True}) as resp:
            assert resp.status_code == 200
            events = (line for line in resp.iter_lines() if line.startswith("data: "))
            next(events), next(events)  # chat's first event (the role) precedes any step
            assert engine.engine.has_unfinished_requests() and engine.num_in_flight == 1
    wait_idle(engine, timeout=10)
    assert finished_count("tiny") == finished  # it was aborted, it did not run to its end


def test_non_streamed_client_timeout_aborts_the_request(base_url, engines, wait_idle,
                                                        finished_count):
    engine = engines["tiny-b"]
    finished = finished_count("tiny-b")
    body = {"model": "tiny-b", "prompt": "for x in y:", **LONG}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base_url}/v1/completions", json=body, timeout=0.5)
    wait_idle(engine, timeout=10)
    assert finished_count("tiny-b") == finished


def test_abandoned_stream_leaves_the_server_usable(client, engines, wait_idle, finished_count):
    finished = finished_count("tiny")
    stream = client.completions.create(model="tiny", prompt="x = [", stream=True, max_tokens=2000,
                                       temperature=0, extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()
    wait_idle(engines["tiny"], timeout=10)
    assert finished_count("tiny") == finished
    resp = client.completions.create(model="tiny", prompt="x = [", max_tokens=3, temperature=0)
    assert resp.choices[0].text and finished_count("tiny") == finished + 1


def test_concurrent_streams_over_two_models(base_url, engines, wait_idle):
    async def one(aclient: openai.AsyncOpenAI, i: int) -> tuple[str, str, str | None]:
        model = ("tiny", "tiny-b")[i % 2]
        stream = await aclient.completions.create(
            model=model, prompt=f"def f{i}(x):", max_tokens=8, temperature=0.7, seed=i,
            stream=True)
        text, finish = "", None
        async for chunk in stream:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        return model, text, finish

    async def main() -> list[tuple[str, str, str | None]]:
        aclient = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0,
                                     timeout=60)
        async with aclient:
            return await asyncio.gather(*(one(aclient, i) for i in range(32)))

    results = asyncio.run(main())
    assert len(results) == 32
    assert all(finish in ("stop", "length") for _, _, finish in results)
    assert sum(1 for _, text, _ in results if text) >= 28  # an immediate EOS is possible, rarely
    for name in ("tiny", "tiny-b"):
        wait_idle(engines[name])
