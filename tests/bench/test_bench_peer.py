"""`bench peer`'s report code, driven by a fake child (no vLLM, no model): the ABBA order, the
ratios, the greedy agreement count, the length check and the docs section."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from elasticserve.bench import peer

# Plays either engine: ours takes 1 s per level, vLLM 2 s, both 1 CPU-s; vLLM's first output of
# every level differs in its last token; FAKE_SHORT in the environment makes ours drop a token.
FAKE = r'''
import json, os, sys
engine, job_path, out_path = sys.argv[1:]
job = json.load(open(job_path))
levels = []
for lv in job["levels"]:
    outs = [[(7 * i + k) % 100 for k in range(n)] for i, n in enumerate(lv["output_lens"])]
    if engine == "vllm":
        outs[0][-1] += 1
    if engine == "elasticserve" and os.environ.get("FAKE_SHORT"):
        outs[0].pop()
    n = len(outs)
    levels.append({"name": lv["name"], "seconds": 1.0 if engine == "elasticserve" else 2.0,
                   "cpu_seconds": 1.0, "outputs": outs, "ttft_s": [0.01 * (i + 1) for i in range(n)],
                   "tpot_s": [0.02 if engine == "elasticserve" else 0.05] * n})
json.dump({"engine": engine, "levels": levels}, open(out_path, "w"))
'''


@pytest.fixture()
def cfg(tmp_path: Path) -> peer.PeerConfig:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"vocab_size": 100}))
    script = tmp_path / "fake_child.py"
    script.write_text(FAKE)
    fake = [sys.executable, str(script)]
    return peer.PeerConfig(str(tmp_path / "model"), concurrency=(1, 4), repeats=2,
                           sequential_requests=3, commands={peer.OURS: fake, peer.PEER: fake})


def test_report_from_a_fake_peer(cfg: peer.PeerConfig, tmp_path: Path) -> None:
    res = peer.run_peer(cfg, log=lambda _: None)
    assert res.order == ["elasticserve", "vllm", "vllm", "elasticserve"]
    assert [len(lv["prompts"]) for lv in res.job["levels"]] == [3, 4]
    assert res.job["levels"][0]["sequential"] and not res.job["levels"][1]["sequential"]
    rows, info = peer.level_rows(res, 1)
    assert info["ratio"] == pytest.approx(2.0)
    assert info["same"] == 3 and info["n"] == 4
    assert info["tpot_ratio"] == pytest.approx(0.4)
    text = peer.markdown(res, ["--concurrency", "1,4"])
    assert "python -m elasticserve.bench.peer --concurrency 1,4" in text
    assert "greedy outputs identical (last run of each): 5/7" in text
    assert "2.00x (2.00-2.00; >= 1.3x: met)" in text
    assert "TPOT P50 at c=1, ours / vLLM: 0.40x (<= 0.8x: met)" in text
    assert "1.00x per CPU-s" in text
    docs = tmp_path / "BENCHMARKS.md"
    peer.docs_section.update_section("peer", text, docs)
    assert "<!-- bench:peer -->" in docs.read_text()


def test_a_wrong_output_length_fails_the_run(cfg: peer.PeerConfig,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_SHORT", "1")
    with pytest.raises(RuntimeError, match="output lengths"):
        peer.run_peer(cfg, log=lambda _: None)


def test_bad_settings_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="concurrency"):
        peer.PeerConfig(str(tmp_path), concurrency=(0, 8))
    with pytest.raises(ValueError, match="repeats"):
        peer.PeerConfig(str(tmp_path), repeats=0)


def test_percentile_interpolates_like_numpy() -> None:
    assert peer.percentile([4.0, 1.0, 3.0, 2.0], 50) == pytest.approx(2.5)
    assert peer.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 99) == pytest.approx(4.96)
    assert peer.percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        peer.percentile([], 50)
