"""``elasticserve bench ipc``: the worker transport (procs/transport.py: pickle over a Unix
socket) against ZeroMQ (pyzmq PAIR over ipc://, vLLM's transport) with the same pickled
payload: round-trip time of a step-sized message between two processes, alternated.

pyzmq is not a dependency: install it to run the comparison (``pip install pyzmq``); without it
only our transport is measured. Run: ``python -m elasticserve.bench.ipc --write-docs``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from elasticserve import docs_section
from elasticserve.bench.fairness import spread_pct
from elasticserve.procs.transport import Channel, channel_pair


def payload(batch: int) -> dict[str, Any]:
    """About what one decode step of `batch` streaming requests sends back."""
    outs = [{"request_id": f"req-{i:032x}", "token_ids": list(range(128)), "text": "x" * 512,
             "finished": False, "logprobs": None} for i in range(batch)]
    return {"outputs": outs, "stats": {f"counter_{k}": k for k in range(24)},
            "memory": {f"bytes_{k}": k << 20 for k in range(12)}}


def _echo_channel(sock_fd: int) -> None:
    import socket

    ch = Channel(socket.socket(fileno=sock_fd))
    while True:
        msg, _ = ch.recv()
        if msg is None:
            return
        ch.send(msg)


def _echo_zmq(path: str) -> None:
    import zmq

    sock: Any = zmq.Context.instance().socket(zmq.PAIR)
    sock.connect(f"ipc://{path}")
    while True:
        msg = sock.recv_pyobj()
        if msg is None:
            return
        sock.send_pyobj(msg)


def _round_trips(send: Callable[[object], object], recv: Callable[[], object], msg: object,
                 n: int) -> list[float]:
    rtts = []
    for _ in range(n):
        t = time.perf_counter()
        send(msg)
        recv()
        rtts.append(time.perf_counter() - t)
    return rtts


def time_channel(msg: object, n: int) -> list[float]:
    a, b = channel_pair()
    proc = mp.get_context("fork").Process(target=_echo_channel, args=(b.sock.detach(),))
    proc.start()
    rtts = _round_trips(a.send, a.recv, msg, n)
    a.send(None)
    proc.join(10)
    return rtts


def time_zmq(msg: object, n: int) -> list[float]:
    import zmq

    path = os.path.join(tempfile.mkdtemp(), "ipc.sock")
    sock: Any = zmq.Context.instance().socket(zmq.PAIR)
    sock.bind(f"ipc://{path}")
    proc = mp.get_context("spawn").Process(target=_echo_zmq, args=(path,))
    proc.start()
    rtts = _round_trips(sock.send_pyobj, sock.recv_pyobj, msg, n)
    sock.send_pyobj(None)
    proc.join(10)
    sock.close()
    return rtts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="elasticserve bench ipc", description=__doc__)
    p.add_argument("--batch", type=int, default=8, help="requests per step message")
    p.add_argument("--messages", type=int, default=3000, help="round trips per run")
    p.add_argument("--rounds", type=int, default=3, help="alternated runs per transport")
    p.add_argument("--write-docs", action="store_true", help="write docs/BENCHMARKS.md")
    args = p.parse_args(argv)
    try:
        import zmq  # noqa: F401
        sides = {"unix socket + pickle (ours)": time_channel, "pyzmq PAIR + pickle": time_zmq}
    except ImportError:
        sides = {"unix socket + pickle (ours)": time_channel}
    msg = payload(args.batch)
    medians: dict[str, list[float]] = {k: [] for k in sides}
    p99s: dict[str, list[float]] = {k: [] for k in sides}
    for r in range(args.rounds):
        for name in (list(sides) if r % 2 == 0 else list(reversed(sides))):
            rtts = sorted(sides[name](msg, args.messages))
            medians[name].append(statistics.median(rtts) * 1e6)
            p99s[name].append(rtts[int(0.99 * len(rtts))] * 1e6)
    size = len(__import__("pickle").dumps(msg, protocol=5))
    cmd = docs_section.command_line("elasticserve.bench.ipc", argv or sys.argv[1:])
    lines = [f"Command: `{cmd}`",
             f"- date: {docs_section.today()}; commit: {docs_section.git_commit()}; "
             f"load before: {docs_section.load_average()}; message {size} bytes pickled "
             f"({args.batch} requests' step output); {args.messages} round trips x "
             f"{args.rounds} alternated runs", "",
             "| transport | round trip P50 us (median of runs) | P99 us | spread |",
             "|---|---|---|---|"]
    for name in sides:
        lines.append(f"| {name} | {statistics.median(medians[name]):.0f} | "
                     f"{statistics.median(p99s[name]):.0f} | {spread_pct(medians[name]):.0f}% |")
    body = "\n".join(lines)
    print(body)
    if args.write_docs:
        docs_section.update_section("ipc", "## Worker transport (issue 11)\n\n" + body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
