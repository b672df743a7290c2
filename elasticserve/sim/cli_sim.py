"""``python -m elasticserve.sim.cli_sim SCENARIO`` (or ``elasticserve simulate SCENARIO``).

Compares the static, elastic and arbiter policies on one scenario: the max rate each sustains at
the TTFT-SLO attainment target (bisection over a rate scale) and latencies at a common load.
Prints a Markdown table; ``--json`` and ``--plots`` write the details. ``trace --trace FILE``
replays a recorded trace; ``--ceiling`` adds the unbounded-memory bound on every policy.
``--write-docs`` writes the scenario's section of docs/BENCHMARKS.md (``sim-SCENARIO``) with the
exact command, the date and the commit.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import Any

import elasticserve.docs_section as docs_section
from elasticserve.sim.experiment import CEILING_MEMORY_FACTOR, Comparison, compare
from elasticserve.sim.gpu_specs import GPU_SPECS, get_gpu
from elasticserve.sim.model_shapes import BUILTIN_SHAPES
from elasticserve.sim.report import docs_section as section_text
from elasticserve.sim.report import markdown, to_json, write_plots
from elasticserve.sim.scenarios import (
    DEFAULT_TRACE_SHAPE,
    SCENARIOS,
    Scenario,
    get_scenario,
    trace_scenario,
)
from elasticserve.sim.simulator import ALL_POLICIES, SimSetupError
from elasticserve.workload.trace import TraceSource

TRACE = "trace"
_ABOUT = {"ramp3": "3 models whose load ramps up and down in turn",
          "zipf16": "16 models with Zipf popularity and bursty arrivals",
          "longctx": "short chats beside rare 128k-token requests"}  # for --help


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="elasticserve simulate", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Simulate KV-memory policies on a scenario.",
        epilog="subcommands:\n"
               + "".join(f"  {name:12} {_ABOUT.get(name, 'built-in scenario')}\n"
                         for name in sorted(SCENARIOS))
               + f"  {TRACE:12} replay --trace FILE\n"
               "  calibrate    fit the simulator's cost model to this engine "
               "(elasticserve simulate calibrate --help)\n"
               "  pd           prefill/decode disaggregation vs colocated: goodput "
               "(elasticserve simulate pd --help)\n"
               "  fit-lengths  fit log-normal lengths to a trace "
               "(elasticserve simulate fit-lengths --help)")
    p.add_argument("scenario", choices=sorted([*SCENARIOS, TRACE]),
                   help="a built-in scenario, or trace (see the subcommands below)")
    p.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    p.add_argument("--policies", default=None,
                   help="comma-separated subset of " + ", ".join(ALL_POLICIES)
                   + " (default: the scenario's; tiered only in longctx)")
    p.add_argument("--target", type=float, default=0.99, help="TTFT SLO attainment target")
    p.add_argument("--bisect-iters", type=int, default=None,
                   help="bisection steps after bracketing (precision vs run time)")
    p.add_argument("--ttft-slo", type=float, default=None, help="override the TTFT SLO (s)")
    p.add_argument("--gpu", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a device spec field, e.g. --gpu flops_eff=0.8 (repeatable)")
    p.add_argument("--json", metavar="PATH", help="write the full comparison as JSON")
    p.add_argument("--plots", metavar="DIR", help="write PNG plots (needs matplotlib)")
    p.add_argument("--write-docs", action="store_true",
                   help="write section sim-SCENARIO of docs/BENCHMARKS.md")
    p.add_argument("--docs-path", metavar="PATH", help="the file --write-docs updates")
    p.add_argument("--ceiling", action="store_true",
                   help=f"also find the arbiter's max rate with {CEILING_MEMORY_FACTOR}x the "
                        "device memory (KV never runs out): a bound on every memory policy")
    t = p.add_argument_group("trace replay and device")
    t.add_argument("--trace", action="append", default=[], metavar="[NAME=]FILE",
                   help="the trace scenario's file: JSONL (timestamp, model, input_len, "
                        "output_len) or Azure LLM inference CSV, whose rows go to model NAME "
                        "(default model0, model1, ...); repeat to merge traces")
    t.add_argument("--model-shape", action="append", default=[], metavar="NAME=SHAPE",
                   help="trace: model NAME runs built-in SHAPE; a bare SHAPE sets the default "
                        f"({DEFAULT_TRACE_SHAPE}); repeatable; shapes: "
                        + ", ".join(BUILTIN_SHAPES))
    t.add_argument("--device", help="GPU spec (" + ", ".join(GPU_SPECS)
                   + "); default: the scenario's (H100-80GB for a trace)")
    t.add_argument("--num-gpus", type=int,
                   help="GPUs: memory budget and tensor parallelism; default: the scenario's")
    return p


def _shape_args(p: argparse.ArgumentParser, items: list[str]) -> tuple[str, dict[str, str]]:
    """``--model-shape`` values: (default shape, per-model shapes)."""
    default, per_model = DEFAULT_TRACE_SHAPE, {}
    for item in items:
        name, sep, shape = item.rpartition("=")
        if not sep:
            default = shape.strip()
        elif not name.strip() or not shape.strip():
            p.error(f"--model-shape wants NAME=SHAPE or SHAPE, got {item!r}")
        else:
            per_model[name.strip()] = shape.strip()
    return default, per_model


def _load_scenario(p: argparse.ArgumentParser, args: argparse.Namespace) -> Scenario:
    if args.num_gpus is not None and args.num_gpus <= 0:
        p.error(f"--num-gpus must be > 0, got {args.num_gpus}")
    if args.scenario == TRACE:
        if not args.trace:
            p.error("the trace scenario needs --trace FILE")
        default, per_model = _shape_args(p, args.model_shape)
        try:
            return trace_scenario([_trace_source(t) for t in args.trace], per_model, default,
                                  args.device or "H100-80GB", args.num_gpus or 1)
        except (OSError, ValueError) as e:
            p.error(str(e))
    if args.trace or args.model_shape:
        p.error(f"--trace and --model-shape apply to the trace scenario only, not "
                f"{args.scenario}")
    scn = get_scenario(args.scenario)
    changes: dict[str, object] = {}
    if args.device:
        try:
            changes["device"] = get_gpu(args.device)
        except KeyError as e:
            p.error(str(e.args[0]))
    if args.num_gpus:
        changes["num_gpus"] = args.num_gpus
    if changes:
        scn.config = dataclasses.replace(scn.config, **changes)  # type: ignore[arg-type]
    return scn


def _trace_source(item: str) -> TraceSource:
    name, sep, path = item.partition("=")
    return (name.strip(), path) if sep and name.strip() else (None, path if sep else item)


def _gpu_overrides(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--gpu wants FIELD=VALUE, got {item!r}")
        out[key.strip()] = float(value)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    scn = _load_scenario(parser, args)
    policies = ([p.strip() for p in args.policies.split(",") if p.strip()]
                if args.policies else list(scn.policies))
    bad = [p for p in policies if p not in ALL_POLICIES]
    if bad:
        raise SystemExit(f"unknown policy: {', '.join(bad)}")
    if args.bisect_iters is not None:
        scn.bisect_iters = args.bisect_iters
    changes: dict[str, object] = {}
    if args.ttft_slo is not None:
        changes["ttft_slo_s"] = args.ttft_slo
    if args.gpu:
        try:
            changes["device"] = dataclasses.replace(scn.config.device, **_gpu_overrides(args.gpu))
        except TypeError as e:
            raise SystemExit(f"--gpu: {e}") from None
    if changes:
        scn.config = dataclasses.replace(scn.config, **changes)  # type: ignore[arg-type]
    try:
        comp = compare(scn, seed=args.seed, policies=policies,  # type: ignore[arg-type]
                       target=args.target, ceiling=args.ceiling)
    except SimSetupError as e:
        parser.error(str(e))
    sys.stdout.write(markdown(comp))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(to_json(comp), f, indent=1)
    if args.plots:
        paths = write_plots(comp, args.plots)
        print("plots: " + (", ".join(paths) if paths else "matplotlib is not installed"),
              file=sys.stderr)
    if args.write_docs:
        print(f"wrote {write_docs(comp, argv, args.docs_path)}", file=sys.stderr)
    return 0


def write_docs(comp: Comparison, argv: Sequence[str] | None, path: str | None) -> str:
    """Write section ``sim-<scenario>`` with the command that reproduces it."""
    command = docs_section.command_line("elasticserve.sim.cli_sim",
                                        None if argv is None else list(argv))
    text = section_text(comp, command, docs_section.today(), docs_section.git_commit())
    return str(docs_section.update_section(f"sim-{comp.scenario.name}", text, path))


if __name__ == "__main__":
    sys.exit(main())
