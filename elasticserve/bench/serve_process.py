"""Start ``elasticserve serve`` as a child process on a loopback port, for benchmarks.

The child binds 127.0.0.1 only, port 0 unless one is given: the kernel picks a free port and
the child reports it through ``--port-file`` (probing for a free port and closing it first
could lose the port to another process). :func:`serve_process` waits for the port and for
``/health`` (bounded) and always stops the child on exit (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import IO, Any

import httpx


@contextlib.contextmanager
def serve_process(argv: list[str], port: int | None = None,
                  start_timeout_s: float = 180.0) -> Iterator[str]:
    """``elasticserve serve *argv`` on 127.0.0.1; yields its base URL once /health answers."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryFile("w+") as log:
        port_file = os.path.join(tmp, "port")
        cmd = [sys.executable, "-m", "elasticserve.cli", "serve", *argv, "--host", "127.0.0.1",
               "--port", str(port or 0), "--port-file", port_file, "--log-level", "warning",
               # SIGTERM drains in-flight requests this long: well inside the wait below
               "--shutdown-timeout", "5"]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + start_timeout_s
            bound = _wait_port(proc, port_file, deadline, log)
            url = f"http://127.0.0.1:{bound}"
            _wait_healthy(proc, url, deadline, log)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def _check_alive(proc: subprocess.Popen[Any], log: IO[str]) -> None:
    if proc.poll() is not None:
        log.seek(0)
        raise RuntimeError(f"the server exited with {proc.returncode}:\n{log.read()[-3000:]}")


def _wait_port(proc: subprocess.Popen[Any], port_file: str, deadline: float,
               log: IO[str]) -> int:
    """The port the child bound, once it has written it (the file appears whole)."""
    while time.monotonic() < deadline:
        _check_alive(proc, log)
        with contextlib.suppress(FileNotFoundError):
            with open(port_file) as f:
                return int(f.read())
        time.sleep(0.1)
    raise RuntimeError("the server did not report its port in time")


def _wait_healthy(proc: subprocess.Popen[Any], url: str, deadline: float, log: IO[str]) -> None:
    while time.monotonic() < deadline:
        _check_alive(proc, log)
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError("the server did not answer /health in time")
