"""Start ``elasticserve serve`` as a child process on a free loopback port, for benchmarks.

The child binds 127.0.0.1 only; :func:`serve_process` waits for ``/health`` (bounded) and
always stops the child on exit (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import IO, Any

import httpx


def free_port() -> int:
    """A loopback port free right now (the child binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def serve_process(argv: list[str], port: int | None = None,
                  start_timeout_s: float = 180.0) -> Iterator[str]:
    """``elasticserve serve *argv`` on 127.0.0.1; yields its base URL once /health answers."""
    port = port or free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "elasticserve.cli", "serve", *argv, "--host", "127.0.0.1",
           "--port", str(port), "--log-level", "warning"]
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            _wait_healthy(proc, url, start_timeout_s, log)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def _wait_healthy(proc: subprocess.Popen[Any], url: str, timeout_s: float, log: IO[str]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{log.read()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"the server did not answer /health within {timeout_s:.0f} s")
