"""Seconds-long smoke tests of the offline and elastic-overhead benchmarks on the tiny model.

They check structure and that both systems really generated (exact lengths, in-vocabulary,
greedy parity between our engine and transformers), never timings.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

from elasticserve.bench import elastic_overhead, offline, report  # noqa: E402
from elasticserve.models.make_model import make_model  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_model("llama", "tiny", str(tmp_path_factory.mktemp("bench") / "tiny"))


def _quiet(_: str) -> None:
    pass


def test_offline_runs_ours_and_both_baselines(tiny: str) -> None:
    cfg = offline.OfflineConfig(tiny, requests=4, threads=1, prompt_lens=(8, 40),
                                output_lens=(3, 9), single_requests=2, sweep_sizes=(2, 4),
                                sweep_requests=2, engine_runs=2)
    res = offline.run_offline(cfg, log=_quiet)
    assert len(res.ours) == 2 and len(res.single_idx) == 2
    assert res.static.extra["batch_size"] in res.sweep and set(res.sweep) <= {2, 4}
    for run in [*res.ours, res.single, res.static, *res.sweep.values()]:
        assert [len(o) for o in run.outputs] == run.workload.output_lens
        assert all(0 <= t < 512 for out in run.outputs for t in out)
        assert run.seconds > 0 and run.tokens_per_s > 0
    ours = res.ours[0]
    assert len({t for out in ours.outputs for t in out}) > 3  # real text, not one token
    assert all(r.outputs == ours.outputs for r in res.ours)  # greedy is deterministic
    assert [ours.outputs[i] for i in res.single_idx] == res.single.outputs  # parity with HF
    assert ours.steps > 0 and ours.extra["bytes"] > 0 and ours.extra["prefix_hits"] == 0
    text = offline.markdown(res, ["--requests", "4"])
    assert text.count("\n| ") == 4 and "speedup" in text and "--requests 4" in text
    assert "2/2 outputs identical" in text
    assert text.count("(our runs ") == 2 and "between two of ours" in text


def test_static_batches_left_pad_to_the_same_greedy_tokens(tiny: str) -> None:
    model = offline.load_hf(tiny)
    wl = offline.make_workload(3, 512, seed=5, prompt_lens=(4, 30), output_lens=(2, 7))
    single = offline.hf_static(model, wl, 1, "one at a time")
    batched = offline.hf_static(model, wl, 3, "padded")
    assert batched.outputs == single.outputs


def test_elastic_overhead_alternates_modes(tiny: str) -> None:
    cfg = elastic_overhead.OverheadConfig(tiny, requests=3, threads=1, runs=2,
                                          kv_cache_bytes=64 << 20, prompt_lens=(8, 40),
                                          output_lens=(3, 9))
    res = elastic_overhead.run_overhead(cfg, log=_quiet)
    assert [len(res.runs[m]) for m in ("static", "elastic")] == [2, 2]
    assert res.order == ["static", "elastic", "elastic", "static"]  # ABBA: neither always first
    assert res.outputs_match
    elastic = res.runs["elastic"][-1].extra
    assert elastic["memory"]["grow_events"] >= 1 and elastic["peak_mapped_bytes"] > 0
    assert res.runs["static"][0].extra["memory"]["kv_mapped_bytes"] == 64 << 20
    text = elastic_overhead.markdown(res, None)
    assert "elastic overhead" in text and "| static |" in text and "| elastic |" in text
    assert "S E E S" in text and f"verdict: **{res.verdict}**" in text
    assert f"**{res.target_verdict}**" in text and len(res.pair_overheads_pct) == 2


def test_update_section_creates_then_replaces_only_its_section(tmp_path: Path) -> None:
    path = tmp_path / "docs" / "BENCHMARKS.md"
    report.update_section("offline", "first", path)
    report.update_section("elastic-overhead", "other", path)
    report.update_section("offline", "second\nrun", path)
    text = path.read_text()
    assert text.startswith("# Benchmarks")
    assert "first" not in text and "<!-- bench:offline -->\nsecond\nrun\n<!-- /bench:offline -->" in text
    assert text.count("<!-- bench:elastic-overhead -->") == 1 and "other" in text
    with pytest.raises(ValueError, match="malformed"):
        report.replace_section("<!-- /bench:x -->\n<!-- bench:x -->", "x", "body")
    with pytest.raises(ValueError, match="section name"):
        report.markers("bad name -->")
