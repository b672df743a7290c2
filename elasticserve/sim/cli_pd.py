"""``elasticserve simulate pd`` (or ``python -m elasticserve.sim.cli_pd``): goodput of P/D
layouts against colocated instances on the same number of GPUs (see sim/pd_goodput.py).

``--pd P:D`` (repeatable) picks the splits, ``--link-gbps`` the prefill instances' KV link,
``--gpu-share F`` a 1:1 pair sharing one GPU (prefill gets fraction F).
``--write-docs`` writes section ``sim-pd`` of docs/BENCHMARKS.md with the exact command.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import elasticserve.docs_section as docs_section
from elasticserve.sim.metrics import Slo
from elasticserve.sim.pd import parse_pd
from elasticserve.sim.pd_goodput import markdown, pd_chat, sweep


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="elasticserve simulate pd",
        description="Goodput at a TTFT+TPOT SLO: prefill/decode disaggregation vs colocated.")
    p.add_argument("--pd", action="append", default=[], metavar="P:D",
                   help="P prefill and D decode instances, compared with P+D colocated ones "
                        "(repeatable; default 1:1 and 1:2, plus --gpu-share 0.5)")
    p.add_argument("--gpu-share", action="append", default=[], type=float, metavar="F",
                   help="a 1:1 pair on ONE GPU, prefill getting fraction F of its compute, "
                        "bandwidth and memory, against one colocated instance; the hand-off "
                        "moves page ownership (no bytes copied; repeatable)")
    p.add_argument("--link-gbps", type=float, default=400.0,
                   help="each prefill instance's KV link in Gbit/s (default 400, e.g. "
                        "InfiniBand NDR; NVLink is ~7200, PCIe Gen5 x16 ~512)")
    p.add_argument("--ttft-slo", type=float, default=1.0, help="TTFT target, s (default 1)")
    p.add_argument("--tpot-slo", default="20,40", metavar="MS[,MS]",
                   help="TPOT targets in ms, one SLO each (default 20,40)")
    p.add_argument("--max-rate", type=float, default=32.0, help="highest rate tried, req/s")
    p.add_argument("--rate-step", type=float, default=2.0, help="rate grid step, req/s")
    p.add_argument("--duration", type=float, default=60.0, help="arrivals for this long, s")
    p.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    p.add_argument("--write-docs", action="store_true",
                   help="write section sim-pd of docs/BENCHMARKS.md")
    p.add_argument("--docs-path", metavar="PATH", help="the file --write-docs updates")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        splits = [parse_pd(x) for x in args.pd]
        shares = args.gpu_share
        if not splits and not shares:
            splits, shares = [(1, 1), (1, 2)], [0.5]
        for share in shares:
            if not 0 < share < 1:
                raise ValueError(f"--gpu-share wants a fraction in (0, 1), got {share!r}")
        tpots = [float(x) / 1000 for x in args.tpot_slo.split(",") if x.strip()]
        if any(p == 0 for p, _ in splits):
            raise ValueError("--pd wants P >= 1: colocated runs are added for every split")
        if not tpots or min(tpots) <= 0:
            raise ValueError(f"--tpot-slo wants positive milliseconds, got {args.tpot_slo!r}")
        if args.rate_step <= 0 or args.max_rate < args.rate_step:
            raise ValueError("--rate-step must be > 0 and <= --max-rate")
        scn = pd_chat(args.link_gbps, splits, args.duration, shares)
    except ValueError as e:
        parser.error(str(e))
    scn.slos = [Slo(args.ttft_slo, t) for t in tpots]
    n = int(args.max_rate / args.rate_step + 1e-9)
    scn.rates = [args.rate_step * (k + 1) for k in range(n)]
    text = markdown(scn, sweep(scn, args.seed), args.seed)
    sys.stdout.write(text)
    if args.write_docs:
        command = docs_section.command_line("elasticserve.sim.cli_pd",
                                            None if argv is None else list(argv))
        head, _, rest = text.partition("\n")
        body = (f"#{head}\n\nSimulated (`elasticserve.sim.pd`): every instance runs the real "
                f"scheduler, KV manager and block pool (roofline cost model, static KV). "
                f"Command: `{command}`; run {docs_section.today()} at commit "
                f"{docs_section.git_commit()}.\n{rest}")
        path = docs_section.update_section("sim-pd", body, args.docs_path)
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
