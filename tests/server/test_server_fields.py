"""vLLM's extra request fields reach the engine, and a field the server does not implement is
a 400 naming it, never silently ignored (except the few that cannot change an output)."""

from __future__ import annotations

import httpx
import pytest

from elasticserve.sampling_params import SamplingParams
from elasticserve.server.protocol import HARMLESS_FIELDS, CompletionRequest

PROMPT = "def main(argv):"


def _post(base_url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{base_url}{path}", json=body, timeout=60)


def test_every_vllm_extra_reaches_sampling_params():
    extras = dict(top_k=5, min_p=0.1, repetition_penalty=1.2, min_tokens=2, ignore_eos=True,
                  stop_token_ids=[7], skip_special_tokens=False, include_stop_str_in_output=True,
                  length_penalty=0.5, prompt_logprobs=3)
    params = CompletionRequest(prompt="x", temperature=0.7, max_tokens=9,
                               **extras).sampling_params()  # type: ignore[arg-type]
    for name, value in extras.items():
        assert getattr(params, name) == value, name
    beam = CompletionRequest(prompt="x", n=2, use_beam_search=True, early_stopping=True,
                             max_tokens=4).sampling_params()
    assert beam.use_beam_search and beam.beam_width == 2 and beam.early_stopping


def test_include_stop_str_in_output(client, run_offline):
    text = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16,
                                     temperature=0).choices[0].text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    for include in (False, True):
        resp = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16,
                                         temperature=0, stop=[stop],
                                         extra_body={"include_stop_str_in_output": include})
        ref = run_offline(PROMPT, SamplingParams(max_tokens=16, temperature=0, stop=[stop],
                                                 include_stop_str_in_output=include))
        assert resp.choices[0].text == ref.outputs[0].text
        assert resp.choices[0].text.endswith(stop) == include
        streamed = client.completions.create(
            model="tiny", prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop], stream=True,
            extra_body={"include_stop_str_in_output": include})
        assert "".join(c.choices[0].text for c in streamed) == resp.choices[0].text


def test_use_beam_search_matches_offline_beams(base_url, run_offline):
    body = {"model": "tiny", "prompt": PROMPT, "n": 2, "max_tokens": 6, "temperature": 0,
            "use_beam_search": True, "ignore_eos": True}
    resp = _post(base_url, "/v1/completions", body)
    assert resp.status_code == 200, resp.text
    ref = run_offline(PROMPT, SamplingParams(n=2, max_tokens=6, temperature=0,
                                             use_beam_search=True, ignore_eos=True))
    got = [c["text"] for c in sorted(resp.json()["choices"], key=lambda c: c["index"])]
    assert got == [o.text for o in ref.outputs]
    streamed = _post(base_url, "/v1/completions", {**body, "stream": True})
    assert streamed.status_code == 400 and streamed.json()["error"]["param"] == "use_beam_search"


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/completions", {"prompt": "x"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
])
def test_unknown_fields_are_400_and_harmless_ones_accepted(base_url, path, body):
    body = {"model": "tiny", "max_tokens": 2, **body}
    for field, value in [("guided_regex", "a+"), ("bad_words", ["x"]), ("foo", 1)]:
        resp = _post(base_url, path, {**body, field: value})
        assert resp.status_code == 400, (field, resp.text)
        assert resp.json()["error"]["param"] == field
    harmless = {"user": "u-1", "metadata": {"k": "v"}, "store": False, "service_tier": "auto",
                "request_id": "r-1"}
    assert set(harmless) == HARMLESS_FIELDS
    ok = _post(base_url, path, {**body, **harmless, "guided_regex": None})
    assert ok.status_code == 200, ok.text
    # an extra the chat endpoint does not implement yet is refused there too
    if path == "/v1/chat/completions":
        resp = _post(base_url, path, {**body, "prompt_logprobs": 1})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "prompt_logprobs"


@pytest.mark.parametrize("model", ["tiny"])
def test_engine_idle_and_intact_after_field_requests(engines, wait_idle, model):
    wait_idle(engines[model])
