"""`elasticserve top`: a live terminal view of /admin/memory (rich).

Failures end in one line on stderr and an exit code a script can tell apart (see EXIT_CODES);
a server that goes away after top has reached it once is retried until it comes back.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, TextIO

MiB = 1 << 20
PROG = "elasticserve top"
EXIT_OK, EXIT_USAGE, EXIT_AUTH, EXIT_UNREACHABLE, EXIT_BAD_SERVER = 0, 2, 3, 4, 5
EXIT_CODES = f"""exit codes:
  {EXIT_OK}  done: Ctrl-C, --once or --iterations reached (also while reconnecting)
  {EXIT_USAGE}  bad usage (no admin token, bad option)
  {EXIT_AUTH}  the server refused the admin token (401/403)
  {EXIT_UNREACHABLE}  the server could not be reached at all (top never connected)
  {EXIT_BAD_SERVER}  the server answered, but not with a memory report (admin routes off: 404,
     another service, or an error status before the first report)

Once connected, a server that stops or fails (connection refused, timeout, 5xx) is retried
every --interval, showing "reconnecting..." until it is back."""


class TopError(Exception):
    """A failure that ends top: `code` is the exit code, the message is one line."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class Retryable(Exception):
    """The server went away or failed for now; worth asking again (once it was reached).
    `answered`: it did answer (with a 5xx), so it is not unreachable."""

    def __init__(self, message: str, answered: bool = False) -> None:
        super().__init__(message)
        self.answered = answered


def _mib(n: Any) -> str:
    return "-" if n is None else f"{int(n) / MiB:,.1f}"


def render(report: dict[str, Any]) -> Any:
    """A rich Table of the budget and every model's memory and queues."""
    from rich.table import Table

    budget = report["budget"]
    page = budget.get("page_size", 0)
    title = f"budget {_mib(budget['bytes'])} MiB ({budget['policy']})"
    if page:
        title += (f" | used {_mib(budget['used_pages'] * page)} MiB, "
                  f"free {_mib(budget['free_pages'] * page)} MiB")
    table = Table(title=title)
    for col in ("model", "state", "prio", "weights MiB", "KV mapped", "KV used", "KV cached",
                "run", "wait", "swap", "sleeps", "wakes"):
        table.add_column(col, justify="left" if col in ("model", "state") else "right")
    for name, m in sorted(report["models"].items()):
        kv = m["kv"]
        table.add_row(name, m["state"], str(m.get("priority", "-")), _mib(m.get("weights_bytes")),
                      _mib(kv["kv_mapped_bytes"]), _mib(kv["kv_used_bytes"]),
                      _mib(kv["kv_cached_bytes"]), str(m["running"]), str(m["waiting"]),
                      str(m["swapped"]), str(m["sleeps"]), str(m["wakes"]))
    return table


def render_workers(report: dict[str, Any]) -> Any:
    """A rich Table of the worker processes (None when the models run in the server)."""
    from rich.table import Table

    workers = report.get("workers")
    if not workers:
        return None
    table = Table(title="workers")
    for col in ("worker", "model", "role", "pid", "state", "KV pages", "weights MiB", "shared",
                "restarts"):
        table.add_column(col, justify="right" if col in ("pid", "KV pages", "weights MiB",
                                                         "restarts") else "left")
    for w in workers:
        table.add_row(str(w["worker"]), str(w["model"]), str(w["role"]), str(w["pid"]),
                      str(w["state"]), str(w["kv_pages"]), _mib(w.get("weights_bytes")),
                      "yes" if w.get("weights_shared") else "no", str(w["restarts"]))
    return table


def _reason(exc: Exception) -> str:
    import httpx

    if isinstance(exc, httpx.ConnectError):
        return "connection refused"
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    return str(exc) or type(exc).__name__


def fetch(url: str, token: str, timeout: float = 5.0) -> dict[str, Any]:
    """The memory report; raises TopError (fatal) or Retryable (the server is away for now)."""
    import httpx

    endpoint = f"{url.rstrip('/')}/admin/memory"
    try:
        resp = httpx.get(endpoint, headers={"Authorization": f"Bearer {token}"}, timeout=timeout)
    except httpx.TransportError as exc:
        raise Retryable(f"cannot reach {url} ({_reason(exc)})") from exc
    except httpx.InvalidURL as exc:
        raise TopError(EXIT_USAGE, f"bad --url {url!r}: {exc}") from exc
    if resp.status_code in (401, 403):
        raise TopError(EXIT_AUTH, f"{url} refused the admin token (HTTP {resp.status_code}); "
                                  "check --admin-token / $ELASTICSERVE_ADMIN_TOKEN")
    if resp.status_code == 404:
        raise TopError(EXIT_BAD_SERVER, f"{endpoint} not found: is it elasticserve, started "
                                        "with --admin-token (admin routes are off without)?")
    if resp.status_code >= 500:
        raise Retryable(f"{url} answered HTTP {resp.status_code}", answered=True)
    try:
        report = resp.json()
        render(report)  # checks the shape now, so a wrong server fails here, not mid-view
        render_workers(report)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise TopError(EXIT_BAD_SERVER, f"{endpoint} did not return a memory report "
                                        f"(HTTP {resp.status_code})") from exc
    return dict(report)


@dataclass
class Watch:
    """What the view shows: the last report, and why it may be stale."""

    report: dict[str, Any] | None = None
    problem: str | None = None  # set while reconnecting
    since: float = 0.0

    def view(self) -> Any:
        from rich.console import Group
        from rich.text import Text

        parts: list[Any] = [render(self.report)] if self.report else []
        workers = render_workers(self.report) if self.report else None
        if workers is not None:
            parts.append(workers)
        if self.problem:
            waited = time.monotonic() - self.since
            parts.append(Text(f"reconnecting... {self.problem} ({waited:.0f} s)", style="bold red"))
        return Group(*parts)


def _say(message: str, err: TextIO | None) -> None:
    # sys.stderr is looked up at each call: inside Live on a terminal it is rich's proxy,
    # which prints the line above the view instead of through it
    print(f"{PROG}: {message}", file=err or sys.stderr, flush=True)


def poll(watch: Watch, url: str, token: str, err: TextIO | None = None) -> None:
    """One request; updates `watch`. Raises TopError when top should end."""
    try:
        report = fetch(url, token)
    except Retryable as exc:
        if watch.report is None:  # never connected: a wrong --url should fail fast
            if exc.answered:
                raise TopError(EXIT_BAD_SERVER, str(exc)) from exc
            raise TopError(EXIT_UNREACHABLE, f"{exc}; is `elasticserve serve` running there?") from exc
        if watch.problem is None:
            watch.since = time.monotonic()
            _say(f"lost {url}: {exc}; reconnecting...", err)
        watch.problem = str(exc)
        return
    if watch.problem is not None:
        _say(f"reconnected to {url}", err)
    watch.report, watch.problem = report, None


def run(url: str, token: str, interval: float, iterations: int | None, console: Any,
        err: TextIO | None = None, stop: threading.Event | None = None) -> int:
    """Poll and redraw until Ctrl-C, `iterations` polls, or `stop` is set (tests)."""
    from rich.live import Live

    stop = stop or threading.Event()
    watch = Watch()
    poll(watch, url, token, err)  # the first poll outside Live: a failure prints nothing else
    done = 1
    with Live(watch.view(), console=console, refresh_per_second=4) as live:
        while (iterations is None or done < iterations) and not stop.wait(interval):
            poll(watch, url, token, err)
            live.update(watch.view())
            done += 1
    return EXIT_OK


def cmd_top(args: argparse.Namespace) -> int:
    from rich.console import Console

    try:
        if not args.admin_token:
            raise TopError(EXIT_USAGE, "needs --admin-token (or $ELASTICSERVE_ADMIN_TOKEN)")
        if args.interval <= 0 or (args.iterations is not None and args.iterations < 1):
            raise TopError(EXIT_USAGE, "--interval must be > 0 and --iterations >= 1")
        console = Console()
        if args.once:
            watch = Watch()
            poll(watch, args.url, args.admin_token)
            console.print(watch.view())
            return EXIT_OK
        return run(args.url, args.admin_token, args.interval, args.iterations, console)
    except TopError as exc:
        _say(str(exc), None)
        return exc.code
    except KeyboardInterrupt:  # Ctrl-C is how a live view is meant to end
        return EXIT_OK


def add_top_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("top", help="live view of a server's memory per model",
                       description="A live view of /admin/memory: the budget, and every "
                                   "model's memory, queues, sleeps and wakes.",
                       epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000",
                   help="the server's base URL (default %(default)s)")
    p.add_argument("--admin-token", default=os.environ.get("ELASTICSERVE_ADMIN_TOKEN"),
                   help="the server's admin token (default: $ELASTICSERVE_ADMIN_TOKEN)")
    p.add_argument("--interval", type=float, default=0.5,
                   help="seconds between refreshes and reconnect attempts (default %(default)s)")
    p.add_argument("--iterations", type=int, default=None, metavar="N",
                   help="exit after N refreshes (default: run until Ctrl-C)")
    p.add_argument("--once", action="store_true", help="print one table and exit")
    p.set_defaults(func=cmd_top)
    return p
