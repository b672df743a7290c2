"""`elasticserve top` against real servers: a wrong token, a closed port, admin routes off, a
server that stops and one that comes back, and Ctrl-C. Every failure is one line, no traceback."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from rich.console import Console

from elasticserve.cli import main
from elasticserve.engine.args import EngineArgs
from elasticserve.engine.async_engine import AsyncEngine
from elasticserve.engine.multi_model import ModelPool, ModelSpec, checkpoint_bytes
from elasticserve.server import top
from elasticserve.server.api_server import build_app

TOKEN = "t0p-secret"
ROOT = Path(__file__).resolve().parents[2]


class CountingApp:
    """The app, counting the /admin/memory requests it got: tests wait on real polls."""

    def __init__(self, app: Any) -> None:
        self.app, self.hits = app, 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/admin/memory":
            self.hits += 1
        await self.app(scope, receive, send)


@contextlib.contextmanager
def serving(app: Any, port: int = 0) -> Iterator[str]:
    """uvicorn on `port` (0: a free one) in a thread; stops it on exit, so a test can bring a
    server down and up again on the same port."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, "uvicorn to start")
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def wait_for(cond: Callable[[], Any], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def admin_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CountingApp]:
    from elasticserve.models.make_model import make_model

    model = make_model("llama", "tiny", str(tmp_path_factory.mktemp("top") / "m"))
    pool = ModelPool([ModelSpec("m", model)], checkpoint_bytes(model) + (4 << 20),
                     EngineArgs(model=""), page_size=64 << 10)
    engines = {n: AsyncEngine(e, name=n) for n, e in pool.engines.items()}
    yield CountingApp(build_app(engines, pool=pool, admin_token=TOKEN))
    for engine in engines.values():
        engine.shutdown()


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "160")  # rich wraps the table's headings at 80 columns


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def top_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["top", *argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return rc, out, err


def test_once_prints_the_table(admin_app: CountingApp, capsys: pytest.CaptureFixture[str]) -> None:
    with serving(admin_app) as url:
        rc, out, err = top_main(capsys, "--url", url, "--admin-token", TOKEN, "--once")
    assert (rc, err) == (0, "")
    assert "budget" in out and "KV mapped" in out and "│ m " in out


def test_wrong_token_is_one_line_and_exit_3(admin_app: CountingApp,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    with serving(admin_app) as url:
        for extra in (["--once"], ["--iterations", "3", "--interval", "0.01"]):
            rc, out, err = top_main(capsys, "--url", url, "--admin-token", "wrong", *extra)
            assert rc == top.EXIT_AUTH == 3
            assert err.count("\n") == 1 and "refused the admin token" in err and out == ""


def test_closed_port_is_unreachable_exit_4(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for extra in (["--once"], ["--iterations", "3"]):
        rc, out, err = top_main(capsys, "--url", url, "--admin-token", TOKEN, *extra)
        assert rc == top.EXIT_UNREACHABLE == 4
        assert err.count("\n") == 1 and "cannot reach" in err and "connection refused" in err


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str],
                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ELASTICSERVE_ADMIN_TOKEN", raising=False)
    rc, _, err = top_main(capsys, "--url", "http://127.0.0.1:1")
    assert rc == 2 and err.count("\n") == 1 and "--admin-token" in err
    rc, _, err = top_main(capsys, "--admin-token", "x", "--interval", "0")
    assert rc == 2 and err.count("\n") == 1
    with pytest.raises(SystemExit) as exc:
        main(["top", "--interval", "soon"])
    assert exc.value.code == 2


def test_admin_routes_off_exit_5(base_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    # the session server is built without a pool or token: no /admin routes at all
    rc, _, err = top_main(capsys, "--url", base_url, "--admin-token", TOKEN, "--once")
    assert rc == top.EXIT_BAD_SERVER == 5
    assert err.count("\n") == 1 and "--admin-token" in err


def answering(status: int, body: bytes) -> Callable[..., Any]:
    """An ASGI app that answers every request with `status` and JSON `body`."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})

    return app


@pytest.mark.parametrize(("status", "body"), [(500, b"{}"), (200, b'{"ok": true}'), (200, b"<")])
def test_not_a_memory_report_exit_5(status: int, body: bytes,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    with serving(answering(status, body)) as url:
        for extra in (["--once"], ["--iterations", "2", "--interval", "0.01"]):
            rc, out, err = top_main(capsys, "--url", url, "--admin-token", TOKEN, *extra)
            assert rc == top.EXIT_BAD_SERVER and err.count("\n") == 1 and out == ""
            assert (f"HTTP {status}" in err) and (status == 500 or "memory report" in err)


def test_help_documents_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["top", "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and out.startswith("usage: elasticserve top")
    for line in ("0  done: Ctrl-C", "2  bad usage", "3  the server refused", "4  the server could"):
        assert line in out


def test_server_that_stops_is_retried_until_the_iteration_limit(
        admin_app: CountingApp, capsys: pytest.CaptureFixture[str]) -> None:
    result: list[int] = []
    with serving(admin_app) as url:
        start = admin_app.hits
        args = ["--url", url, "--admin-token", TOKEN, "--interval", "0.05", "--iterations", "40"]
        thread = threading.Thread(target=lambda: result.append(main(["top", *args])))
        thread.start()
        wait_for(lambda: admin_app.hits >= start + 2, "top to poll")
    thread.join(30)  # the server is gone: top keeps polling until its 40 polls are done
    out, err = capsys.readouterr()
    assert result == [0] and "Traceback" not in out + err
    assert err.count("\n") == 1 and "reconnecting..." in err and "connection refused" in err
    assert "reconnecting..." in out and "budget" in out  # the last view: stale table + status


def test_server_that_comes_back_is_reconnected(admin_app: CountingApp) -> None:
    port, err, stop = free_port(), io.StringIO(), threading.Event()
    url, result = f"http://127.0.0.1:{port}", []
    console = Console(file=io.StringIO(), width=150)
    thread = threading.Thread(target=lambda: result.append(
        top.run(url, TOKEN, 0.02, None, console, err, stop)))
    with serving(admin_app, port):
        start = admin_app.hits
        thread.start()
        wait_for(lambda: admin_app.hits >= start + 2, "top to poll")
    wait_for(lambda: "reconnecting..." in err.getvalue(), "top to notice the server left")
    assert thread.is_alive()
    with serving(admin_app, port):
        wait_for(lambda: "reconnected" in err.getvalue(), "top to reconnect")
        stop.set()
        thread.join(10)
    assert result == [0]
    lines = err.getvalue().splitlines()
    assert len(lines) == 2 and "lost" in lines[0] and "reconnected to" in lines[1]


def test_ctrl_c_exits_0_without_traceback(admin_app: CountingApp) -> None:
    with serving(admin_app) as url:
        start = admin_app.hits
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen([sys.executable, "-m", "elasticserve.cli", "top", "--url", url,
                                 "--admin-token", TOKEN, "--interval", "0.05"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: admin_app.hits >= start + 2 or proc.poll() is not None, "top")
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "budget" in out  # the last table stays on screen
