"""A worker process: one model replica's engine step loop, driven over its data channel.

`python -m elasticserve.procs.worker_main --data-fd N` (started by procs/supervisor.py). The
first message is a `WorkerSpec`; the worker builds its `LLMEngine`, answers `Ready`, then
serves: a reader thread takes requests, aborts and calls off the channel at any time, the main
thread steps and sends ONE `StepResult` per step. Any error in the step loop ends the process
(the front's supervisor sees the socket close, fails or retries the requests, restarts it), and
the reader thread ends the process when the channel closes, so a dead front leaves no worker
behind. (Not PR_SET_PDEATHSIG: it fires when the *thread* that spawned the worker exits, and
the supervisor spawns from short-lived threads.)
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import sys
import threading
from typing import Any

from elasticserve.engine.kv_connector import (
    CopyConnector,
    KVConnector,
    PageConnector,
    PageLender,
)
from elasticserve.engine.llm_engine import LLMEngine
from elasticserve.engine.pd import DecodeSide, PrefillSide, block_checksums
from elasticserve.procs.page_client import RemotePageBroker, serve_reclaims
from elasticserve.procs.transport import Channel, ChannelClosed, channel_from_fd
from elasticserve.procs.weights import SharedWeights
from elasticserve.procs.worker_messages import (
    AbortRequest,
    AddRequest,
    AdoptRequest,
    Call,
    Ready,
    ReleaseHandOff,
    Reply,
    Status,
    StepResult,
    Stop,
    WorkerSpec,
)

logger = logging.getLogger(__name__)
Command = AddRequest | AbortRequest | AdoptRequest | ReleaseHandOff


class Worker:
    """The engine of one replica and the two threads that serve it."""

    def __init__(self, spec: WorkerSpec, data: Channel, engine: LLMEngine) -> None:
        self.spec = spec
        self.data = data
        self.engine = engine
        self._cv = threading.Condition()
        self._commands: list[Command] = []
        self._stopping = False

    # ---- the reader thread ------------------------------------------------------------------
    def read_forever(self) -> None:
        """Take messages off the channel; a closed channel (the front died) ends the process."""
        try:
            while True:
                msg, _ = self.data.recv()
                if isinstance(msg, AddRequest | AbortRequest | AdoptRequest | ReleaseHandOff):
                    with self._cv:
                        self._commands.append(msg)
                        self._cv.notify()
                elif isinstance(msg, Call):
                    self._answer(msg)
                elif isinstance(msg, Stop):
                    with self._cv:
                        self._stopping = True
                        self._cv.notify()
                    return
        except ChannelClosed:
            os._exit(0)  # nobody is left to serve

    def _answer(self, call: Call) -> None:
        try:
            reply = Reply(call.call_id, value=self._do(call.op, call.args))
        except Exception as exc:  # noqa: BLE001 - the caller gets the error, the worker goes on
            reply = Reply(call.call_id, error=_picklable(exc))
        self.data.send(reply)

    def _do(self, op: str, args: tuple[Any, ...]) -> Any:
        engine = self.engine
        if op == "validate":
            text, ids = engine.validate(*args)
            return text, list(ids)
        if op == "sleep":
            return engine.sleep()
        if op == "wake":
            return engine.wake()
        if op == "kv_checksums":
            return block_checksums(engine, *args)
        if op == "check_integrity":
            with engine.kv.lock:
                engine.check_integrity()
            return True
        raise ValueError(f"unknown worker call {op!r}")

    # ---- the step thread (main) -------------------------------------------------------------
    def run(self) -> None:
        while True:
            commands = self._wait_for_work()
            if commands is None:
                return
            errors = self._apply(commands)
            engine = self.engine
            if engine.has_unfinished_requests():
                outputs = engine.step()
                handoffs, engine.handoffs = engine.handoffs, []
                received = engine.pd.pop_received() if isinstance(engine.pd, DecodeSide) else []
                self.data.send(StepResult(outputs, engine.step_stats.pop(), engine.stats(),
                                          self.memory_stats(), errors, handoffs, received))
            elif errors:  # every add failed: their callers still need an answer
                self.data.send(StepResult([], None, self.engine.stats(), self.memory_stats(),
                                          errors))

    def _wait_for_work(self) -> list[Command] | None:
        with self._cv:
            while not (self._stopping or self._commands or
                       self.engine.has_unfinished_requests()):
                if not self._cv.wait(self.spec.status_interval_s):
                    self.data.send(Status(self.engine.stats(), self.memory_stats()))
            if self._stopping:
                return None
            commands, self._commands = self._commands, []
            return commands

    def _apply(self, commands: list[Command]) -> list[tuple[str, BaseException]]:
        errors: list[tuple[str, BaseException]] = []
        for cmd in commands:
            if isinstance(cmd, AbortRequest):
                self.engine.abort_request(cmd.request_id)
            elif isinstance(cmd, ReleaseHandOff):
                if isinstance(self.engine.pd, PrefillSide):
                    self.engine.pd.release(cmd.request_id)
            else:
                try:
                    self._add(cmd)
                except Exception as exc:  # noqa: BLE001 - bad input goes back to its caller
                    rid = cmd.request_id if isinstance(cmd, AddRequest) else \
                        cmd.handoff.request_id
                    errors.append((rid, _picklable(exc)))
        return errors

    def _add(self, cmd: AddRequest | AdoptRequest) -> None:
        engine = self.engine
        if isinstance(cmd, AddRequest):
            engine.add_request(cmd.prompt, cmd.params, request_id=cmd.request_id,
                               priority=cmd.priority, stream=cmd.stream)
        elif isinstance(engine.pd, DecodeSide):
            engine.pd.adopt(cmd.handoff)
        else:
            raise ValueError(f"worker {self.spec.worker} ({self.spec.role}) adopts no "
                             "handed-over request")

    def memory_stats(self) -> dict[str, int]:
        broker = self.engine.broker
        return {**self.engine.kv.memory_stats(),
                "pages_reclaimed": broker.pages_reclaimed if broker is not None else 0}

    def ready(self) -> Ready:
        engine = self.engine
        return Ready(os.getpid(), int(engine.scheduler_config.max_model_len),
                     config_info(engine), engine.weights_bytes, engine.stats(),
                     self.memory_stats())


def config_info(engine: LLMEngine) -> dict[str, str]:
    cache, kv = engine.cache_config, engine.kv
    return {"block_size": str(cache.block_size), "kv_cache_mode": cache.kv_cache_mode,
            "cache_dtype": str(kv.vt.dtype).removeprefix("torch."),
            "enable_prefix_caching": str(cache.enable_prefix_caching),
            "preemption_mode": cache.preemption_mode, "swap_space_bytes": str(cache.swap_space),
            "kv_cache_min_bytes": str(cache.kv_cache_min_bytes), "page_size": str(kv.page_size)}


def _picklable(exc: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:  # noqa: BLE001 - an exception type that cannot cross: keep its words
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc


def build_engine(spec: WorkerSpec, pages: Channel | None, reclaim: Channel | None) -> LLMEngine:
    """The replica's engine. Shared: its KV pages and its weights come from the front's page
    broker over `pages` (the model's one copy of the weights, mapped read-only), and the
    broker's reclaims arrive on `reclaim`, answered by a thread that never waits for a step."""
    if not spec.shared:
        engine = LLMEngine(spec.engine_args)
        if spec.role != "colocated":
            set_role(engine, spec, None)
        return engine
    assert pages is not None and reclaim is not None, "a shared worker needs its broker channels"
    args = spec.engine_args
    broker = RemotePageBroker(pages, spec.worker, args.kv_cache_max_bytes, args.page_size,
                              weights_key=spec.model, min_bytes=spec.min_bytes,
                              max_bytes=spec.max_bytes, priority=spec.priority,
                              kv_group=spec.kv_group)
    engine = LLMEngine(args, broker=broker, weights=SharedWeights(pages, key=spec.model),
                       kv_backend=broker.backend)
    broker.reclaimer.engine = engine
    if spec.role != "colocated":
        set_role(engine, spec, broker)
    threading.Thread(target=serve_reclaims, args=(reclaim, broker.reclaimer), daemon=True,
                     name="reclaims").start()
    return engine


def set_role(engine: LLMEngine, spec: WorkerSpec, lender: PageLender | None) -> None:
    """Make `engine` the prefill or decode side of a P/D pair. Under the front's page broker
    KV pages are lent (zero-copy), else (or with kv_handoff="copy") blocks are copied."""
    kv = engine.kv
    connector: KVConnector = CopyConnector(kv.tensor, spec.worker)
    if lender is not None and spec.kv_handoff == "pages":
        connector = PageConnector(kv.tensor, spec.worker, lender, kv.page_size, kv.block_bytes)
    engine.pd = (PrefillSide(engine, connector) if spec.role == "prefill"
                 else DecodeSide(engine, connector))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="an elasticserve worker process")
    parser.add_argument("--data-fd", type=int, required=True)
    parser.add_argument("--pages-fd", type=int, default=None, help="the page broker's channel")
    parser.add_argument("--reclaim-fd", type=int, default=None, help="its reclaim requests")
    opts = parser.parse_args(argv)
    data = channel_from_fd(opts.data_fd)
    spec, _ = data.recv()
    assert isinstance(spec, WorkerSpec), f"expected a WorkerSpec, got {type(spec).__name__}"
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s worker {spec.worker} %(levelname)s %(message)s")
    pages, reclaim = (None if fd is None else channel_from_fd(fd)
                      for fd in (opts.pages_fd, opts.reclaim_fd))
    worker = Worker(spec, data, build_engine(spec, pages, reclaim))
    data.send(worker.ready())
    threading.Thread(target=worker.read_forever, name="worker-reader", daemon=True).start()
    worker.run()
    worker.engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
