"""The measuring loop both engines of `bench peer` run in, with a fake engine: TTFT and TPOT per
request from the steps that made the tokens, sequential level 1, and the process-tree CPU time."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterable

import pytest

from elasticserve.bench import peer_child
from elasticserve.bench.peer_child import Event


class FakeEngine:
    """One token per request per step, one clock tick per step; reports finished requests
    only (as our engine does), with the engine's own first-token time when ``own_first``."""

    def __init__(self, clock: list[float], own_first: bool = False) -> None:
        self.clock, self.own_first = clock, own_first
        self.live: dict[str, tuple[int, list[int], float]] = {}

    def add(self, rid: str, prompt: list[int], max_tokens: int) -> None:
        self.live[rid] = (max_tokens, [], 0.0)

    def step(self) -> Iterable[Event]:
        self.clock[0] += 1.0
        events = []
        for rid, (want, toks, first) in list(self.live.items()):
            toks.append(len(toks))
            first = first or self.clock[0]
            self.live[rid] = (want, toks, first)
            if len(toks) == want:
                del self.live[rid]
                events.append((rid, len(toks), True, toks, first if self.own_first else None))
        return events


def test_drive_times_first_tokens_and_tpot() -> None:
    clock = [0.0]
    res = peer_child.drive(FakeEngine(clock, own_first=True), [[1], [2, 3]], [2, 5],
                           clock=lambda: clock[0])
    assert res["outputs"] == [[0, 1], [0, 1, 2, 3, 4]]
    assert res["ttft_s"] == [1.0, 1.0]  # the engine's own first-token times
    assert res["tpot_s"] == [1.0, 1.0]  # (finish - first) / (tokens - 1)
    assert res["seconds"] == 5.0


def test_without_engine_times_the_first_report_counts() -> None:
    clock = [0.0]
    res = peer_child.drive(FakeEngine(clock), [[1]], [3], clock=lambda: clock[0])
    assert res["ttft_s"] == [3.0] and res["tpot_s"] == [0.0]


def test_sequential_level_runs_one_request_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    monkeypatch.setattr(peer_child.time, "monotonic", lambda: clock[0])
    level = {"name": "c1", "sequential": True, "prompts": [[1], [2]], "output_lens": [2, 3]}
    res = peer_child.run_level(FakeEngine(clock), level)
    assert res["seconds"] == 5.0  # 2 steps + 3 steps: never together
    assert res["ttft_s"] == [2.0, 3.0] and res["name"] == "c1"
    assert [len(o) for o in res["outputs"]] == [2, 3]


def test_cpu_time_counts_child_processes() -> None:
    before = peer_child.proc_tree_cpu_seconds()
    child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.process_time()\n"
                              "while time.process_time() - t < 0.5: pass\ntime.sleep(30)"])
    try:
        deadline = time.monotonic() + 20
        while peer_child.proc_tree_cpu_seconds() - before < 0.4 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert peer_child.proc_tree_cpu_seconds() - before >= 0.4
    finally:
        child.kill()
        child.wait()
