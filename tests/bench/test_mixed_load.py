"""The mixed load shared by `bench pd` and `bench slo-engine`: seeded arrivals with bursts, the
flags, and the median table (no server is started here)."""

from __future__ import annotations

import argparse

from elasticserve.bench.mixed_load import add_load_args, load_from_args, median_rows


def _load(argv: list[str]):  # type: ignore[no-untyped-def]
    p = argparse.ArgumentParser()
    add_load_args(p, short_len="48:96", short_rate=2.0, long_len="1536:8", long_rate=0.25)
    return load_from_args(p.parse_args(argv))


def test_arrivals_are_seeded_and_long_ones_come_in_bursts() -> None:
    load = _load(["--duration", "60", "--long-burst", "3", "--long-len", "900:4"])
    specs = load.specs(0)
    assert specs == load.specs(0) and specs != load.specs(1)
    longs = [s for s in specs if s.input_len == 900]
    assert longs and len(longs) % 3 == 0
    assert all(longs[i].arrival == longs[i + 1].arrival == longs[i + 2].arrival
               for i in range(0, len(longs), 3))
    assert all(s.output_len == 96 for s in specs if s.input_len == 48)
    assert [s.arrival for s in specs] == sorted(s.arrival for s in specs)


def test_the_median_table_marks_missing_classes() -> None:
    runs = {"a": [{"x": 10.0}, {"x": 30.0}], "b": [{"x": 5.0}, {"x": 15.0}]}
    rows = median_rows(runs, "a", "b", (("x", "X ms"), ("y", "Y ms")))
    assert rows[2] == "| X ms | 20.0 | 10.0 | 0.50x | 100% |"
    assert rows[3] == "| Y ms | - | - | - | - |"
