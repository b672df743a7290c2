"""`elasticserve top`: a live terminal view of /admin/memory (rich)."""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

MiB = 1 << 20


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


def fetch(url: str, token: str) -> dict[str, Any]:
    import httpx

    resp = httpx.get(f"{url.rstrip('/')}/admin/memory",
                     headers={"Authorization": f"Bearer {token}"}, timeout=5)
    resp.raise_for_status()
    return dict(resp.json())


def cmd_top(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.live import Live

    if not args.admin_token:
        raise SystemExit("top needs --admin-token (or $ELASTICSERVE_ADMIN_TOKEN)")
    console = Console()
    if args.once:
        console.print(render(fetch(args.url, args.admin_token)))
        return 0
    with Live(console=console, refresh_per_second=4) as live:
        while True:
            live.update(render(fetch(args.url, args.admin_token)))
            time.sleep(args.interval)


def add_top_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("top", help="live view of a server's memory per model")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--admin-token", default=os.environ.get("ELASTICSERVE_ADMIN_TOKEN"))
    p.add_argument("--interval", type=float, default=0.5)
    p.add_argument("--once", action="store_true", help="print one table and exit")
    p.set_defaults(func=cmd_top)
    return p
