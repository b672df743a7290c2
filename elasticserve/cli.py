"""`elasticserve` command line: make-model | generate | demo | serve | top | simulate | bench."""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections.abc import Sequence
from typing import Any

# what `--model` defaults to (models.make_model.DEFAULT_MODEL_DIR, which a test checks): that
# module imports torch, and `top`, `--help` and `--version` should start without it
DEFAULT_MODEL_HELP = "models/demo-llama"


def version() -> str:
    """The installed distribution's version; the source tree's when run uninstalled."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("elasticserve")
    except PackageNotFoundError:
        from elasticserve import __version__

        return __version__


def _ensure_model(path: str | None) -> str:
    """The model directory to run: ``path`` (a random tiny model is made there if it is
    missing), or the default demo model, trained on first use."""
    if path is None:
        from elasticserve.models.train import ensure_trained_model

        return ensure_trained_model()
    from elasticserve.models.make_model import ensure_model

    return ensure_model(path)


def _cmd_make_model(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from elasticserve.models.make_model import make_model
    from elasticserve.models.progress import Progress
    from elasticserve.models.train import DEMO_RECIPE, make_trained_model

    train_s = args.train_seconds
    if train_s is None:
        train_s = DEMO_RECIPE.max_seconds if args.size == "demo" else 0.0
    if train_s > 0:
        recipe = replace(DEMO_RECIPE, max_seconds=train_s, seed=args.seed)
        out = make_trained_model(args.arch, args.size, args.out, recipe)
    else:
        with Progress(f"making a random {args.size} {args.arch} model in {args.out}"):
            out = make_model(args.arch, args.size, args.out, seed=args.seed)
    print(out)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from elasticserve import LLM, SamplingParams

    llm = LLM(_ensure_model(args.model), kv_cache_mode=args.kv_cache_mode)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            seed=args.seed)
    for out in llm.generate(args.prompt, params):
        print(f"{out.prompt!r} -> {out.outputs[0].text!r}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from elasticserve import LLM, SamplingParams

    llm = LLM(_ensure_model(args.model), kv_cache_mode=args.kv_cache_mode)
    rng = random.Random(0)
    words = "the paged cache grows and shrinks while the engine keeps serving".split()
    prompts = [" ".join(rng.choices(words, k=rng.randint(3, 40))) for _ in range(args.requests)]
    params = [SamplingParams(max_tokens=rng.randint(8, args.max_tokens), temperature=0.8,
                             seed=i, ignore_eos=True) for i in range(args.requests)]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    for out in outputs[:5]:
        print(f"{out.prompt[:40]!r:44} -> {out.outputs[0].text[:60]!r}")
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(f"{len(outputs)} requests, {generated} tokens in {elapsed:.2f} s: "
          f"{generated / elapsed:.0f} output tokens/s")
    print("engine:", llm.stats())
    print("memory:", llm.memory_stats())
    return 0


BENCHES = {
    "offline": "elasticserve.bench.offline",
    "serve": "elasticserve.bench.serve",
    "multi-model": "elasticserve.bench.multi_model",
    "elastic-overhead": "elasticserve.bench.elastic_overhead",
    "core": "elasticserve.bench.core_step",
    "memory": "elasticserve.bench.memory_pages",
    "ab": "elasticserve.bench.ab_commits",
    "workers": "elasticserve.bench.workers",
    "weights-sharing": "elasticserve.bench.weights_sharing",
    "ipc": "elasticserve.bench.ipc",
    "gpu-check": "elasticserve.bench.gpu_check",
    "peer": "elasticserve.bench.peer",
    "peer-online": "elasticserve.bench.peer_online",
    "peer-profile": "elasticserve.bench.peer_profile",
    "host-tier": "elasticserve.bench.host_tier",
    "layerwise-onload": "elasticserve.bench.layerwise",
    "pd": "elasticserve.bench.pd",
    "slo-engine": "elasticserve.bench.slo_engine",
}


def _forward(module: str, argv: list[str]) -> int:
    import importlib

    return int(importlib.import_module(module).main(argv) or 0)


def _add_offline_parsers(sub: Any) -> None:
    """make-model, generate and demo: the engine without a server."""
    mk = sub.add_parser("make-model", help="write a seeded random (or briefly trained) model in "
                                           "Hugging Face format")
    mk.add_argument("--arch", choices=["llama", "qwen2", "qwen3", "mistral"], default="llama",
                    help="architecture (default %(default)s)")
    mk.add_argument("--size", choices=["tiny", "small", "widekv", "demo"], default="tiny",
                    help="preset size (default %(default)s); demo is trained unless "
                         "--train-seconds 0")
    mk.add_argument("--out", required=True, help="directory to write the model to")
    mk.add_argument("--seed", type=int, default=0, help="weights (and training) seed (default 0)")
    mk.add_argument("--train-seconds", type=float, default=None, metavar="S",
                    help="train on the Python stdlib for at most S seconds (the demo recipe's "
                         "steps; 0: random weights). Default: trained for --size demo only")
    mk.set_defaults(func=_cmd_make_model)
    model_help = f"model directory (default {DEFAULT_MODEL_HELP}, made when missing)"
    kv_help = "elastic: KV pages mapped on demand; static: preallocated (default elastic)"
    gen = sub.add_parser("generate", help="generate from one or more prompts")
    gen.add_argument("--model", default=None, help=model_help)
    gen.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    gen.add_argument("--max-tokens", type=int, default=32, help="tokens per prompt at most")
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    gen.add_argument("--seed", type=int, default=None, help="sampling seed")
    gen.add_argument("--kv-cache-mode", choices=["elastic", "static"], default="elastic",
                     help=kv_help)
    gen.set_defaults(func=_cmd_generate)
    demo = sub.add_parser("demo", help="a batch of requests on the default demo model")
    demo.add_argument("--model", default=None, help=model_help)
    demo.add_argument("--requests", type=int, default=64, help="requests in the batch")
    demo.add_argument("--max-tokens", type=int, default=64,
                      help="longest output; each request draws its length up to it")
    demo.add_argument("--kv-cache-mode", choices=["elastic", "static"], default="elastic",
                      help=kv_help)
    demo.set_defaults(func=_cmd_demo)


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps help lines at spaces only: a benchmark name such as ``host-tier`` stays whole."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        import textwrap

        return textwrap.wrap(self._whitespace_matcher.sub(" ", text).strip(), width,
                             break_on_hyphens=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="elasticserve", formatter_class=_HelpFormatter,
                                     description="An LLM serving engine with elastic KV memory.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_offline_parsers(sub)
    from elasticserve.server.cli_serve import add_serve_parser
    from elasticserve.server.top import add_top_parser

    add_serve_parser(sub)
    add_top_parser(sub)
    sim = sub.add_parser("simulate", add_help=False,
                         help="simulator: ramp3 | zipf16 | longctx | trace | pd | calibrate | fit-lengths"
                              " (elasticserve simulate --help)")
    sim.set_defaults(func=lambda _: _forward("elasticserve.sim.cli_sim", []))
    bench = sub.add_parser("bench", help=f"benchmarks: {' | '.join(BENCHES)}",
                           description="Each benchmark has its own options: "
                                       "elasticserve bench NAME --help.")
    bench.add_argument("which", choices=sorted(BENCHES), help="the benchmark to run")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"] and "torch" not in sys.modules:
        # idle OpenMP threads sleep instead of spinning (read when torch loads OpenMP): on a
        # machine of few cores a spinning engine thread starves the HTTP loop beside it
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # the simulator and the benchmarks own their flags: hand them the rest of the line
    # (argparse's REMAINDER would not take flags that start with "-")
    if argv[:2] == ["simulate", "calibrate"]:
        return _forward("elasticserve.bench.calibrate_engine", argv[2:])
    if argv[:2] == ["simulate", "pd"]:
        return _forward("elasticserve.sim.cli_pd", argv[2:])
    if argv[:2] == ["simulate", "fit-lengths"]:
        return _forward("elasticserve.workload.fit_lengths", argv[2:])
    if argv[:1] == ["simulate"]:
        return _forward("elasticserve.sim.cli_sim", argv[1:])
    if argv[:1] == ["bench"] and len(argv) > 1 and argv[1] in BENCHES:
        return _forward(BENCHES[argv[1]], argv[2:])
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
