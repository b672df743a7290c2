"""The OpenAI endpoints driven by the official `openai` client against a real uvicorn server."""

from __future__ import annotations

import math

import httpx
import pytest

from elasticserve.sampling_params import SamplingParams

PROMPT = "def main(argv):"
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello"}]


def test_models_lists_every_engine(client, engines):
    models = client.models.list()
    assert sorted(m.id for m in models.data) == sorted(engines)
    assert all(m.object == "model" for m in models.data)


def test_health(base_url):
    r = httpx.get(f"{base_url}/health")
    assert r.status_code == 200


def test_greedy_completion_matches_offline_engine(client, run_offline, offline):
    resp = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    ref = run_offline(PROMPT, SamplingParams(max_tokens=12, temperature=0))
    choice = resp.choices[0]
    assert choice.text == ref.outputs[0].text
    assert choice.finish_reason == ref.outputs[0].finish_reason
    assert resp.usage.prompt_tokens == len(offline.tokenizer.encode(PROMPT))
    assert resp.usage.completion_tokens == len(ref.outputs[0].token_ids)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert resp.model == "tiny" and resp.object == "text_completion"


def test_token_id_prompt_and_batch_of_prompts(client, offline):
    ids = offline.tokenizer.encode(PROMPT)
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0)
    by_text = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)
    batch = client.completions.create(model="tiny", prompt=[PROMPT, "import os"], max_tokens=6,
                                      temperature=0)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text == by_text.choices[0].text
    assert batch.usage.prompt_tokens == len(ids) + len(offline.tokenizer.encode("import os"))
    streamed = {0: "", 1: ""}
    for chunk in client.completions.create(model="tiny", prompt=[PROMPT, "import os"],
                                           max_tokens=6, temperature=0, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == {c.index: c.text for c in batch.choices}


def test_greedy_chat_matches_offline_engine(client, run_offline, offline):
    resp = client.chat.completions.create(model="tiny-b", messages=CHAT, max_tokens=10,
                                          temperature=0)
    prompt = offline.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)
    ref = run_offline(prompt, SamplingParams(max_tokens=10, temperature=0))
    msg = resp.choices[0].message
    assert msg.role == "assistant" and msg.content == ref.outputs[0].text
    assert resp.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert resp.usage.completion_tokens == len(ref.outputs[0].token_ids)
    assert resp.object == "chat.completion"


def test_streamed_completion_concatenates_to_the_greedy_text(client):
    full = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0)
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert len([c for c in chunks if c.choices]) > 1  # really streamed, token by token
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == full.choices[0].finish_reason and not any(finishes[:-1])
    # usage comes last, alone, and equals the non-streamed usage
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
    assert all(c.usage is None for c in chunks[:-1])


def test_streamed_chat_concatenates_to_the_greedy_text(client):
    full = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=16,
                                          temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=16,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage == full.usage and chunks[-1].choices == []
    assert chunks[-2].choices[0].finish_reason == full.choices[0].finish_reason


def test_n_choices_stream_like_the_non_streamed_ones(client):
    kwargs = dict(model="tiny", prompt=PROMPT, max_tokens=8, temperature=1.0, seed=7, n=2,
                  extra_body={"ignore_eos": True})
    full = client.completions.create(**kwargs)
    assert sorted(c.index for c in full.choices) == [0, 1]
    streamed = {0: "", 1: ""}
    for chunk in client.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == {c.index: c.text for c in full.choices}
    assert full.usage.completion_tokens == 16
    assert all(c.finish_reason == "length" for c in full.choices)


def test_stop_string_cuts_the_text_streamed_or_not(client):
    base = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0)
    text = base.choices[0].text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert len(stop) == 3
    cut = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0,
                                    stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16,
                                         temperature=0, stop=[stop], stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_completion_logprobs(client):
    resp = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0,
                                     logprobs=2)
    lp = resp.choices[0].logprobs
    n = resp.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n > 0
    assert "".join(lp.tokens) == resp.choices[0].text or resp.choices[0].finish_reason == "stop"
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert chosen <= 0 and 1 <= len(top) <= 2
        assert math.isclose(chosen, max(top.values()), abs_tol=1e-5)  # greedy: the best one
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_chat_logprobs_streamed_and_not(client):
    kwargs = dict(model="tiny", messages=CHAT, max_tokens=5, temperature=0, logprobs=True,
                  top_logprobs=3)
    resp = client.chat.completions.create(**kwargs)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert math.isclose(entry.logprob, entry.top_logprobs[0].logprob, abs_tol=1e-5)
        assert entry.bytes == list(entry.token.encode())
    streamed = [e for chunk in client.chat.completions.create(stream=True, **kwargs)
                for c in chunk.choices if c.logprobs for e in c.logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]


def test_metrics_have_every_family_per_model(client, base_url):
    client.completions.create(model="tiny-b", prompt=PROMPT, max_tokens=4, temperature=0)
    text = httpx.get(f"{base_url}/metrics").text
    for name in ("num_requests_running", "num_requests_waiting", "num_requests_swapped",
                 "kv_mapped_bytes", "kv_used_bytes", "num_preemptions_total",
                 "prompt_tokens_total", "generation_tokens_total", "kv_cache_usage_perc",
                 "kv_pages_granted_total", "prefix_cache_queries_total",
                 "prefix_cache_hits_total"):
        assert f'elasticserve:{name}{{model_name="tiny-b"}}' in text, name
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds",
                 "time_per_output_token_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds", "request_prefill_time_seconds",
                 "request_decode_time_seconds", "request_inference_time_seconds",
                 "request_prompt_tokens", "request_generation_tokens", "iteration_tokens_total"):
        assert f'elasticserve:{name}_count{{model_name="tiny-b"}}' in text, name
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines()
                   if line and not line.startswith("#"))
    assert float(samples['elasticserve:generation_tokens_total{model_name="tiny-b"}']) >= 4
    assert float(samples['elasticserve:e2e_request_latency_seconds_count{model_name="tiny-b"}']) >= 1
    assert float(samples['elasticserve:kv_mapped_bytes{model_name="tiny-b"}']) > 0


@pytest.mark.parametrize("model", ["tiny", "tiny-b"])
def test_engines_idle_and_intact_after_the_api_tests(engines, wait_idle, model):
    wait_idle(engines[model])
