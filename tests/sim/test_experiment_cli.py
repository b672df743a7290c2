"""Bisection, comparison, report and CLI on a tiny two-model scenario."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from elasticserve.sim import cli_sim
from elasticserve.sim.experiment import compare, max_scale
from elasticserve.sim.report import markdown, to_json
from elasticserve.sim.scenarios import SCENARIOS, Scenario, get_scenario
from tests.sim.sim_helpers import alternating_bursts, config, qwen_models


def tiny() -> Scenario:
    return Scenario("tiny", "2x Qwen3-0.6B, alternating bursts", qwen_models("a", "b"),
                    config(4, ttft_slo_s=0.5),
                    alternating_bursts(("a", "b"), rate=6, on_s=2, periods=2),
                    rate_label="burst req/s", rate_at=lambda s: 6 * s, start_scale=1.0,
                    bisect_iters=2)


def test_max_scale_brackets_then_bisects() -> None:
    best, probes, passed = max_scale(tiny(), "static", seed=0)
    assert best > 0 and best in passed
    assert any(not p.passed for p in probes)  # the search found a failing scale above best
    failing = min(p.scale for p in probes if not p.passed)
    assert best < failing <= 2 * best * 1.001
    assert all(p.attainment >= 0.99 for p in probes if p.passed)


def test_compare_reports_every_policy_at_the_reference_load() -> None:
    comp = compare(tiny(), seed=0)
    assert set(comp.outcomes) == {"static", "elastic", "arbiter"}
    static, arbiter = comp.outcomes["static"], comp.outcomes["arbiter"]
    assert comp.ref_scale == static.max_scale
    assert arbiter.max_rate >= static.max_rate and comp.ratio() >= 1.0
    for out in comp.outcomes.values():
        assert out.summary is not None and out.summary.requests > 0
        assert out.reference is not None and not out.reference.stopped_early
    text = markdown(comp)
    assert "| static |" in text and "| arbiter |" in text and "arbiter / static" in text
    doc = json.loads(json.dumps(to_json(comp)))
    assert doc["policies"]["arbiter"]["max_rate"] == pytest.approx(arbiter.max_rate)
    assert doc["policies"]["static"]["probes"]


def test_cli_main_prints_table_and_writes_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(SCENARIOS, "tiny", tiny)
    out = tmp_path / "tiny.json"
    assert cli_sim.main(["tiny", "--seed", "1", "--policies", "static,arbiter",
                         "--json", str(out), "--gpu", "flops_eff=0.5"]) == 0
    text = capsys.readouterr().out
    assert "## tiny" in text and "| arbiter |" in text and "| elastic |" not in text
    assert set(json.loads(out.read_text())["policies"]) == {"static", "arbiter"}
    with pytest.raises(SystemExit):
        cli_sim.main(["tiny", "--policies", "lru"])
    with pytest.raises(SystemExit):
        cli_sim.main(["tiny", "--gpu", "nonsense"])


def test_cli_writes_its_docs_section_with_the_command(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(SCENARIOS, "tiny", tiny)
    docs = tmp_path / "BENCHMARKS.md"
    docs.write_text("# Benchmarks\n\n<!-- bench:other -->\nkept\n<!-- /bench:other -->\n")
    argv = ["tiny", "--seed", "1", "--policies", "static,arbiter", "--write-docs",
            "--docs-path", str(docs)]
    assert cli_sim.main(argv) == 0
    text = docs.read_text()
    body = text.split("<!-- bench:sim-tiny -->")[1].split("<!-- /bench:sim-tiny -->")[0]
    assert "Command: `.venv/bin/python -m elasticserve.sim.cli_sim " + " ".join(argv) + "`" in body
    assert "### tiny:" in body and "| arbiter |" in body and "at commit " in body
    assert "<!-- bench:other -->\nkept\n<!-- /bench:other -->" in text
    first = body
    assert cli_sim.main(argv) == 0  # a rerun replaces the section; the results are deterministic
    again = docs.read_text()
    assert again.count("<!-- bench:sim-tiny -->") == 1
    table = [line for line in first.splitlines() if line.startswith("| ")]
    assert table == [line for line in again.split("<!-- bench:sim-tiny -->")[1].splitlines()
                     if line.startswith("| ")]


def test_target_verdict_uses_the_memory_ceiling() -> None:
    from elasticserve.sim.report import TARGET_RATIOS, docs_section

    comp = compare(tiny(), seed=0, policies=("static", "arbiter"), ceiling=True)
    TARGET_RATIOS["tiny"] = 1000.0
    try:
        text = docs_section(comp, "cmd", "today", "abc123")
    finally:
        del TARGET_RATIOS["tiny"]
    assert "Target arbiter / static >= 1000x: **missed" in text
    assert "the target is out of reach" in text and "Command: `cmd`" in text


def test_write_plots(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from elasticserve.sim.report import write_plots

    comp = compare(tiny(), seed=0, policies=("static", "arbiter"))
    paths = write_plots(comp, str(tmp_path))
    assert len(paths) == 3 and all(Path(p).stat().st_size > 0 for p in paths)


def test_builtin_scenarios_build() -> None:
    for name in ("ramp3", "zipf16", "longctx"):
        scn = get_scenario(name)
        reqs = scn.requests(seed=0, scale=0.25)
        assert reqs and {r.model for r in reqs} <= {m.name for m in scn.models}
    ramp = get_scenario("ramp3").requests(seed=0)
    first = {m: min(r.arrival for r in ramp if r.model == m) for m in {r.model for r in ramp}}
    assert sorted(first, key=first.__getitem__) == ["llama8b-0", "llama8b-1", "llama8b-2"]
    assert {r.output_len for r in ramp} == {256, 400} and {r.input_len for r in ramp} == {256}
    with pytest.raises(KeyError):
        get_scenario("nope")
