"""A wake (and any model load) logs what it cost: the server runs at INFO, so its log shows
how long a request for a sleeping model waited on the reload."""

from __future__ import annotations

import logging

import pytest

from elasticserve.engine.args import EngineArgs
from elasticserve.engine.llm_engine import LLMEngine


def test_wake_logs_the_time_it_took(tiny_llama: str, caplog: pytest.LogCaptureFixture) -> None:
    engine = LLMEngine(EngineArgs(model=tiny_llama, num_kv_blocks=16))
    try:
        engine.sleep()
        with caplog.at_level(logging.INFO, logger="elasticserve"):
            assert engine.wake()
        messages = [r.getMessage() for r in caplog.records]
        assert any(m.startswith(f"loaded {tiny_llama} (0.") and m.endswith(" s")
                   for m in messages), messages
        woke = f"woke {tiny_llama} in {engine.wake_latencies_s[-1]:.2f} s"
        assert woke in messages
    finally:
        engine.close()
