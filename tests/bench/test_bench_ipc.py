"""The transport micro-benchmark runs (our side) and times real round trips."""

from __future__ import annotations

from elasticserve.bench.ipc import payload, time_channel


def test_channel_round_trips_between_two_processes() -> None:
    rtts = time_channel(payload(4), 50)
    assert len(rtts) == 50
    assert all(0 < t < 5.0 for t in rtts)
