"""One served model over its replicas: the `EngineClient` the server sees in worker mode.

A request goes to the least loaded ready replica (requests in flight, then KV bytes in use, as
last reported). If that replica's worker dies before the consumer saw anything of the request
(`WorkerDiedError.retryable`), the request runs again from the start on another ready replica;
otherwise it ends with the error (HTTP 503).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from elasticserve.engine.protocol import (
    EngineDeadError,
    EnginePrompt,
    OutputObserver,
    TokenizerLike,
)
from elasticserve.outputs import RequestOutput
from elasticserve.procs.worker_client import WorkerClient, WorkerDiedError
from elasticserve.sampling_params import SamplingParams

SUMMED = ("steps", "preemptions", "swaps_out", "swaps_in", "recomputes",
          "prefix_cache_hit_tokens", "blocks_used", "blocks_total", "num_running",
          "num_waiting", "num_swapped", "sleeps", "wakes",
          # the host KV tier and layer-wise residency
          "kv_offloaded_blocks", "kv_onloaded_blocks", "host_prefix_hit_tokens",
          "kv_streamed_sequences", "kv_streamed_steps", "kv_streamed_layer_bytes",
          "kv_streamed_prefill_tokens", "kv_stream_guarded")


class ReplicaRouter:
    """`EngineClient` for one model served by one or more worker processes."""

    def __init__(self, model: str, replicas: list[WorkerClient],
                 ready_timeout_s: float = 30.0) -> None:
        if not replicas:
            raise ValueError(f"model {model!r} needs at least one replica")
        self.model = model
        self.replicas = replicas
        self.ready_timeout_s = ready_timeout_s
        self._observer: OutputObserver | None = None
        self.retries = 0  # requests re-run on another replica after a worker died

    @property
    def observer(self) -> OutputObserver | None:
        return self._observer

    @observer.setter
    def observer(self, value: OutputObserver | None) -> None:
        self._observer = value
        for replica in self.replicas:
            replica.observer = value

    @property
    def name(self) -> str:
        return self.model

    @property
    def max_model_len(self) -> int:
        return self._any_ready().max_model_len

    @property
    def tokenizer(self) -> TokenizerLike:
        return self.replicas[0].tokenizer

    def start(self) -> None:
        """Workers are started by the supervisor."""

    def health(self) -> str | None:
        reasons = [r.health() for r in self.replicas]
        return None if any(h is None for h in reasons) else "; ".join(str(h) for h in reasons)

    def pick(self, exclude: frozenset[str] = frozenset()) -> WorkerClient | None:
        """The least loaded ready replica (not in `exclude`), or None."""
        ready = [r for r in self.replicas if r.state == "ready" and r.worker not in exclude]
        return min(ready, key=lambda r: r.load) if ready else None

    def _any_ready(self, wait: bool = False) -> WorkerClient:
        deadline = time.monotonic() + (self.ready_timeout_s if wait else 0.0)
        while True:
            replica = self.pick()
            if replica is not None:
                return replica
            if time.monotonic() >= deadline:
                raise EngineDeadError(f"model {self.model!r} has no running worker: "
                                      f"{self.health()}")
            time.sleep(0.05)  # a worker is restarting (blocking callers only)

    def validate(self, prompt: EnginePrompt, params: SamplingParams
                 ) -> tuple[str | None, list[int]]:
        return self._any_ready(wait=True).validate(prompt, params)

    def generate(self, prompt: EnginePrompt, params: SamplingParams,
                 request_id: str | None = None, priority: int = 0,
                 stream: bool = False, arrival_time: float | None = None
                 ) -> AsyncIterator[RequestOutput]:
        request_id = request_id or f"req-{uuid.uuid4().hex}"
        arrival = time.monotonic() if arrival_time is None else arrival_time
        replica = self._any_ready()
        first = replica.generate(prompt, params, request_id, priority, stream, arrival)
        return self._follow(first, replica, prompt, params, request_id, priority, stream,
                            arrival)

    async def _follow(self, outputs: AsyncIterator[RequestOutput], replica: WorkerClient,
                      prompt: EnginePrompt, params: SamplingParams, request_id: str,
                      priority: int, stream: bool, arrival: float
                      ) -> AsyncIterator[RequestOutput]:
        tried = {replica.worker}
        while True:
            current = outputs
            try:
                async for out in current:
                    yield out
                return
            except WorkerDiedError as exc:
                nxt = self.pick(frozenset(tried)) if exc.retryable else None
                if nxt is None:
                    raise
                self.retries += 1
                tried.add(nxt.worker)
                outputs = nxt.generate(prompt, params, request_id, priority, stream, arrival)
            finally:
                # a consumer that leaves early closes us: close the replica's stream too, which
                # aborts the request there (a no-op once it ended)
                aclose = getattr(current, "aclose", None)
                if aclose is not None:
                    await aclose()

    def abort(self, request_id: str) -> None:
        for replica in self.replicas:
            replica.abort(request_id)

    def stats(self) -> dict[str, Any]:
        per = [r.stats() for r in self.replicas]
        total: dict[str, Any] = {k: sum(int(s.get(k, 0)) for s in per) for k in SUMMED}
        total["asleep"] = bool(per) and all(s.get("asleep", False) for s in per)
        total["replicas"] = len(self.replicas)
        total["retries"] = self.retries
        return total

    def memory_stats(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for replica in self.replicas:
            for key, value in replica.memory_stats().items():
                if key == "page_size":
                    total[key] = value
                else:
                    total[key] = total.get(key, 0) + int(value)
        return total

    def config_info(self) -> dict[str, str]:
        return self.replicas[0].config_info()

    def shutdown(self, timeout: float = 10.0) -> None:
        for replica in self.replicas:
            replica.shutdown(timeout)
