"""`elasticserve serve` in a real process: SIGTERM drains with a deadline and exits 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

SHUTDOWN_TIMEOUT_S = 2.0


@pytest.fixture
def server(tmp_path, model_dir: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    port_file = tmp_path / "port"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "elasticserve.cli", "serve", "--model", f"m={model_dir}",
           "--memory", "64MiB", "--port", "0", "--port-file", str(port_file),
           "--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S), "--log-level", "warning"]
    log = open(tmp_path / "log", "w+b")  # noqa: SIM115 - closed below, read on failure
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            assert proc.poll() is None, (tmp_path / "log").read_text()
            assert time.monotonic() < deadline, "the server did not report its port"
            time.sleep(0.05)
        yield proc, f"http://127.0.0.1:{int(port_file.read_text())}"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        log.close()


def _stream(url: str, max_tokens: int, lines: list[str], first: threading.Event,
            read: bool = True) -> None:
    """Stream a completion into `lines`; set `first` once a token arrived. With `read=False`
    stop reading after that (a client that stalls)."""
    body = {"model": "m", "prompt": "while True:", "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 0, "stream": True}
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    lines.append(line[6:])
                    first.set()
                    if not read:
                        time.sleep(60)  # the server must not wait for us
                        return
    except httpx.HTTPError as exc:
        lines.append(f"transport: {exc!r}")
    first.set()


def _start(url: str, max_tokens: int, read: bool = True) -> tuple[threading.Thread, list[str]]:
    lines: list[str] = []
    first = threading.Event()
    thread = threading.Thread(target=_stream, args=(url, max_tokens, lines, first, read),
                              daemon=True)
    thread.start()
    assert first.wait(60), "no first token"
    return thread, lines


def _wait_ready(url: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "no /health"
        time.sleep(0.1)


def test_sigterm_drains_then_aborts_at_the_deadline_and_exits_0(server) -> None:
    proc, url = server
    _wait_ready(url)
    short, short_lines = _start(url, max_tokens=24)
    endless, endless_lines = _start(url, max_tokens=2000)  # seconds of work: outlives the deadline
    _stalled, _ = _start(url, max_tokens=2000, read=False)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)

    # draining: no new connection is accepted, while the streams above still run
    deadline = sent + 1.5
    while True:
        try:
            httpx.get(f"{url}/health", timeout=0.5)
        except httpx.ConnectError:
            break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "still accepting connections after SIGTERM"
        time.sleep(0.05)

    rc = proc.wait(SHUTDOWN_TIMEOUT_S + 8)
    took = time.monotonic() - sent
    print(f"exit status {rc}, {took:.2f} s after SIGTERM")
    assert rc == 0, f"exit status {rc}"
    # it waited for the deadline, then: the abort, uvicorn's backstop (1 s later), the exit
    assert SHUTDOWN_TIMEOUT_S * 0.9 <= took < SHUTDOWN_TIMEOUT_S + 4, f"exit after {took:.1f} s"
    short.join(5)
    endless.join(5)

    # the short request was in flight at SIGTERM and ran to its end (graceful)
    assert short_lines[-1] == "[DONE]"
    finish = [json.loads(x)["choices"][0]["finish_reason"] for x in short_lines[:-1]]
    assert finish[-1] == "length" and len(finish) == 24
    # the endless one was cut at the deadline: an error event, then [DONE], not a hang
    assert endless_lines[-1] == "[DONE]", endless_lines[-3:]
    error = json.loads(endless_lines[-2])["error"]
    assert "shut down" in error["message"]
    assert len(endless_lines) < 2000
