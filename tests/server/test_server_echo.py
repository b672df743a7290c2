"""`echo` + `logprobs` on /v1/completions, driven with the exact bodies lm-evaluation-harness
0.4's `local-completions` model sends (without installing lm-eval), and vLLM's
`prompt_logprobs` field: the prompt's token logprobs must equal the offline engine's."""

from __future__ import annotations

import math

import httpx
import pytest

from elasticserve.sampling_params import SamplingParams

CONTEXT = "Question: what is the capital of France?\nAnswer:"
CHOICES = [" Paris", " Berlin"]


def _post(base_url: str, body: dict) -> dict:
    resp = httpx.post(f"{base_url}/v1/completions", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()


def _lm_eval_body(prompt: list[list[int]], max_tokens: int) -> dict:
    # lm_eval/models/openai_completions.py, LocalCompletionsAPI._create_payload(generate=False)
    return {"model": "tiny", "prompt": prompt, "temperature": 0, "max_tokens": max_tokens,
            "logprobs": 1, "seed": 1234, "echo": True}


def _lm_eval_parse(choice: dict, ctxlen: int) -> tuple[float, bool]:
    # LocalCompletionsAPI.parse_logprobs: the continuation's tokens, without the generated one
    token_logprobs = choice["logprobs"]["token_logprobs"][ctxlen:-1]
    top_logprobs = choice["logprobs"]["top_logprobs"][ctxlen:-1]
    is_greedy = all(tok == max(top.values()) for tok, top in zip(token_logprobs, top_logprobs,
                                                                 strict=True))
    return sum(token_logprobs), is_greedy


def test_lm_eval_loglikelihood_equals_offline_prompt_logprobs(base_url, offline, run_offline):
    tok = offline.tokenizer
    ctx = tok.encode(CONTEXT)
    prompts = [ctx + tok.encode(c, add_special_tokens=False) for c in CHOICES]
    body = _post(base_url, _lm_eval_body(prompts, max_tokens=1))
    choices = sorted(body["choices"], key=lambda c: c["index"])
    assert len(choices) == 2
    for ids, choice in zip(prompts, choices, strict=True):
        lp = choice["logprobs"]
        # the prompt's tokens, then the one generated token
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) \
            == len(lp["text_offset"]) == len(ids) + 1
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert lp["tokens"][:len(ids)] == [tok.decode([t], skip_special_tokens=False)
                                           for t in ids]
        assert choice["text"].startswith(tok.decode(ids))
        ref = run_offline({"prompt_token_ids": ids},
                          SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1))
        expected = [ref.prompt_logprobs[i][t] for i, t in enumerate(ids) if i > 0]
        assert lp["token_logprobs"][1:len(ids)] == pytest.approx(expected, abs=1e-4)
        loglikelihood, is_greedy = _lm_eval_parse(choice, len(ctx))
        assert math.isfinite(loglikelihood) and loglikelihood < 0
        assert loglikelihood == pytest.approx(sum(expected[len(ctx) - 1:]), abs=1e-3)
        greedy_ref = all(max(ref.prompt_logprobs[i], key=ref.prompt_logprobs[i].get) == ids[i]
                         for i in range(len(ctx), len(ids)))
        assert is_greedy == greedy_ref
    assert body["usage"]["prompt_tokens"] == sum(len(p) for p in prompts)


def test_echo_with_max_tokens_0_returns_the_prompt_alone(base_url, offline, run_offline):
    ids = offline.tokenizer.encode(CONTEXT)
    body = _post(base_url, _lm_eval_body([ids], max_tokens=0))
    choice = body["choices"][0]
    assert choice["text"] == offline.tokenizer.decode(ids)
    assert choice["finish_reason"] == "length"
    assert len(choice["logprobs"]["tokens"]) == len(ids)
    assert body["usage"]["completion_tokens"] == 0
    ref = run_offline({"prompt_token_ids": ids},
                      SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1))
    assert choice["logprobs"]["token_logprobs"][1:] == pytest.approx(
        [ref.prompt_logprobs[i][t] for i, t in enumerate(ids) if i > 0], abs=1e-4)


def test_echo_of_a_text_prompt_streamed_or_not(base_url, client):
    kwargs = dict(model="tiny", prompt=CONTEXT, max_tokens=4, temperature=0, echo=True,
                  logprobs=2)
    plain = client.completions.create(model="tiny", prompt=CONTEXT, max_tokens=4, temperature=0)
    full = client.completions.create(**kwargs)
    assert full.choices[0].text == CONTEXT + plain.choices[0].text
    offsets = full.choices[0].logprobs.text_offset
    assert offsets[0] == 0 and offsets == sorted(offsets)
    chunks = [c for c in client.completions.create(stream=True, **kwargs) if c.choices]
    assert chunks[0].choices[0].text.startswith(CONTEXT)
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    streamed = [x for c in chunks for x in c.choices[0].logprobs.token_logprobs]
    assert streamed == full.choices[0].logprobs.token_logprobs
    # echo without logprobs: the text only
    bare = _post(base_url, {"model": "tiny", "prompt": CONTEXT, "max_tokens": 4,
                            "temperature": 0, "echo": True})
    assert bare["choices"][0]["text"] == full.choices[0].text
    assert bare["choices"][0]["logprobs"] is None


def test_prompt_logprobs_field_as_vllm_returns_it(base_url, offline, run_offline):
    ids = offline.tokenizer.encode(CONTEXT)
    choice = _post(base_url, {"model": "tiny", "prompt": CONTEXT, "max_tokens": 2,
                              "temperature": 0, "prompt_logprobs": 2})["choices"][0]
    entries = choice["prompt_logprobs"]
    assert len(entries) == len(ids) and entries[0] is None
    ref = run_offline(CONTEXT, SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=2))
    for pos in range(1, len(ids)):
        entry = {int(k): v for k, v in entries[pos].items()}
        assert ids[pos] in entry  # the prompt's own token, whatever its rank
        assert entry[ids[pos]]["logprob"] == pytest.approx(ref.prompt_logprobs[pos][ids[pos]],
                                                           abs=1e-4)
        ranked = sorted((v["rank"], v["logprob"]) for v in entry.values() if v["rank"])
        assert [r for r, _ in ranked] == [1, 2]
        assert ranked[0][1] == max(v["logprob"] for v in entry.values()) >= ranked[1][1]
        assert all(v["decoded_token"] == offline.tokenizer.decode([k], skip_special_tokens=False)
                   for k, v in entry.items())


@pytest.mark.parametrize("model", ["tiny"])
def test_engine_idle_and_intact_after_echo_requests(engines, wait_idle, model):
    wait_idle(engines[model])
