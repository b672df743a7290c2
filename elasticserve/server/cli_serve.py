"""`elasticserve serve`: the OpenAI-compatible server on one or several models.

FastAPI and uvicorn are imported only when the command runs, so the rest of the CLI starts
fast and works without the server extras installed.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from typing import Any

from elasticserve.engine.args import EngineArgs

DEFAULT_MODEL_NAME = "tiny-llama"
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6,
          "mib": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12,
          "tib": 2**40}


def parse_size(text: str) -> int:
    """'4GiB' -> 4294967296; plain numbers are bytes. For argparse `type=`."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 4GiB or 512MiB)")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise argparse.ArgumentTypeError(f"size must be > 0, got {text!r}")
    return size


def parse_model_specs(specs: list[str]) -> dict[str, str]:
    """['llama=models/a', 'models/b'] -> {'llama': 'models/a', 'b': 'models/b'}."""
    models: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = os.path.basename(os.path.normpath(spec)), spec
        if not name or not path:
            raise ValueError(f"--model must be NAME=DIR or DIR, got {spec!r}")
        if name in models:
            raise ValueError(f"--model names {name!r} twice")
        models[name] = path
    return models


def engine_args(path: str, args: argparse.Namespace, num_models: int) -> EngineArgs:
    """EngineArgs of one model; --memory is split evenly until the shared arbiter lands."""
    share = None if args.memory is None else args.memory // num_models
    kwargs: dict[str, Any] = {"kv_cache_mode": args.kv_cache_mode,
                              "max_num_seqs": args.max_num_seqs}
    if share is not None:
        kwargs["kv_cache_max_bytes" if args.kv_cache_mode == "elastic" else "kv_cache_bytes"] = share
    return EngineArgs(model=path, **kwargs)


def add_serve_parser(sub: Any) -> argparse.ArgumentParser:
    """Add `serve` to the CLI's subparsers (`sub` is what `add_subparsers()` returned)."""
    p = sub.add_parser("serve", help="serve models over an OpenAI-compatible HTTP API")
    p.add_argument("--model", action="append", default=[], metavar="NAME=DIR",
                   help="a model to serve under NAME (repeatable); default: the tiny model")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--memory", type=parse_size, default=None,
                   help="KV cache memory for all models together, e.g. 4GiB")
    p.add_argument("--kv-cache-mode", choices=["elastic", "static"], default="elastic")
    p.add_argument("--max-num-seqs", type=int, default=256, help="largest batch per engine step")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests queued beyond the batch before new ones get 503")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)
    return p


def make_server(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """The uvicorn.Server for parsed `serve` arguments, and the engines it serves."""
    import uvicorn

    from elasticserve.cli import DEFAULT_MODEL_DIR, ensure_model
    from elasticserve.engine.async_engine import AsyncEngine
    from elasticserve.engine.llm_engine import LLMEngine
    from elasticserve.server.api_server import build_app

    models = parse_model_specs(args.model)
    if not models:
        models = {DEFAULT_MODEL_NAME: ensure_model(DEFAULT_MODEL_DIR)}
    engines = {name: AsyncEngine(LLMEngine(engine_args(path, args, len(models))),
                                 max_queue=args.max_queue, name=name)
               for name, path in models.items()}
    config = uvicorn.Config(build_app(engines), host=args.host, port=args.port,
                            log_level=args.log_level)
    return uvicorn.Server(config), engines


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve until interrupted (Ctrl-C / SIGTERM), then stop the engines."""
    logging.basicConfig(level=args.log_level.upper())
    server, engines = make_server(args)
    try:
        server.run()
    finally:
        for engine in engines.values():
            engine.shutdown()
    return 0
