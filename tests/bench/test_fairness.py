"""The report logic every A-vs-B benchmark shares: run order, spread, verdicts, section writing.
Pure functions: no engine, no timing."""

from __future__ import annotations

from pathlib import Path

import pytest

from elasticserve import docs_section
from elasticserve.bench import fairness
from elasticserve.bench.core_step import table_row


def test_abba_alternates_which_side_runs_first() -> None:
    orders = fairness.abba("static", "elastic", 4)
    assert orders == [("static", "elastic"), ("elastic", "static"),
                      ("static", "elastic"), ("elastic", "static")]
    firsts = [pair[0] for pair in orders]
    assert firsts.count("static") == firsts.count("elastic") == 2
    assert [p[0] for p in fairness.abba("a", "b", 3)] == ["a", "b", "a"]
    assert fairness.abba("a", "b", 0) == []


def test_spread_is_the_range_over_the_median() -> None:
    assert fairness.spread_pct([379.1, 410.5, 434.3]) == pytest.approx(100 * 55.2 / 410.5)
    assert fairness.spread_pct([5.0]) == 0.0
    assert fairness.noise_pct([100, 110], [100, 102]) == pytest.approx(100 * 10 / 105)
    assert fairness.diff_pct([110, 110], [100, 100]) == pytest.approx(10.0)


def test_verdict_is_within_noise_inside_the_spread_and_directed_outside() -> None:
    assert fairness.verdict(-9.6, 13.6) == fairness.WITHIN_NOISE
    assert fairness.verdict(2.0, 2.0) == fairness.WITHIN_NOISE  # on the edge: not resolved
    assert fairness.verdict(5.0, 3.0) == "faster"
    assert fairness.verdict(-5.0, 3.0) == "slower"
    assert fairness.verdict(-5.0, 3.0, "elastic slower", "elastic faster") == "elastic faster"
    assert fairness.verdict(0.5, 0.0) == "faster"  # no spread measured: any difference counts


def test_target_is_met_only_when_the_whole_noise_band_meets_it() -> None:
    # the old elastic-overhead report: -9.6% with a ~14% spread against a <= 3% target
    assert fairness.target_verdict(-9.6, 13.6, 3.0) == "within noise of the target"
    assert fairness.target_verdict(-9.6, 5.0, 3.0) == "met"
    assert fairness.target_verdict(9.0, 5.0, 3.0) == "MISSED"
    assert fairness.range_verdict(8.2, 9.5, 8.0, higher_is_better=True) == "met"
    assert fairness.range_verdict(7.5, 9.5, 8.0, higher_is_better=True) == \
        "within noise of the target"
    assert fairness.range_verdict(5.0, 7.9, 8.0, higher_is_better=True) == "MISSED"


def test_core_step_judges_the_tail_as_well_as_the_median() -> None:
    row = table_row("decode", [(0.7, 9.5), (0.8, 8.0), (0.9, 12.0)], 1.0)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "0.800 (0.700-0.900)" and cells[2] == "9.500 (8.000-12.000)"
    assert cells[3] == "<= 1 ms: met" and cells[4] == "<= 1 ms: MISSED"
    mixed = table_row("decode", [(0.9, 0.5), (1.1, 0.9)], 1.0)
    assert "<= 1 ms: within noise of the target" in mixed


def test_section_writer_replaces_only_its_own_block(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n<!-- bench:a -->\nold a\n<!-- /bench:a -->\n\n"
                    f"{docs_section.COMMENTARY} a reading of a.\n\n"
                    "<!-- bench:b -->\nold b\n<!-- /bench:b -->\n")
    docs_section.update_section("a", "new a", path)
    text = path.read_text()
    assert "<!-- bench:a -->\nnew a\n<!-- /bench:a -->" in text and "old a" not in text
    assert f"{docs_section.COMMENTARY} a reading of a." in text  # commentary outside: kept
    assert "<!-- bench:b -->\nold b\n<!-- /bench:b -->" in text
    docs_section.update_section("c", "new c", path)
    assert path.read_text().rstrip().endswith("<!-- bench:c -->\nnew c\n<!-- /bench:c -->")
    with pytest.raises(ValueError, match="more than once"):
        docs_section.replace_section(text + text, "a", "x")


def test_command_line_quotes_what_needs_it() -> None:
    line = docs_section.command_line("elasticserve.sim.cli_sim", ["trace", "--trace", "a b.csv"])
    assert line == ".venv/bin/python -m elasticserve.sim.cli_sim trace --trace 'a b.csv'"


def test_ab_commits_overhead_lines_compare_modes_per_side() -> None:
    from elasticserve.bench.ab_commits import Side, overhead_lines

    def side(name: str, values: list[float]) -> Side:
        return Side(name, ".", tok_s=values)

    sides = {"elastic": (side("base", [90, 91]), side("head", [50, 51])),
             "static": (side("base", [100, 100]), side("head", [100, 101]))}
    lines = overhead_lines(sides)
    assert any(line.startswith("- base: -9.5%") and "slower" in line for line in lines)
    assert any(line.startswith("- head: -49.8%") and "slower" in line for line in lines)
    assert overhead_lines({"elastic": sides["elastic"]}) == []
