"""One served model split into prefill and decode workers (`--pd NAME=P:D`): the `EngineClient`
the server sees.

A request goes to the least loaded ready prefill worker, which runs its prompt and samples the
first token (streamed at once when the client streams), then hands it over (engine/pd.py): its
stream there ends with `KVHandedOver`. The router sends the hand-off to the least loaded ready
decode worker, which continues the same stream (one `RequestTiming`, so metrics see one
request). The prefill worker keeps the request's KV until the router releases it: as soon as
the decode worker reports the KV in place, or when the request ends any other way (aborted,
failed, the decode worker died), so no path leaves blocks behind on either side. Requests the
decode side could not continue exactly (beam search, structured outputs) finish on the prefill
worker.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from elasticserve.engine.pd import KVHandedOver
from elasticserve.engine.protocol import EngineDeadError, EnginePrompt, RequestTiming
from elasticserve.outputs import RequestOutput
from elasticserve.procs.router import ReplicaRouter
from elasticserve.procs.worker_client import WorkerClient, WorkerDiedError
from elasticserve.sampling_params import SamplingParams

HANDOFF_SUMMED = ("kv_handoff_sequences", "kv_handoff_pages", "kv_handoff_bytes_copied",
                  "kv_handoff_sent_sequences", "kv_handoff_sent_pages",
                  "kv_handoff_sent_bytes_copied", "kv_handoff_latency_sum_s")


class PDRouter(ReplicaRouter):
    """`EngineClient` for one model served by prefill workers and decode workers."""

    def __init__(self, model: str, prefill: list[WorkerClient], decode: list[WorkerClient],
                 ready_timeout_s: float = 30.0) -> None:
        if not prefill or not decode:
            raise ValueError(f"model {model!r} needs at least one prefill and one decode worker")
        super().__init__(model, prefill + decode, ready_timeout_s)
        self.prefill, self.decode = prefill, decode
        for worker in decode:
            worker.on_received = self._release
        self._lock = threading.Lock()
        self._held: dict[str, WorkerClient] = {}  # request -> prefill worker holding its KV
        self.handed_over = 0

    def pick(self, exclude: frozenset[str] = frozenset()) -> WorkerClient | None:
        """The least loaded ready prefill worker (new requests and validation go there)."""
        return _least_loaded(self.prefill, exclude)

    def health(self) -> str | None:
        for role, workers in (("prefill", self.prefill), ("decode", self.decode)):
            if not any(w.state == "ready" for w in workers):
                return f"no {role} worker of {self.model!r} is ready: " + "; ".join(
                    str(w.health()) for w in workers)
        return None

    def generate(self, prompt: EnginePrompt, params: SamplingParams,
                 request_id: str | None = None, priority: int = 0,
                 stream: bool = False, arrival_time: float | None = None
                 ) -> AsyncIterator[RequestOutput]:
        request_id = request_id or f"req-{uuid.uuid4().hex}"
        timing = RequestTiming(time.monotonic() if arrival_time is None else arrival_time)
        prefill = self._any_ready()

        def submit(worker: WorkerClient) -> AsyncIterator[RequestOutput]:
            return worker.generate(prompt, params, request_id, priority, stream, timing=timing)

        return self._follow_pd(submit, submit(prefill), prefill, request_id, timing)

    async def _follow_pd(self, submit: Callable[[WorkerClient], AsyncIterator[RequestOutput]],
                         current: AsyncIterator[RequestOutput], prefill: WorkerClient,
                         request_id: str, timing: RequestTiming) -> AsyncIterator[RequestOutput]:
        tried, handoff = {prefill.worker}, None
        try:
            while handoff is None:
                try:
                    async for out in current:
                        yield out
                    return  # it finished on the prefill worker
                except KVHandedOver as over:
                    handoff = over.handoff
                except WorkerDiedError as exc:  # nothing seen yet: rerun on another
                    prefill = self._retry(exc, tried)
                    current = submit(prefill)
            with self._lock:
                self._held[request_id] = prefill
            self.handed_over += 1
            decode = _least_loaded(self.decode, frozenset())
            if decode is None:
                raise EngineDeadError(f"model {self.model!r} has no decode worker ready: "
                                      f"{self.health()}")
            current = decode.adopt(handoff, timing)
            try:
                async for out in current:
                    yield out
            except WorkerDiedError as exc:  # its KV died with it: not retried from scratch
                raise WorkerDiedError(str(exc), retryable=False) from exc
        finally:
            aclose = getattr(current, "aclose", None)
            if aclose is not None:
                await aclose()  # an early exit aborts the request where it runs
            self._release(request_id)

    def _retry(self, exc: WorkerDiedError, tried: set[str]) -> WorkerClient:
        """Another ready prefill worker for a request whose worker died before the consumer
        saw anything of it; re-raises `exc` when there is none or it is too late."""
        nxt = self.pick(frozenset(tried)) if exc.retryable else None
        if nxt is None:
            raise exc
        self.retries += 1
        tried.add(nxt.worker)
        return nxt

    def abort(self, request_id: str) -> None:
        super().abort(request_id)
        self._release(request_id)

    def _release(self, request_id: str) -> None:
        """The prefill worker may free the request's KV (once; any thread)."""
        with self._lock:
            prefill = self._held.pop(request_id, None)
        if prefill is not None:
            prefill.release_handoff(request_id)

    @property
    def holding(self) -> int:
        """Hand-offs whose KV a prefill worker still holds."""
        with self._lock:
            return len(self._held)

    def stats(self) -> dict[str, Any]:
        total = super().stats()
        per = [r.stats() for r in self.replicas]
        for key in HANDOFF_SUMMED:
            total[key] = sum(s.get(key, 0) for s in per)
        buckets = [s["kv_handoff_latency_buckets"] for s in per
                   if "kv_handoff_latency_buckets" in s]
        if buckets:
            total["kv_handoff_latency_buckets"] = [sum(col) for col in zip(*buckets,
                                                                            strict=True)]
        total["handed_over"] = self.handed_over
        return total


def _least_loaded(workers: list[WorkerClient], exclude: frozenset[str]) -> WorkerClient | None:
    ready = [w for w in workers if w.state == "ready" and w.worker not in exclude]
    return min(ready, key=lambda w: w.load) if ready else None

