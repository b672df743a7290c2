"""The page broker across real processes: two worker processes, each a real LLMEngine whose KV
pages are slots of the broker's memfds, on a budget too small for both."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from elasticserve import LLM, SamplingParams
from elasticserve.core.arbiter import ArbiterError
from elasticserve.procs.page_broker import PageBroker
from elasticserve.procs.transport import channel_pair
from tests.engine.conftest import mixed_prompts

ROOT = Path(__file__).resolve().parents[2]
KiB = 1 << 10
PAGE = 64 * KiB
KV_BUDGET = 32 * PAGE  # one burst peaks at ~24 pages: two at once do not fit
MAX_TOKENS = 24


class Worker:
    """A child running tests/procs/page_worker.py against `broker`."""

    def __init__(self, broker: PageBroker, name: str, model_dir: str) -> None:
        self.name = name
        (pages, pages_w), (reclaim, reclaim_w), (self.control, control_w) = (
            channel_pair(), channel_pair(), channel_pair())
        broker.serve(name, pages, reclaim)
        fds = [c.fileno() for c in (pages_w, reclaim_w, control_w)]
        env = os.environ | {"PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests/procs/page_worker.py"), model_dir, name,
             *map(str, fds), str(PAGE), str(KV_BUDGET)], pass_fds=fds, env=env)
        for c in (pages_w, reclaim_w, control_w):
            c.sock.close()  # the child has them now (no shutdown: that would cut the child off)

    def recv(self, timeout: float = 60.0) -> tuple:
        ready, _, _ = select.select([self.control.fileno()], [], [], timeout)
        assert ready, f"worker {self.name} said nothing for {timeout} s (rc {self.proc.poll()})"
        msg, _ = self.control.recv()
        assert isinstance(msg, tuple)
        return msg

    def generate(self, prompts: list[list[int]]) -> None:
        self.control.send(("generate", prompts, MAX_TOKENS))

    def result(self) -> list[list[int]]:
        while (msg := self.recv())[0] != "done":
            pass
        return msg[1]

    def wait_steps(self, n: int) -> None:
        while (msg := self.recv())[0] != "step" or msg[1] < n:
            assert msg[0] != "done", "finished before the step awaited"


def burst(model_dir: str, shift: int = 0) -> list[list[int]]:
    base = mixed_prompts(model_dir, 6)
    return [(base[(i + shift) % 6] * 4)[: 40 + i] for i in range(16)]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> str:
    from elasticserve.models.make_model import make_model

    return make_model("llama", "tiny", str(tmp_path_factory.mktemp("models") / "llama"), seed=0)


@pytest.fixture(scope="module")
def expected(tiny_llama: str) -> Callable[[list[list[int]]], list[list[int]]]:
    """Greedy tokens from an in-process engine."""
    llm = LLM(tiny_llama, kv_cache_mode="static")
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)

    def run(prompts: list[list[int]]) -> list[list[int]]:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        return [list(o.outputs[0].token_ids) for o in outs]

    return run


@pytest.fixture
def two_workers(tiny_llama: str) -> Iterator[tuple[PageBroker, Worker, Worker]]:
    from elasticserve.engine.multi_model import checkpoint_bytes

    weights = -(-checkpoint_bytes(tiny_llama) // PAGE) * PAGE  # charged once: same weights_key
    broker = PageBroker(weights + KV_BUDGET, PAGE, reclaim_deadline_s=0.5)
    workers = [Worker(broker, name, tiny_llama) for name in ("a", "b")]
    try:
        for w in workers:
            assert w.recv() == ("ready",)
        yield broker, workers[0], workers[1]
    finally:
        for w in workers:
            if w.proc.poll() is None:
                os.kill(w.proc.pid, signal.SIGCONT)
                w.proc.kill()
            w.proc.wait(10)
            w.control.close()
        broker.close()


def books(broker: PageBroker) -> dict[str, int]:
    broker.check_integrity()
    return {w: broker.held(w) for w in broker.workers}


def test_pages_move_between_processes_and_outputs_match(
        two_workers: tuple[PageBroker, Worker, Worker], tiny_llama: str,
        expected: Callable[[list[list[int]]], list[list[int]]]) -> None:
    broker, a, b = two_workers
    arbiter = broker.arbiter
    weights = arbiter.snapshot().weights_pages
    assert arbiter.used_pages == weights + sum(books(broker).values())  # one copy charged
    a.generate(burst(tiny_llama))
    assert a.result() == expected(burst(tiny_llama))
    held_a = books(broker)["a"]
    assert held_a > KV_BUDGET // PAGE // 2  # a kept its peak (no shrink for 60 s)
    b.generate(burst(tiny_llama, 1))
    assert b.result() == expected(burst(tiny_llama, 1))
    taken = arbiter.stats["free"] + arbiter.stats["cached"]
    assert taken > 0 and books(broker)["a"] < held_a  # b's pages came from idle a
    # both at once, on a budget that holds one burst: they take turns, outputs unchanged
    a.generate(burst(tiny_llama, 2))
    b.generate(burst(tiny_llama, 3))
    assert a.result() == expected(burst(tiny_llama, 2))
    assert b.result() == expected(burst(tiny_llama, 3))
    held = books(broker)
    assert arbiter.used_pages == weights + held["a"] + held["b"] <= arbiter.budget_pages
    assert broker.reclaim_timeouts == 0


def test_a_stopped_worker_cannot_block_a_reclaim(
        two_workers: tuple[PageBroker, Worker, Worker], tiny_llama: str,
        expected: Callable[[list[list[int]]], list[list[int]]]) -> None:
    broker, a, b = two_workers
    a.generate(burst(tiny_llama))
    a.result()
    held_a = books(broker)["a"]
    os.kill(a.proc.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        b.generate(burst(tiny_llama, 1))  # needs a's pages: a cannot answer
        assert b.result() == expected(burst(tiny_llama, 1))  # b got along with what was free
        assert broker.reclaim_timeouts >= 1
        assert time.monotonic() - start < 15
        assert books(broker)["a"] == held_a  # nothing booked for the silent worker
    finally:
        os.kill(a.proc.pid, signal.SIGCONT)
    # a is back: its late reply is dropped, and a reclaim from it works again (a lower
    # ceiling takes pages back through its reclaimer)
    give_up = time.monotonic() + 10
    while True:
        try:
            broker.arbiter.set_limits("a", max_bytes=(held_a - 4) * PAGE)
            break
        except ArbiterError:  # a's late reply has not come in yet: still unresponsive
            assert time.monotonic() < give_up
            time.sleep(0.05)
    assert books(broker)["a"] <= held_a - 4


def test_kill_9_gives_every_page_back(
        two_workers: tuple[PageBroker, Worker, Worker], tiny_llama: str,
        expected: Callable[[list[list[int]]], list[list[int]]]) -> None:
    broker, a, b = two_workers
    memfd = os.dup(broker.workers["a"].fd)  # to look at a's pages after the broker closed it
    try:
        a.generate(burst(tiny_llama))
        b.generate(burst(tiny_llama, 1))
        a.wait_steps(3)
        assert os.fstat(memfd).st_blocks > 0  # a holds real pages mid-generation
        a.proc.kill()  # SIGKILL
        a.proc.wait(10)
        deadline = time.monotonic() + 10
        while "a" not in broker.dead and time.monotonic() < deadline:
            time.sleep(0.01)
        assert broker.dead == ["a"] and "a" not in broker.arbiter.names()
        assert os.fstat(memfd).st_blocks == 0  # every page punched out of a's memfd
        held = books(broker)
        assert list(held) == ["b"]
        assert broker.arbiter.used_pages == broker.arbiter.snapshot().weights_pages + held["b"]
        assert b.result() == expected(burst(tiny_llama, 1))
        broker.worker_died("a")  # idempotent
        books(broker)
    finally:
        os.close(memfd)
