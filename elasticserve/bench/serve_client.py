"""The load generator of ``elasticserve bench serve``: streams completions from a running server.

:func:`run_benchmark` sends each request at its arrival time (bounded by a concurrency limit),
times the stream chunk by chunk, and polls ``/admin/memory`` alongside. Nothing a request does
can stop the run: HTTP errors, broken streams and timeouts become failed records. The run is
bounded in time (``time_limit_s``): requests not finished by then are failed as ``timeout``
and requests not yet sent as ``not_sent``.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from elasticserve.bench.serve_report import MemorySample, RequestRecord, RunResult
from elasticserve.workload.generators import RequestSpec

TOKEN_IDS = (4, 500)  # prompt token ids are drawn from here: inside every model's vocabulary


@dataclass(slots=True)
class ClientConfig:
    """How to drive the server."""

    base_url: str
    max_concurrency: int = 64
    request_timeout_s: float = 300.0
    time_limit_s: float = 600.0  # the whole run, from the first arrival
    admin_token: str | None = None
    memory_interval_s: float = 0.25  # 0 disables memory sampling
    prompt_seed: int = 0
    logprobs: bool = False  # ask for logprobs=0 so each chunk names its tokens exactly
    progress: bool = True
    label: str = "run"
    rate: float | None = None


@dataclass(slots=True)
class Progress:
    """A one-line ``\\r`` counter on stderr, redrawn at most every 0.2 s."""

    total: int
    enabled: bool = True
    done: int = 0
    failed: int = 0
    in_flight: int = 0
    started: float = field(default_factory=time.perf_counter)
    _drawn: float = 0.0

    def update(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (not force and now - self._drawn < 0.2):
            return
        self._drawn = now
        sys.stderr.write(f"\r[bench serve] {self.done}/{self.total} done, {self.failed} failed, "
                         f"{self.in_flight} in flight, {now - self.started:.1f} s   ")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            self.update(force=True)
            sys.stderr.write("\n")


def prompt_ids(rng: random.Random, n: int) -> list[int]:
    """``n`` random token ids (random, so no two requests share a cached prefix)."""
    return [rng.randrange(*TOKEN_IDS) for _ in range(max(n, 1))]


def request_body(spec: RequestSpec, ids: list[int], logprobs: bool) -> dict[str, Any]:
    """A streamed completion generating exactly ``spec.output_len`` tokens."""
    body: dict[str, Any] = {"model": spec.model, "prompt": ids, "max_tokens": max(spec.output_len, 1),
                            "stream": True, "stream_options": {"include_usage": True},
                            "ignore_eos": True, "temperature": 0.0}
    if logprobs:
        body["logprobs"] = 0
    return body


def _on_chunk(rec: RequestRecord, chunk: dict[str, Any], elapsed: float, last: list[float]) -> None:
    """Account one SSE data object: tokens, timing, usage or an error event."""
    if "error" in chunk:
        err = chunk["error"]
        rec.fail("stream_error", str(err.get("message", err) if isinstance(err, dict) else err))
        return
    usage = chunk.get("usage")
    if usage:
        rec.usage_prompt_tokens = usage.get("prompt_tokens")
        rec.usage_completion_tokens = usage.get("completion_tokens")
    tokens = 0
    for choice in chunk.get("choices") or []:
        logprobs = choice.get("logprobs")
        tokens += len(logprobs.get("tokens") or []) if logprobs else 1
    if not tokens:
        return
    if rec.ttft_s is None:
        rec.ttft_s = elapsed
    else:
        rec.itl_s.append(elapsed - last[0])
    last[0] = elapsed
    rec.output_tokens += tokens


async def _stream_one(client: httpx.AsyncClient, rec: RequestRecord, body: dict[str, Any]) -> None:
    start = time.perf_counter()
    last = [0.0]
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        rec.status = resp.status_code
        if resp.status_code != 200:
            text = (await resp.aread()).decode("utf-8", "replace")[:300]
            rec.fail(str(resp.status_code), text)
            return
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            _on_chunk(rec, json.loads(data), time.perf_counter() - start, last)
    if rec.failure is None:
        if rec.ttft_s is None:
            rec.fail("no_tokens", "the stream ended without a token")
        else:
            rec.e2e_s = time.perf_counter() - start


async def _send(client: httpx.AsyncClient, rec: RequestRecord, body: dict[str, Any],
                sem: asyncio.Semaphore, cfg: ClientConfig, t0: float, deadline: float,
                progress: Progress) -> None:
    try:
        async with asyncio.timeout_at(deadline):
            async with sem:
                rec.sent_s = time.perf_counter() - t0
                progress.in_flight += 1
                try:
                    async with asyncio.timeout(cfg.request_timeout_s):
                        await _stream_one(client, rec, body)
                finally:
                    progress.in_flight -= 1
    except TimeoutError:
        rec.fail("timeout", "request or run time limit reached")
    except httpx.HTTPError as exc:
        rec.fail("connect" if isinstance(exc, httpx.TransportError) else "http",
                 f"{type(exc).__name__}: {exc}")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # a malformed stream
        rec.fail("bad_stream", f"{type(exc).__name__}: {exc}")
    progress.done += 1
    progress.failed += not rec.ok
    progress.update()


def _numbers(fields: dict[str, Any]) -> dict[str, float]:
    """Numeric fields, with nested objects' numeric fields lifted one level (``kv.x`` -> ``x``)."""
    out: dict[str, float] = {}
    for key, value in fields.items():
        if isinstance(value, dict):
            for sub, v in _numbers(value).items():
                out[sub if sub not in fields and sub not in out else f"{key}.{sub}"] = v
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = float(value)
    return out


def parse_memory(payload: Any, t_s: float) -> MemorySample:
    """An ``/admin/memory`` answer as a sample: numeric fields and state of each model.

    Takes ``{"budget": {"bytes": n} | n, "models": {name: {...}} | [{"name": ..}, ..]}``."""
    payload = payload if isinstance(payload, dict) else {}
    models_raw = payload.get("models", {})
    if isinstance(models_raw, list):
        models_raw = {str(m.get("name", i)): m for i, m in enumerate(models_raw)}
    models = {name: _numbers(f) for name, f in models_raw.items() if isinstance(f, dict)}
    states = {name: f["state"] for name, f in models_raw.items()
              if isinstance(f, dict) and isinstance(f.get("state"), str)}
    budget = payload.get("budget", payload.get("budget_bytes"))
    if isinstance(budget, dict):
        budget = budget.get("bytes")
    ok = isinstance(budget, int | float) and not isinstance(budget, bool)
    return MemorySample(t_s, float(budget) if ok else None, models, states)


async def sample_memory(client: httpx.AsyncClient, cfg: ClientConfig, t0: float,
                        stop: asyncio.Event, out: list[MemorySample]) -> str | None:
    """Poll ``/admin/memory`` every interval until ``stop`` (at most until the time limit).

    Returns why sampling stopped early, or None."""
    headers = {"Authorization": f"Bearer {cfg.admin_token}"} if cfg.admin_token else {}
    max_samples = int(cfg.time_limit_s / max(cfg.memory_interval_s, 0.01)) + 10
    for _ in range(max_samples):
        try:
            resp = await client.get("/admin/memory", headers=headers, timeout=5.0)
        except httpx.HTTPError as exc:
            return f"/admin/memory failed: {type(exc).__name__}"
        if resp.status_code != 200:
            return f"/admin/memory answered HTTP {resp.status_code}"
        out.append(parse_memory(resp.json(), time.perf_counter() - t0))
        try:
            await asyncio.wait_for(stop.wait(), cfg.memory_interval_s)
            return None
        except TimeoutError:
            pass
    return "sample limit reached"


async def _dispatch(client: httpx.AsyncClient, specs: Sequence[RequestSpec],
                    records: list[RequestRecord], cfg: ClientConfig, t0: float,
                    progress: Progress) -> None:
    """Start each request at its arrival time; those due after the time limit are not sent."""
    rng = random.Random(cfg.prompt_seed)
    sem = asyncio.Semaphore(cfg.max_concurrency)
    deadline = t0 + cfg.time_limit_s
    tasks = []
    for spec, rec in zip(specs, records, strict=True):
        body = request_body(spec, prompt_ids(rng, spec.input_len), cfg.logprobs)
        wait = t0 + spec.arrival - time.perf_counter()
        if spec.arrival >= cfg.time_limit_s:
            rec.fail("not_sent", "arrival after the run time limit")
            continue
        if wait > 0:
            await asyncio.sleep(wait)
        tasks.append(asyncio.create_task(_send(client, rec, body, sem, cfg, t0, deadline,
                                               progress)))
    await asyncio.gather(*tasks)


async def run_benchmark(specs: Sequence[RequestSpec], cfg: ClientConfig) -> RunResult:
    """Send ``specs`` (sorted by arrival, relative seconds) to the server; gather the records."""
    specs = sorted(specs, key=lambda s: s.arrival)
    records = [RequestRecord(s.model, s.input_len, max(s.output_len, 1), s.arrival) for s in specs]
    progress = Progress(len(specs), cfg.progress)
    memory: list[MemorySample] = []
    limits = httpx.Limits(max_connections=cfg.max_concurrency + 4,
                          max_keepalive_connections=cfg.max_concurrency + 4)
    timeout = httpx.Timeout(cfg.request_timeout_s, connect=10.0)
    async with httpx.AsyncClient(base_url=cfg.base_url, limits=limits, timeout=timeout) as client:
        stop = asyncio.Event()
        t0 = time.perf_counter()
        sampler = None
        if cfg.memory_interval_s > 0:
            sampler = asyncio.create_task(sample_memory(client, cfg, t0, stop, memory))
        try:
            await _dispatch(client, specs, records, cfg, t0, progress)
        finally:
            duration = time.perf_counter() - t0
            stop.set()
            note = await sampler if sampler is not None else "disabled"
            progress.close()
    return RunResult(cfg.label, cfg.rate, duration, records, memory, note)
