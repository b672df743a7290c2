"""`serve --runtime-memory-from-budget`: engine workspaces on the pool's budget, in-process
and in worker processes."""

from __future__ import annotations

import argparse

from elasticserve.server.cli_serve import add_serve_parser, engine_args, make_server


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="elasticserve")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["serve", *argv])


def test_flag_reaches_the_engines_in_process(model_dir: str) -> None:
    assert not engine_args(_parse()).runtime_memory_from_budget  # off by default
    args = _parse("--model", f"a={model_dir}", "--in-process", "--memory", "64MiB",
                  "--runtime-memory-from-budget", "--port", "0")
    assert engine_args(args).runtime_memory_from_budget
    server, engines = make_server(args)
    try:
        engine = engines["a"].engine  # type: ignore[attr-defined]
        assert engine.kv.workspace is not None and engine.runner.workspace is not None
        assert engine.kv.workspace.broker is engine.broker  # pages from the pool's arbiter
    finally:
        server.close()


def test_flag_reaches_worker_processes(model_dir: str) -> None:
    args = _parse("--model", f"a={model_dir}", "--memory", "64MiB",
                  "--runtime-memory-from-budget", "--port", "0")
    server, engines = make_server(args)  # workers under the front's page broker
    try:
        stats = engines["a"].memory_stats()
        # the worker built its arena; its pages come from the broker (tests/procs)
        assert stats["workspace_reserved_bytes"] > 0 and stats["workspace_fallbacks"] == 0
    finally:
        server.close()
