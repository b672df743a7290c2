"""``python -m elasticserve.sim.cli_sim SCENARIO`` (or ``elasticserve simulate SCENARIO``).

Compares the static, elastic and arbiter policies on one scenario: the max rate each sustains at
the TTFT-SLO attainment target (bisection over a rate scale) and latencies at a common load.
Prints a Markdown table; ``--json`` and ``--plots`` write the details.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import Any

from elasticserve.sim.experiment import compare
from elasticserve.sim.report import markdown, to_json, write_plots
from elasticserve.sim.scenarios import SCENARIOS, get_scenario
from elasticserve.sim.simulator import POLICIES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="elasticserve simulate",
                                description="Simulate KV-memory policies on a scenario.")
    p.add_argument("scenario", choices=sorted(SCENARIOS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--policies", default=",".join(POLICIES),
                   help="comma-separated subset of " + ", ".join(POLICIES))
    p.add_argument("--target", type=float, default=0.99, help="TTFT SLO attainment target")
    p.add_argument("--bisect-iters", type=int, default=None,
                   help="bisection steps after bracketing (precision vs run time)")
    p.add_argument("--ttft-slo", type=float, default=None, help="override the TTFT SLO (s)")
    p.add_argument("--gpu", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a device spec field, e.g. --gpu flops_eff=0.8 (repeatable)")
    p.add_argument("--json", metavar="PATH", help="write the full comparison as JSON")
    p.add_argument("--plots", metavar="DIR", help="write PNG plots (needs matplotlib)")
    return p


def _gpu_overrides(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--gpu wants FIELD=VALUE, got {item!r}")
        out[key.strip()] = float(value)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    scn = get_scenario(args.scenario)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    bad = [p for p in policies if p not in POLICIES]
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
    comp = compare(scn, seed=args.seed, policies=policies, target=args.target)  # type: ignore[arg-type]
    sys.stdout.write(markdown(comp))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(to_json(comp), f, indent=1)
    if args.plots:
        paths = write_plots(comp, args.plots)
        print("plots: " + (", ".join(paths) if paths else "matplotlib is not installed"),
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
