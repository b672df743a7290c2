"""`elasticserve serve`: the OpenAI-compatible server on one or several models.

FastAPI and uvicorn are imported only when the command runs, so the rest of the CLI starts
fast and works without the server extras installed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import socket
from typing import TYPE_CHECKING, Any

from elasticserve.engine.args import EngineArgs
from elasticserve.server.cli_workers import add_worker_flags, start_workers

if TYPE_CHECKING:
    from elasticserve.engine.protocol import EngineClient
    from elasticserve.server.options import ServeOptions

DEFAULT_MODEL_NAME = "demo-llama"  # served from models/demo-llama, trained on first start
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


def parse_seconds(text: str) -> float:
    """A duration >= 0 in seconds. For argparse `type=`."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"not a duration in seconds >= 0: {text!r}")
    return value


def parse_origins(text: str) -> list[str]:
    """'["http://a", "http://b"]' (vLLM's form) or 'http://a,http://b'. For argparse `type=`."""
    if text.lstrip().startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"not a JSON list: {text!r}: {exc}") from exc
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise argparse.ArgumentTypeError(f"not a list of strings: {text!r}")
        return value
    return [o.strip() for o in text.split(",") if o.strip()]


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


def engine_args(args: argparse.Namespace) -> EngineArgs:
    """Engine settings shared by every served model (memory comes from the pool)."""
    return EngineArgs(model="", max_num_seqs=args.max_num_seqs, num_threads=args.threads,
                      attention_backend=args.attention_backend, max_model_len=args.max_model_len,
                      device=args.device, cuda_graphs=args.cuda_graphs,
                      scheduling_policy=args.scheduling_policy, admission=args.admission,
                      slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms,
                      host_kv_cache_bytes=args.host_kv_memory,
                      layerwise_onload=args.layerwise_onload,
                      layerwise_residency=args.layerwise_residency,
                      stream_tpot_ms=args.stream_tpot_ms,
                      runtime_memory_from_budget=args.runtime_memory_from_budget)


def served_models(args: argparse.Namespace) -> tuple[dict[str, str], dict[str, str]]:
    """({name: path} to load, {other name: name}) from --model and --served-model-name.

    As in vLLM: the first --served-model-name is the name responses report, every one is
    accepted; a model given as a bare path also answers to that path."""
    models = parse_model_specs(args.model)
    aliases = {spec: os.path.basename(os.path.normpath(spec))
               for spec in args.model if "=" not in spec}
    served = args.served_model_name or []
    if served:
        if len(models) > 1:
            raise ValueError("--served-model-name needs exactly one --model (name several "
                             "models with --model NAME=DIR)")
        path = next(iter(models.values()), None)
        old = next(iter(models), DEFAULT_MODEL_NAME)
        models = {served[0]: path} if path is not None else {}
        # listed in this order by /v1/models: the names first, then the path
        aliases = {name: served[0] for name in served[1:]} | {
            a: served[0] for a, n in aliases.items() if n == old}
    return models, aliases


def parse_priorities(specs: list[str]) -> dict[str, int]:
    """['a=2'] -> {'a': 2}."""
    out: dict[str, int] = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not sep or not value.lstrip("-").isdigit():
            raise ValueError(f"--priority must be NAME=INT, got {spec!r}")
        out[name] = int(value)
    return out


def model_specs(args: argparse.Namespace) -> list[Any]:
    from elasticserve.engine.multi_model import ModelSpec
    from elasticserve.models.train import ensure_trained_model

    models, _ = served_models(args)
    if not models:
        name = (args.served_model_name or [DEFAULT_MODEL_NAME])[0]
        models = {name: ensure_trained_model()}
    priorities = parse_priorities(args.priority)
    unknown = set(priorities) - set(models)
    if unknown:
        raise ValueError(f"--priority names unknown model(s): {sorted(unknown)}")
    return [ModelSpec(name, path, priority=priorities.get(name, 0))
            for name, path in models.items()]


def _add_vllm_flags(p: argparse.ArgumentParser) -> None:
    """vLLM's `serve` flags of the same meaning."""
    p.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="with one --model: the name responses report, then more names it "
                        "answers to (vLLM's flag)")
    p.add_argument("--scheduling-policy", choices=["fcfs", "slo"], default="fcfs",
                   help="fcfs (priority, then arrival) or slo (least slack to the TTFT target)")
    p.add_argument("--admission", choices=["none", "slo"], default="none",
                   help="slo: answer 503 + Retry-After at once to a request predicted to miss "
                        "its TTFT target")
    p.add_argument("--slo-ttft-ms", type=float, default=None,
                   help="default time-to-first-token target (a request's slo_ttft_ms wins)")
    p.add_argument("--slo-tpot-ms", type=float, default=None,
                   help="default time-per-output-token target (a request's slo_tpot_ms wins)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="longest prompt + output in tokens (default: the model's limit)")
    p.add_argument("--chat-template", default=None, metavar="FILE|TEMPLATE",
                   help="a Jinja chat template file, or the template itself, replacing the "
                        "models' own in /v1/chat/completions and /tokenize")
    p.add_argument("--api-key", default=os.environ.get("ELASTICSERVE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (or "
                        "$ELASTICSERVE_API_KEY); default: no key")
    p.add_argument("--allowed-origins", type=parse_origins, action="extend", default=[],
                   metavar="ORIGINS",
                   help="origins browsers may call from (CORS): a JSON list as vLLM takes it, "
                        "or comma-separated, '*' for any; default: none")


def add_serve_parser(sub: Any) -> argparse.ArgumentParser:
    """Add `serve` to the CLI's subparsers (`sub` is what `add_subparsers()` returned)."""
    p = sub.add_parser("serve", help="serve models over an OpenAI-compatible HTTP API")
    p.add_argument("--model", action="append", default=[], metavar="NAME=DIR",
                   help="a model to serve under NAME (repeatable); default: the demo model "
                        "(models/demo-llama, trained on first start)")
    _add_vllm_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000,
                   help="port to bind; 0 picks a free one (see --port-file)")
    p.add_argument("--port-file", default=None, metavar="PATH",
                   help="write the bound port here once listening (for --port 0)")
    _add_memory_flags(p)
    p.add_argument("--priority", action="append", default=[], metavar="NAME=INT",
                   help="a model's priority for the arbiter (higher keeps its memory)")
    p.add_argument("--idle-sleep-s", type=float, default=None,
                   help="put a model to sleep after this many idle seconds (arbiter policy)")
    p.add_argument("--admin-token", default=os.environ.get("ELASTICSERVE_ADMIN_TOKEN"),
                   help="bearer token for /admin routes (or $ELASTICSERVE_ADMIN_TOKEN); "
                        "without one they are off")
    add_worker_flags(p)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per engine (per worker process)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="largest batch per engine step")
    p.add_argument("--attention-backend", choices=["auto", "native", "torch", "triton"], default="auto",
                   help="decode attention: the C kernel where it builds (auto), always, or never")
    _add_device_flags(p)
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests queued beyond the batch before new ones get 503")
    p.add_argument("--shutdown-timeout", type=parse_seconds, default=30.0, metavar="SECONDS",
                   help="on SIGTERM/SIGINT, how long in-flight requests may finish before they "
                        "are aborted (default 30)")
    p.add_argument("--max-request-bytes", type=parse_size, default=parse_size("4MiB"),
                   metavar="SIZE",
                   help="largest request body; bigger ones get 413 before they are read "
                        "(default 4MiB: a 128K-token prompt is ~0.5 MB of text, and "
                        "tokenizing 10 MB takes a CPU core for ~15 s)")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"],
                   help="server and engine log level (default info)")
    p.set_defaults(func=cmd_serve)
    return p


def _add_memory_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--memory", type=parse_size, default=parse_size("4GiB"),
                   help="memory budget for all models' weights and KV caches (default 4GiB)")
    p.add_argument("--memory-policy", choices=["arbiter", "static"], default="arbiter",
                   help="arbiter: pages move between models by demand; static: an even split")
    p.add_argument("--host-kv-memory", type=parse_size, default=None, metavar="SIZE",
                   help="per model, an elastic host-memory KV tier of at most SIZE (outside "
                        "--memory): preempted requests' KV moves there instead of being "
                        "recomputed (default: none, a fixed 256MiB swap area)")
    p.add_argument("--layerwise-onload", action="store_true",
                   help="copy KV coming back from host layer by layer on a helper thread, "
                        "overlapped with the forward pass (CPU only)")
    p.add_argument("--layerwise-residency", action="store_true",
                   help="preempted decodes keep decoding with their KV in the host tier, one "
                        "layer staged at a time (needs --host-kv-memory; CPU, native attention)")
    p.add_argument("--stream-tpot-ms", type=float, default=None, metavar="MS",
                   help="with --layerwise-residency: stream decodes for a waiting prompt only "
                        "while the predicted step time stays within MS (default: no guard)")
    p.add_argument("--runtime-memory-from-budget", action="store_true",
                   help="a step's MLP intermediates and logits live in pages granted by the "
                        "--memory budget, given back after the step")


def _add_device_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where the models run (cuda: weights, KV over CUDA VMM, sampler on GPU)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="decode steps replay a CUDA graph per bucketed batch size")


def make_server(args: argparse.Namespace) -> tuple[Any, dict[str, EngineClient]]:
    """The uvicorn.Server for parsed `serve` arguments, and the engines it serves (the one
    place that knows they run in-process: everything past build_app sees EngineClients)."""
    import uvicorn

    from elasticserve.server.api_server import build_app
    from elasticserve.server.shutdown import GracefulServer

    pool, engines = (_in_process(args) if args.in_process
                     else start_workers(args, model_specs(args), engine_args(args)))
    app = build_app(engines, pool=pool, admin_token=args.admin_token,
                    max_request_bytes=args.max_request_bytes, options=serve_options(args))
    config = uvicorn.Config(app, host=args.host, port=args.port,
                            log_level=args.log_level)
    server = GracefulServer(config, engines, args.shutdown_timeout, on_close=pool.close)
    return server, engines


def _in_process(args: argparse.Namespace) -> tuple[Any, dict[str, EngineClient]]:
    from elasticserve.engine.async_engine import AsyncEngine
    from elasticserve.engine.multi_model import ModelPool

    if args.replicas or args.pd:
        raise ValueError("--replicas and --pd need worker processes (drop --in-process)")
    pool = ModelPool(model_specs(args), args.memory, engine_args(args),
                     policy=args.memory_policy, idle_sleep_s=args.idle_sleep_s)
    return pool, {name: AsyncEngine(engine, max_queue=args.max_queue, name=name)
                  for name, engine in pool.engines.items()}


def serve_options(args: argparse.Namespace) -> ServeOptions:
    from elasticserve.server.options import ServeOptions, load_chat_template

    template = None if args.chat_template is None else load_chat_template(args.chat_template)
    return ServeOptions(api_key=args.api_key or None, allowed_origins=tuple(args.allowed_origins),
                        chat_template=template, aliases=served_models(args)[1],
                        admission=args.admission)


def run_server(server: Any, args: argparse.Namespace) -> None:
    """Bind `args.host:args.port` ourselves, announce the port actually bound, then serve.

    With `--port 0` the kernel picks the port and this process keeps the socket from bind to
    serve: a caller that probed for a free port and closed it could lose it to another
    process before the server bound it."""
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    with socket.create_server((args.host, args.port), family=family) as sock:
        port = sock.getsockname()[1]
        print(f"elasticserve: listening on http://{args.host}:{port}", flush=True)
        if args.port_file:
            # written whole, then renamed: a reader polling the path never sees half a number
            tmp = f"{args.port_file}.tmp"
            with open(tmp, "w") as f:
                f.write(f"{port}\n")
            os.replace(tmp, args.port_file)
        server.run(sockets=[sock])


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve until SIGTERM / SIGINT, drain (server/shutdown.py), stop the engines, exit 0."""
    logging.basicConfig(level=args.log_level.upper())
    server, _ = make_server(args)
    try:
        run_server(server, args)
    finally:
        server.close()  # engines shut down, the pool's pages released
    return 0
