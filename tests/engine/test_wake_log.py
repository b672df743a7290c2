"""A wake logs what it cost: the server runs at INFO, so its log shows that a request for a
sleeping model waited on a reload, and for how long."""

from __future__ import annotations

import logging

import pytest

from elasticserve.engine.args import EngineArgs
from elasticserve.engine.multi_model import ModelPool, ModelSpec


def test_wake_logs_the_reload_and_its_time(tiny_llama: str,
                                           caplog: pytest.LogCaptureFixture) -> None:
    pool = ModelPool([ModelSpec("a", tiny_llama)], 64 << 20, EngineArgs(model=""))
    try:
        pool.sleep("a")
        with caplog.at_level(logging.INFO, logger="elasticserve"):
            assert pool.wake("a")
        messages = [r.getMessage() for r in caplog.records]
        loaded = messages[0]
        assert loaded.startswith(f"loaded {tiny_llama} (0.5M parameters) in "), messages
        assert loaded.endswith(" s") and float(loaded.split(" in ")[1][:-2]) >= 0
        latency = pool.engines["a"].wake_latencies_s[-1]
        assert messages[1] == f"woke {tiny_llama} in {latency:.2f} s"
    finally:
        pool.close()
