"""Fitting log-normal lengths to a trace: recovery of known parameters, the report, bad files."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from elasticserve.cli import main as cli_main
from elasticserve.workload.fit_lengths import (
    QUANTILES,
    empirical_quantile,
    fit_trace,
    lognormal_quantile,
)
from elasticserve.workload.generators import LogNormal


def _azure_csv(path: Path, rows: list[tuple[int, int]]) -> Path:
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    lines += [f"2023-11-16 18:{i // 600:02d}:{(i // 10) % 60:02d}.{i % 10}000000,{a},{b}"
              for i, (a, b) in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_fit_recovers_known_parameters_from_an_azure_csv(tmp_path: Path) -> None:
    rng = random.Random(1)
    inp, out = LogNormal(900, 0.9, lo=2, hi=8000), LogNormal(150, 0.7, lo=1, hi=2000)
    rows = [(inp.sample(rng), out.sample(rng)) for _ in range(6000)]
    fi, fo = fit_trace(str(_azure_csv(tmp_path / "t.csv", rows)))
    assert fi.count == fo.count == 6000
    assert fi.fit.median == pytest.approx(900, rel=0.04) and fi.fit.sigma == pytest.approx(0.9, rel=0.04)
    assert fo.fit.median == pytest.approx(150, rel=0.04) and fo.fit.sigma == pytest.approx(0.7, rel=0.04)
    assert fi.fit.lo == min(r[0] for r in rows) and fi.fit.hi == max(r[0] for r in rows)
    # a log-normal sample judged against its own fit: quantiles agree
    for d, f in zip(fi.data_quantiles, fi.fit_quantiles, strict=True):
        assert f == pytest.approx(d, rel=0.08)


def test_quantile_helpers() -> None:
    assert empirical_quantile([1, 2, 3, 4], 0.5) == 2.5
    assert empirical_quantile([7], 0.9) == 7
    d = LogNormal(100, 0.5, lo=60, hi=120)
    assert lognormal_quantile(d, 0.5) == pytest.approx(100)
    assert lognormal_quantile(d, 0.01) == 60 and lognormal_quantile(d, 0.99) == 120


def test_cli_prints_table_and_constructors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [(100 + 10 * i, 20 + i) for i in range(50)]
    assert cli_main(["simulate", "fit-lengths", str(_azure_csv(tmp_path / "t.csv", rows))]) == 0
    out = capsys.readouterr().out
    assert "(50 requests)" in out and out.count("| input |") == 1
    assert len(re.findall(r"\d+ / \d+", out)) == 2 * len(QUANTILES)
    m = re.search(r"input: LogNormal\(median=([\d.]+), sigma=([\d.]+), lo=100, hi=590\)", out)
    assert m is not None and 100 < float(m.group(1)) < 590


def test_bad_trace_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n1.0,10,5\n2.0,-3,5\n", encoding="utf-8")
    with pytest.raises(SystemExit) as info:
        cli_main(["simulate", "fit-lengths", str(bad)])
    assert info.value.code == 2
    assert "line 3" in capsys.readouterr().err
    one = _azure_csv(tmp_path / "one.csv", [(10, 5)])
    with pytest.raises(ValueError, match="at least two requests"):
        fit_trace(str(one))



def test_write_docs_puts_the_fit_in_its_own_section(tmp_path: Path) -> None:
    from elasticserve.workload.fit_lengths import section_name

    rows = [(100 + 10 * i, 20 + i) for i in range(50)]
    trace = str(_azure_csv(tmp_path / "Azure_Conv.csv", rows))
    docs = tmp_path / "BENCHMARKS.md"
    assert cli_main(["simulate", "fit-lengths", trace, "--write-docs", "--docs-path",
                     str(docs)]) == 0
    text = docs.read_text()
    assert section_name(trace) == "fit-lengths-azure_conv"
    body = text.split("<!-- bench:fit-lengths-azure_conv -->")[1]
    assert body.startswith(f"\nCommand: `.venv/bin/python -m elasticserve.workload.fit_lengths "
                           f"{trace} --write-docs --docs-path {docs}`")
    assert "(50 requests)" in body and "<!-- /bench:fit-lengths-azure_conv -->" in body
