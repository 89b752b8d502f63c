"""``python -m bench``: run the echo benchmark and write bench/results/<timestamp>.{md,json,png}.

Run it from the repository root on a quiet machine; ``--quick`` is a smoke run of a few seconds
per server that only shows the harness works (its numbers mean little).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench import baseline, chart, report
from bench.build import BuildError
from bench.harness import Harness
from bench.machine import commit, machine
from bench.plan import (
    FULL_IDLE_COUNTS,
    QUICK_IDLE_COUNTS,
    SCENARIO_LETTERS,
    Plan,
    check_servers,
    default_servers,
    expand_scenarios,
)
from bench.procfs import usable_cpus
from bench.servers import SERVERS

RESULTS_DIR = Path(__file__).resolve().parent / "results"
FULL = {"rounds": 3, "seconds": 5.0, "warmup": 0.5, "first_data_timeout": 1.0}
QUICK = {"rounds": 1, "seconds": 0.3, "warmup": 0.2, "first_data_timeout": 0.3}


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(part) for part in _names(text))
    except ValueError:
        counts = ()
    if not counts or any(not 1 <= n <= 50_000 for n in counts):
        raise argparse.ArgumentTypeError(f"expected counts 1-50000, comma-separated: {text!r}")
    return counts


def _portside_defer_accept() -> int:
    """portside's own default, so (e) measures what users get unless told otherwise."""
    try:
        from portside.config import ListenerConfig, default_of
    except ImportError:
        return 1
    return int(default_of(ListenerConfig, "defer_accept"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke mode: tiny windows, 1 round, few servers (under a minute)")
    parser.add_argument("--rounds", type=int, help=f"rounds (default {FULL['rounds']})")
    parser.add_argument("--seconds", type=float,
                        help=f"measured seconds per figure (default {FULL['seconds']:g})")
    parser.add_argument("--warmup", type=float,
                        help=f"unmeasured churn per server process (default {FULL['warmup']:g})")
    parser.add_argument("--servers", type=_names,
                        help=f"comma-separated, from: {', '.join(SERVERS)}")
    parser.add_argument("--scenarios", type=_names, default=SCENARIO_LETTERS,
                        help=f"comma-separated, from: {', '.join(SCENARIO_LETTERS)} "
                        "(d = idle connections, see --idle-counts)")
    parser.add_argument("--idle-counts", type=_counts,
                        help="idle connection counts for (d), comma-separated "
                        f"(default {','.join(map(str, FULL_IDLE_COUNTS))}; "
                        f"--quick: {','.join(map(str, QUICK_IDLE_COUNTS))})")
    parser.add_argument("--defer-accept", type=int, default=_portside_defer_accept(),
                        help="TCP_DEFER_ACCEPT seconds on portside's data-first port in (e); "
                        "0 turns it off (worst case for portside) (default: %(default)s, "
                        "portside's own default)")
    parser.add_argument("--baseline", metavar="REV",
                        help="also measure the pure-Python engine as it was at git revision "
                        "REV (portside_epoll@REV), side by side with the others")
    parser.add_argument("--seed", type=int,
                        help="seed of the servers' order, shuffled every round (default: "
                        "random; the report records it)")
    parser.add_argument("--allow-dirty", action="store_true",
                        help="let a run of uncommitted code become latest.* (marked so in "
                        "its title); without it such a run writes only its stamped files")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR,
                        help="where results are written (default: bench/results)")
    return parser


def make_plan(args: argparse.Namespace) -> Plan:
    base = QUICK if args.quick else FULL
    rounds = args.rounds if args.rounds is not None else int(base["rounds"])
    seconds = args.seconds if args.seconds is not None else float(base["seconds"])
    warmup = args.warmup if args.warmup is not None else float(base["warmup"])
    if rounds < 1 or rounds > 100:
        raise ValueError("--rounds must be 1-100")
    if not 0 < seconds <= 600 or not 0 < warmup <= 60:
        raise ValueError("--seconds must be in (0, 600] and --warmup in (0, 60]")
    if args.defer_accept < 0:
        raise ValueError("--defer-accept must be >= 0")
    cpus = usable_cpus()
    server_cpu, loadgen_cpu = (1, 0) if {0, 1} <= set(cpus) else (None, None)
    servers = list(args.servers or default_servers(args.quick))
    if args.baseline:
        servers.append(baseline.add(args.baseline))
    return Plan(
        servers=check_servers(tuple(servers)),
        scenarios=expand_scenarios(args.scenarios, args.idle_counts or (
            QUICK_IDLE_COUNTS if args.quick else FULL_IDLE_COUNTS)),
        rounds=rounds, seconds=seconds, warmup=warmup, quick=args.quick,
        defer_accept=args.defer_accept, server_cpu=server_cpu, loadgen_cpu=loadgen_cpu,
        connect_timeout=10.0 if args.quick else 20.0,
        settle=0.2 if args.quick else 0.3,
        seed=args.seed if args.seed is not None else random.randrange(1 << 31),
        first_data_timeout=float(base["first_data_timeout"]),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        plan = make_plan(args)
    except (ValueError, baseline.BaselineError) as exc:
        parser.error(str(exc))
    # A smoke run is labelled as one and never takes the name of a real run's files.
    stamp = time.strftime("%Y%m%d-%H%M%S") + ("-quick" if args.quick else "")
    info, measured = machine(plan.server_cpu, plan.loadgen_cpu), commit()
    if plan.server_cpu is None:
        print("warning: fewer than 2 usable CPUs: server and load generator are not pinned",
              file=sys.stderr)
    try:
        harness = Harness(plan, stamp)
    except BuildError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    result = harness.run()

    results_dir: Path = args.results_dir
    results_dir.mkdir(parents=True, exist_ok=True)
    chart_name: str | None = f"{stamp}.png"
    note = ""
    try:
        chart.draw(result, results_dir / f"{stamp}.png",
                   f"portside echo benchmark {stamp}, commit {measured['short']}")
    except chart.ChartUnavailable as exc:
        chart_name, note = None, str(exc)
        print(f"warning: no chart: {exc}", file=sys.stderr)
    ctx = report.Context(stamp, plan, info, measured, chart_name, note,
                         allow_dirty=args.allow_dirty)
    for path in report.write(result, ctx, results_dir):
        print(path)
    if measured["dirty"] and not plan.quick:
        print(f"warning: {len(measured['dirty'])} uncommitted change(s) were measured: "
              + ("latest.* marked DIRTY" if args.allow_dirty else
                 "latest.* left as it was (commit first, or pass --allow-dirty)"),
              file=sys.stderr)
    print()
    print(report.markdown(result, ctx))
    return 1 if not result.measurements else 0


if __name__ == "__main__":
    sys.exit(main())
