"""`bench peer_online` end to end against two fake OpenAI servers (no model, no vLLM): server
start and stop, the shared client, the ABBA order, the ratios and the docs section."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from elasticserve.bench import peer_online
from elasticserve.bench.peer_online_report import markdown

# A streaming /v1/completions: one token per chunk, `delay` seconds apart (ours 1 ms, vLLM 2 ms),
# then a usage chunk; FAKE_SHORT makes it stop one token early.
FAKE = r'''
import json, os, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
engine, port = sys.argv[1], int(sys.argv[2])
delay = 0.001 if engine == "elasticserve" else 0.002
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    def log_message(self, *a): pass
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404); self.end_headers()
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        n = body["max_tokens"] - (1 if os.environ.get("FAKE_SHORT") else 0)
        self.send_response(200); self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for i in range(n):
            time.sleep(delay)
            chunk = {"choices": [{"index": 0, "text": "x"}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode()); self.wfile.flush()
        usage = {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": n}}
        self.wfile.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
'''


@pytest.fixture()
def cfg(tmp_path: Path) -> peer_online.OnlineConfig:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"vocab_size": 100}))
    script = tmp_path / "fake_server.py"
    script.write_text(FAKE)

    def fake(engine: str) -> peer_online.ServerCommand:
        return lambda _cfg, port: [sys.executable, str(script), engine, str(port)]

    return peer_online.OnlineConfig(
        str(tmp_path / "model"), concurrency=(1, 4), repeats=2, requests_per_slot=1,
        start_timeout_s=30, request_timeout_s=30,
        servers={peer_online.OURS: fake(peer_online.OURS), peer_online.PEER: fake(peer_online.PEER)})


def test_online_report_from_fake_servers(cfg: peer_online.OnlineConfig) -> None:
    res = peer_online.run_online(cfg, log=lambda _: None)
    assert res.order == ["elasticserve", "vllm", "vllm", "elasticserve"]
    assert [len(lv) for lv in res.levels] == [4, 4]
    run = res.runs["elasticserve"][0][1]
    assert run.failed() == 0 and run.short() == 0
    assert run.output_tokens() == sum(s.output_len for s in res.levels[1])
    tpot_ours = sorted(run.tpot())[len(run.tpot()) // 2]
    tpot_peer = sorted(res.runs["vllm"][0][1].tpot())[2]
    assert tpot_ours < tpot_peer  # the fake vLLM is twice as slow per token
    text = markdown(res, "CMD --concurrency 1,4")
    assert "- command: `CMD --concurrency 1,4`" in text
    assert "| c=1 | elasticserve | 4 | 0 / 0 |" in text
    assert "- c=4: ours / vLLM output tok/s" in text
    assert "TPOT P50 at c=1, ours / vLLM:" in text
    assert len(res.load) == 5


def test_short_outputs_are_counted(cfg: peer_online.OnlineConfig,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_SHORT", "1")
    cfg.repeats, cfg.concurrency, cfg.requests_per_slot = 1, (2,), 3
    res = peer_online.run_online(cfg, log=lambda _: None)
    run = res.runs["vllm"][0][0]
    assert run.short() == len(res.levels[0]) and run.failed() == 0
    assert "| c=2 | elasticserve | 6 | 0 / 6 |" in markdown(res, "CMD")


def test_bad_config_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="concurrency"):
        peer_online.OnlineConfig(str(tmp_path), concurrency=(0,))
    with pytest.raises(ValueError, match="requests_per_slot"):
        peer_online.OnlineConfig(str(tmp_path), requests_per_slot=0)


def test_commands_name_the_same_model_and_limits(tmp_path: Path) -> None:
    cfg = peer_online.OnlineConfig(str(tmp_path), max_model_len=512, served_name="m")
    ours, theirs = peer_online.ours_command(cfg, 1234), peer_online.vllm_command(cfg, 1234)
    assert f"m={tmp_path}" in ours and ["--served-model-name", "m"] == theirs[5:7]
    for argv in (ours, theirs):
        assert argv[argv.index("--max-model-len") + 1] == "512"
        assert argv[argv.index("--port") + 1] == "1234"
    assert "float32" in theirs
