"""Trace replay: JSONL and Azure CSV parse; bad rows name their line and problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from elasticserve.workload.generators import RequestSpec
from elasticserve.workload.trace import (
    load_azure_csv,
    load_jsonl,
    load_trace,
    load_traces,
    parse_azure_csv,
    parse_jsonl,
    scale_rate,
    write_jsonl,
)

GOOD = [
    '{"timestamp": 10.0, "model": "a", "input_len": 5, "output_len": 7}',
    "",
    '{"timestamp": 10.5, "model": "b", "input_len": 3, "output_len": 1}',
]


def test_jsonl_round_trip(tmp_path: Path) -> None:
    reqs = parse_jsonl(GOOD)
    assert reqs == [RequestSpec(0.0, "a", 5, 7), RequestSpec(0.5, "b", 3, 1)]
    path = tmp_path / "t.jsonl"
    write_jsonl(reqs, path)
    assert load_jsonl(path) == reqs == load_trace(path)


@pytest.mark.parametrize(("line", "problem"), [
    ('{"timestamp": 11, "model": "a", "input_len": 5}', "missing field(s): output_len"),
    ('{"timestamp": 11, "model": "a", "input_len": -5, "output_len": 1}', "input_len must be >= 0"),
    ('{"timestamp": 9, "model": "a", "input_len": 5, "output_len": 1}', "out of order"),
    ('{"timestamp": 11, "model": "a", "input_len": 5, "output_len": 1', "bad JSON"),
    ('[1, 2]', "expected a JSON object"),
    ('{"timestamp": "soon", "model": "a", "input_len": 5, "output_len": 1}', "timestamp must be"),
    ('{"timestamp": 11, "model": 3, "input_len": 5, "output_len": 1}', "model must be"),
    ('{"timestamp": 11, "model": "a", "input_len": 2.5, "output_len": 1}', "must be an integer"),
])
def test_jsonl_errors_name_the_line(line: str, problem: str) -> None:
    lines = [GOOD[0], "", line]
    with pytest.raises(ValueError) as err:
        parse_jsonl(lines, "trace.jsonl")
    assert "trace.jsonl: line 3:" in str(err.value) and problem in str(err.value)


AZURE = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:15:46.6805900,374,44
2023-11-16 18:15:50.9951690,396,109
2023-11-16 18:15:51.0000000,1000,0
"""


def test_azure_csv(tmp_path: Path) -> None:
    path = tmp_path / "azure.csv"
    path.write_text(AZURE)
    reqs = load_azure_csv(path, model="m")
    assert [(r.input_len, r.output_len, r.model) for r in reqs] == [
        (374, 44, "m"), (396, 109, "m"), (1000, 0, "m")]
    assert reqs[0].arrival == 0.0
    assert reqs[1].arrival == pytest.approx(50.995169 - 46.68059, abs=1e-6)
    numeric = parse_azure_csv(["GeneratedTokens,TIMESTAMP,ContextTokens", "3,1.5,10", "4,2.5,11"])
    assert numeric == [RequestSpec(0.0, "model0", 10, 3), RequestSpec(1.0, "model0", 11, 4)]


@pytest.mark.parametrize(("row", "problem"), [
    ("2023-11-16 18:15:47.0,-3,5", "ContextTokens must be >= 0"),
    ("2023-11-16 18:15:47.0,12", "expected 3 fields, got 2"),
    ("2023-11-16 18:15:40.0,3,5", "out of order"),
    ("yesterday,3,5", "neither seconds nor a date-time"),
    ("2023-11-16 18:15:47.0,3,lots", "GeneratedTokens must be an integer"),
])
def test_azure_csv_errors_name_the_line(row: str, problem: str) -> None:
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens", "2023-11-16 18:15:46.0,1,1", row]
    with pytest.raises(ValueError) as err:
        parse_azure_csv(lines, path="az.csv")
    assert "az.csv: line 3:" in str(err.value) and problem in str(err.value)


def test_azure_csv_header_problems() -> None:
    with pytest.raises(ValueError, match="line 1: header lacks column"):
        parse_azure_csv(["TIMESTAMP,ContextTokens", "1,2"])
    with pytest.raises(ValueError, match="line 1: empty file"):
        parse_azure_csv([])


def test_scale_rate_and_unknown_format(tmp_path: Path) -> None:
    reqs = parse_jsonl(GOOD)
    assert [r.arrival for r in scale_rate(reqs, 2.0)] == [0.0, 0.25]
    with pytest.raises(ValueError):
        scale_rate(reqs, 0)
    with pytest.raises(ValueError, match="unknown trace format"):
        load_trace(tmp_path / "t.parquet")


def test_merged_traces_name_csv_models_and_interleave(tmp_path: Path) -> None:
    conv, code = tmp_path / "conv.csv", tmp_path / "code.csv"
    conv.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n50,10,1\n52,11,2\n", encoding="utf-8")
    code.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n7,20,3\n8,21,4\n9.5,22,5\n",
                    encoding="utf-8")
    merged = load_traces([("chat", conv), ("coder", code)])
    # each trace starts at 0; arrivals interleave, ties keep file order
    assert merged == [RequestSpec(0.0, "chat", 10, 1), RequestSpec(0.0, "coder", 20, 3),
                      RequestSpec(1.0, "coder", 21, 4), RequestSpec(2.0, "chat", 11, 2),
                      RequestSpec(2.5, "coder", 22, 5)]
    assert {r.model for r in load_traces([(None, conv), (None, code)])} == {"model0", "model1"}
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text(GOOD[0] + "\n", encoding="utf-8")
    assert load_traces([(None, jsonl), ("x", conv)])[0].model == "a"
    with pytest.raises(ValueError, match="names its models in its rows"):
        load_traces([("x", jsonl)])
