"""vLLM's metric set, read over HTTP from GET /metrics of the session's server: token counters
and inter-token latency move every step, TTFT counts from arrival at the server, finish reasons,
prefix cache queries/hits and tokens per step are counted as vLLM counts them."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from elasticserve.outputs import RequestOutput
from elasticserve.sampling_params import SamplingParams
from elasticserve.server.metrics import one_two_five


def scrape(base_url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of GET /metrics: (name, labels) -> value."""
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
          model: str, **labels: str) -> float:
    key = (f"elasticserve:{name}", frozenset({"model_name": model, **labels}.items()))
    return samples.get(key, 0.0)


def test_generation_tokens_and_itl_move_while_a_long_request_runs(
        client: openai.OpenAI, base_url: str, wait_idle: Callable[..., None],
        engines: dict[str, Any]) -> None:
    # issue 10: 8 long requests left generation_tokens_total flat until they finished
    before = scrape(base_url)
    done = threading.Event()

    def long_request() -> None:
        client.completions.create(model="tiny", prompt="x = [", max_tokens=1500, temperature=0,
                                  extra_body={"ignore_eos": True})
        done.set()

    thread = threading.Thread(target=long_request)
    thread.start()
    seen_mid_run = None
    deadline = time.monotonic() + 60
    while not done.is_set() and time.monotonic() < deadline:
        now = scrape(base_url)
        finished = value(now, "e2e_request_latency_seconds_count", "tiny") \
            - value(before, "e2e_request_latency_seconds_count", "tiny")
        generated = value(now, "generation_tokens_total", "tiny") \
            - value(before, "generation_tokens_total", "tiny")
        gaps = value(now, "inter_token_latency_seconds_count", "tiny") \
            - value(before, "inter_token_latency_seconds_count", "tiny")
        if not finished and generated >= 50 and gaps >= 49:
            seen_mid_run = (generated, gaps)
            break
        time.sleep(0.02)
    thread.join(60)
    assert seen_mid_run is not None, "counters did not move before the request finished"
    after = scrape(base_url)
    total = value(after, "generation_tokens_total", "tiny") \
        - value(before, "generation_tokens_total", "tiny")
    assert total == 1500
    assert value(after, "inter_token_latency_seconds_count", "tiny") \
        - value(before, "inter_token_latency_seconds_count", "tiny") == 1499
    wait_idle(engines["tiny"])


def test_ttft_counts_from_arrival_and_covers_the_queue(
        client: openai.OpenAI, base_url: str, wait_idle: Callable[..., None],
        engines: dict[str, Any]) -> None:
    # "small" runs one sequence at a time: the second request queues behind the first
    names = ("time_to_first_token_seconds", "request_queue_time_seconds",
             "request_prefill_time_seconds", "request_decode_time_seconds",
             "request_inference_time_seconds", "e2e_request_latency_seconds")
    before = scrape(base_url)
    results: list[Any] = []

    def run() -> None:
        results.append(client.completions.create(
            model="small", prompt="x = [", max_tokens=100, temperature=0,
            extra_body={"ignore_eos": True}))

    second = threading.Thread(target=run)
    stream = client.completions.create(model="small", prompt="x = [", max_tokens=100,
                                       temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    chunks = iter(stream)
    next(chunks)  # the first request is running (one sequence per step: the next one queues)
    # Hold its step loop between steps while the second request arrives, so the second one
    # queues for sure: 99 tiny-model steps may take less than an HTTP round trip.
    with engines["small"].engine.kv.lock:
        second.start()
        time.sleep(0.5)
    results.append(list(chunks))
    second.join(60)
    assert len(results) == 2
    after = scrape(base_url)
    count = {n: value(after, f"{n}_count", "small") - value(before, f"{n}_count", "small")
             for n in names}
    total = {n: value(after, f"{n}_sum", "small") - value(before, f"{n}_sum", "small")
             for n in names}
    assert set(count.values()) == {2.0}, count
    # the queued request waited for the other's ~100 steps: its queue time shows it, and TTFT
    # (from arrival at the server) includes it
    assert total["request_queue_time_seconds"] > total["request_prefill_time_seconds"]
    assert total["time_to_first_token_seconds"] >= total["request_queue_time_seconds"]
    assert total["time_to_first_token_seconds"] == pytest_approx(
        total["request_queue_time_seconds"] + total["request_prefill_time_seconds"])
    assert total["e2e_request_latency_seconds"] >= total["time_to_first_token_seconds"] \
        + total["request_decode_time_seconds"] - 1e-6
    assert total["request_inference_time_seconds"] == pytest_approx(
        total["request_prefill_time_seconds"] + total["request_decode_time_seconds"])
    wait_idle(engines["small"])


def pytest_approx(x: float) -> Any:
    return pytest.approx(x, rel=1e-6, abs=1e-6)


def test_request_success_counts_finish_reasons(
        client: openai.OpenAI, base_url: str,
        run_offline: Callable[[Any, SamplingParams], RequestOutput]) -> None:
    prompt = "def main():"
    greedy = run_offline(prompt, SamplingParams(max_tokens=6, temperature=0))
    stop_at = greedy.outputs[0].token_ids[2]
    before = scrape(base_url)
    length = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0)
    stop = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0,
                                     extra_body={"stop_token_ids": [stop_at]})
    assert (length.choices[0].finish_reason, stop.choices[0].finish_reason) == ("length", "stop")
    after = scrape(base_url)
    for reason in ("length", "stop"):
        assert value(after, "request_success_total", "tiny", finished_reason=reason) \
            - value(before, "request_success_total", "tiny", finished_reason=reason) == 1
    prompt_len = length.usage.prompt_tokens
    assert value(after, "request_prompt_tokens_count", "tiny") \
        - value(before, "request_prompt_tokens_count", "tiny") == 2
    assert value(after, "request_prompt_tokens_sum", "tiny") \
        - value(before, "request_prompt_tokens_sum", "tiny") == 2 * prompt_len
    assert value(after, "request_generation_tokens_sum", "tiny") \
        - value(before, "request_generation_tokens_sum", "tiny") \
        == length.usage.completion_tokens + stop.usage.completion_tokens


def test_prefix_cache_hits_grow_when_a_prompt_repeats(client: openai.OpenAI,
                                                      base_url: str) -> None:
    prompt = f"# {uuid.uuid4().hex}\n" + "def fibonacci(n):\n    return n\n" * 4
    before = scrape(base_url)
    first = client.completions.create(model="tiny-b", prompt=prompt, max_tokens=2)
    middle = scrape(base_url)
    client.completions.create(model="tiny-b", prompt=prompt, max_tokens=2)
    after = scrape(base_url)
    prompt_len = first.usage.prompt_tokens
    assert prompt_len > 32  # at least two full blocks of 16

    def delta(a: Any, b: Any, name: str) -> float:
        return value(b, name, "tiny-b") - value(a, name, "tiny-b")

    # queries count every looked-up token (vLLM v1); a new prompt hits nothing
    assert delta(before, middle, "prefix_cache_queries_total") == prompt_len
    assert delta(before, middle, "prefix_cache_hits_total") == 0
    assert delta(middle, after, "prefix_cache_queries_total") == prompt_len
    assert delta(middle, after, "prefix_cache_hits_total") == prompt_len // 16 * 16 \
        or delta(middle, after, "prefix_cache_hits_total") == (prompt_len - 1) // 16 * 16


def test_iteration_tokens_bucket_the_tokens_of_each_step(client: openai.OpenAI,
                                                         base_url: str) -> None:
    prompt = f"# {uuid.uuid4().hex}"  # uncached: the prefill is one step of the whole prompt
    before = scrape(base_url)
    resp = client.completions.create(model="tiny-b", prompt=prompt, max_tokens=4,
                                     extra_body={"ignore_eos": True})
    after = scrape(base_url)
    prompt_len = resp.usage.prompt_tokens

    def bucket(le: float) -> float:
        return value(after, "iteration_tokens_total_bucket", "tiny-b", le=str(float(le))) \
            - value(before, "iteration_tokens_total_bucket", "tiny-b", le=str(float(le)))

    # one prefill step of prompt_len tokens, then three decode steps of one token each
    upper = next(b for b in (1, 8, 16, 32, 64, 128) if b >= prompt_len)
    assert bucket(1) == 3
    assert bucket(upper) == 4 and bucket(16384) == 4
    assert value(after, "iteration_tokens_total_sum", "tiny-b") \
        - value(before, "iteration_tokens_total_sum", "tiny-b") == prompt_len + 3


def test_vllm_gauges_and_cache_info(base_url: str, engines: dict[str, Any]) -> None:
    samples = scrape(base_url)
    usage = value(samples, "kv_cache_usage_perc", "small")
    assert 0.0 <= usage <= 1.0
    info = [dict(labels) for (name, labels) in samples
            if name == "elasticserve:cache_config_info" and ("model_name", "small") in labels]
    assert len(info) == 1
    assert info[0]["block_size"] == "16" and info[0]["kv_cache_mode"] == "static"
    assert value(samples, "kv_pages_granted_total", "tiny") >= 1


def test_token_buckets_are_vllms_one_two_five() -> None:
    assert one_two_five(100) == (1, 2, 5, 10, 20, 50, 100)
    assert one_two_five(2048)[-1] == 2000
