"""Writes a run's results: the markdown table, the JSON file, and the ``latest`` copies."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.figures import Figure, figures_for, not_applicable
from bench.plan import Plan, letter_of
from bench.results import RunResult
from bench.servers import (
    C_REFERENCE,
    HELD_TO_TARGETS,
    RELAY_HELD_TO_TARGETS,
    RELAY_REFERENCE,
    SERVERS,
    UVLOOP_REFERENCE,
    references,
    takes_part,
)

LOADGEN_BOUND = 0.9  # loadgen CPU share at which the client may have set the figure
NOISY = 0.25  # CPU share other processes took during a window that makes its figure suspect
SHORT = {UVLOOP_REFERENCE: "vs uvloop", C_REFERENCE: "vs C", RELAY_REFERENCE: "vs HAProxy"}


@dataclass(frozen=True)
class Context:
    """Everything a report says besides the figures."""

    stamp: str
    plan: Plan
    machine: dict[str, Any]
    commit: dict[str, Any]
    chart: str | None  # file name of the chart beside the markdown, if one was drawn
    chart_note: str = ""
    #: --allow-dirty: a run of uncommitted code may become ``latest`` (marked in its title).
    allow_dirty: bool = False


def _fmt(value: float | None, decimals: int = 0) -> str:
    if value is None:
        return "—"
    return f"{value:,.{decimals}f}"


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]],
           align_left: int = 1) -> list[str]:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i < align_left else "---:" for i in range(len(header)))
             + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _scenario_section(result: RunResult, plan: Plan, scenario: str) -> list[str]:
    figures = figures_for(scenario)
    title = f"## ({letter_of(scenario)}) {plan.describe(scenario)}"
    out = [title, ""]
    main = figures[0]
    servers = [s for s in result.servers if takes_part(s, scenario)]
    if not servers:
        return []
    lg_figure = next((f for f in figures if f.name == "lg_cpu"), None)
    other_figure = next((f for f in figures if f.name == "other_cpu"), None)
    header = ["server", *(f.label for f in figures), f"{main.label} per round"]
    rows: list[list[str]] = []
    bound = noisy = False
    for server in servers:
        row = [server]
        for figure in figures:
            cell = _fmt(result.median(server, figure), figure.decimals)
            if not_applicable(server, figure):
                cell = "n/a"
            if figure is main:
                lg = result.median(server, lg_figure) if lg_figure else None
                other = result.median(server, other_figure) if other_figure else None
                if lg is not None and lg >= LOADGEN_BOUND:
                    cell += " †"
                    bound = True
                if other is not None and other >= NOISY:
                    cell += " ‡"
                    noisy = True
            row.append(cell)
        row.append("n/a" if not_applicable(server, main) else
                   ", ".join(_fmt(v, main.decimals) for v in result.values(server, main)))
        rows.append(row)
    out += _table(header, rows)
    if any(not_applicable(server, figure) for server in servers for figure in figures):
        out += ["", f"n/a: `{C_REFERENCE}` keeps no per-connection state in user space (an "
                "idle connection costs it kernel memory only, which VmRSS does not show)."]
    if scenario == "e":
        quiet = [server for server in servers if not any(
            value > 0 for value in result.values(server, _figure(figures, "silent_closed")))]
        if quiet:
            out += ["", f"**The defence was not exercised** on {', '.join(quiet)}: no silent "
                    "connection was closed by the server during the attack."]
    if bound:
        out += ["", f"† the load generator used >= {LOADGEN_BOUND:.0%} of its CPU: the client, "
                "not the server, may have set this figure."]
    if noisy:
        out += ["", f"‡ other processes used >= {NOISY:.0%} of a core during the window: "
                "this figure is noisy; rerun on a quiet machine."]
    compared = [f for f in figures if f.compared]
    if compared:
        out += ["", "Ratios (per-round ratio to the reference in the same round, median):", ""]
        refs = references(scenario)
        header = ["server", *(f"{f.label} {SHORT[ref]}" for f in compared for ref in refs)]
        rows = [[server, *(_ratio(result.ratio(server, f, ref))
                           for f in compared for ref in refs)] for server in servers]
        out += _table(header, rows)
    return [*out, ""]


def _figure(figures: Sequence[Figure], name: str) -> Figure:
    return next(figure for figure in figures if figure.name == name)


def _spread(rounds: Sequence[float]) -> str:
    if not rounds:
        return "—"
    return f"{min(rounds):.2f} to {max(rounds):.2f}" if len(rounds) > 1 else f"{rounds[0]:.2f}"


def _targets_section(result: RunResult) -> list[str]:
    targets = result.target_results()
    if not targets:
        return []
    if result.smoke:  # 0.3 s windows: a smoke test of the harness, not a measurement
        rows = [[t.target.figure, t.target.requirement(), t.server, _ratio(t.ratio)]
                for t in targets]
        return ["## Targets (smoke run: no verdict)", "",
                *_table(["figure", "target", "server", "smoke ratio"], rows, align_left=3),
                "", "A --quick run's windows are a fraction of a second: its ratios show the "
                "harness works, and say nothing about the targets. Run without --quick for a "
                "verdict.", ""]
    rows = [[t.target.figure, t.target.requirement(), t.server, _ratio(t.ratio),
             _spread(t.rounds), f"{t.rounds_met}/{len(t.rounds)}", t.verdict]
            for t in targets]
    return ["## Targets", "",
            *_table(["figure", "target", "server", "median", "rounds (min to max)",
                     "rounds met", "PASS/MISS"], rows, align_left=3), "",
            "Ratios are medians of per-round ratios, per server CPU-second where the figure "
            "says /CPU-s; the verdict is the median's, and the spread and rounds met show "
            f"how firm it is. Only `{HELD_TO_TARGETS}` (portside's default engine) is held to "
            f"the targets, and `{RELAY_HELD_TO_TARGETS}` to the relay's; the other engines are "
            "shown for comparison.", ""]


def _baseline_section(result: RunResult) -> list[str]:
    """Each engine against itself at an earlier commit (``--baseline``), figure by figure."""
    rows = []
    for past in result.servers:
        current = past.split("@", 1)[0]
        if SERVERS[past].tree is None or current not in result.servers:
            continue
        ratios = [(f, result.ratio(current, f, past)) for f in result.figures() if f.compared]
        rows += [[current, past, f.key, _ratio(ratio)] for f, ratio in ratios
                 if ratio is not None]  # not the scenarios the engine takes no part in
    if not rows:
        return []
    return ["## Against an earlier commit", "",
            *_table(["server", "earlier", "figure", "now / then"], rows, align_left=3), "",
            "Per-round ratio of the engine now to the same engine at the earlier commit, "
            "measured in the same round; median.", ""]


def markdown(result: RunResult, ctx: Context) -> str:
    plan, machine, commit = ctx.plan, ctx.machine, ctx.commit
    dirty = commit["dirty"]
    pin = machine["pinning"]
    dirty_mark = f" — DIRTY TREE: {len(dirty)} uncommitted change(s) measured" if dirty else ""
    lines = [
        f"# Echo benchmark, {ctx.stamp}{' (quick smoke run)' if plan.quick else ''}"
        f"{dirty_mark}", "",
        f"Commit `{commit['short']}` ({commit['subject']})"
        + (f", **with {len(dirty)} uncommitted change(s) measured too**: "
           + ", ".join(f"`{path}`" for path in dirty[:10])
           + (", ..." if len(dirty) > 10 else "") if dirty else "") + ".",
        f"Machine: {machine['cores']} cores ({machine['cpu_model']}), "
        f"{machine['memory_gib']} GiB, Linux {machine['kernel']}; Python {machine['python']}, "
        f"uvloop {machine['loop']['uvloop']}; {machine['compiler']}.",
        f"Server pinned to CPU {pin['server_cpu']}, load generator to CPU {pin['loadgen_cpu']}. "
        f"{plan.rounds} round(s), medians; {plan.seconds:g} s measured per figure after "
        f"{plan.warmup:g} s of unmeasured connection churn per server process. "
        f"Servers in a seeded random order per round (seed {plan.seed}). "
        f"Load average at start: {machine['loadavg_at_start']}.", "",
    ]
    if ctx.chart:
        lines += [f"![echo benchmark chart]({ctx.chart})", ""]
    elif ctx.chart_note:
        lines += [f"(No chart: {ctx.chart_note}.)", ""]
    lines += _targets_section(result)
    lines += _baseline_section(result)
    for scenario in plan.scenarios:
        lines += _scenario_section(result, plan, scenario)
    lines += ["## Method", "",
              "- Load generator: bench/loadgen.c (epoll, one thread), checks every echoed byte. "
              "`loadgen CPU` is its own utime+stime over the window (1.00 = one core); "
              "`server CPU` the server's utime+stime from /proc/PID/stat; `other CPU` the rest "
              "of the host's busy time (noise: 2 cores = 2.00).",
              "- req/CPU-s and conn/CPU-s: requests (connections) per second of server CPU.",
              "- (d) RSS B/conn = (VmRSS held - VmRSS before) / connections the server holds, "
              "on a fresh server process after its warm-up.",
              f"- (e) {_defer_accept_words(plan.defer_accept)} on the data-first port, and a "
              f"first-data timeout of {plan.first_data_timeout:g} s, so the server closes "
              "silent connections during the attack ('silent closed by server'); the attacker "
              "reopens them at once, and the attacked window starts "
              f"{plan.attack_settle():g} s into the attack (deferral + timeout + margin). "
              "'No attack' pools two windows in the same server process, one just before the "
              "attack and one just after (p99: their mean).",
              "- portside's worker processes (`--workers`; issue 4 asks for them 'where the "
              "machine has spare cores') are not measured: on a 2-core machine the load "
              "generator takes the only core the server does not use.", ""]
    if result.failures:
        lines += ["## Failures", ""]
        lines += [f"- round {f.round} {f.server} ({f.scenario}): {f.reason}"
                  for f in result.failures]
        lines.append("")
    return "\n".join(lines)


def _defer_accept_words(seconds: int) -> str:
    """The method line's TCP_DEFER_ACCEPT, called portside's default only when it is."""
    try:
        from portside.config import ListenerConfig, default_of
        default: int | None = int(default_of(ListenerConfig, "defer_accept"))
    except ImportError:
        default = None
    if seconds == default:
        return f"uses portside's default TCP_DEFER_ACCEPT ({seconds} s)"
    state = "off (0 s)" if seconds == 0 else f"{seconds} s"
    return (f"runs with TCP_DEFER_ACCEPT {state} (--defer-accept; portside's default is "
            f"{default if default is not None else '?'} s)")


def document(result: RunResult, ctx: Context) -> dict[str, Any]:
    return {"format": 1, "stamp": ctx.stamp, "commit": ctx.commit, "machine": ctx.machine,
            "plan": ctx.plan.as_dict(),
            "scenarios": {s: ctx.plan.describe(s) for s in ctx.plan.scenarios},
            "figures": {f.key: _figure_meta(f) for f in result.figures()},
            **result.to_json()}


def _figure_meta(figure: Figure) -> dict[str, Any]:
    return {"label": figure.label, "higher_is_better": figure.higher_is_better}


def latest_name(plan: Plan) -> str:
    """The name of the copies of the newest run: ``latest``, or ``quick-latest`` for a smoke
    run, which must never replace a real run's committed figures."""
    return "quick-latest" if plan.quick else "latest"


def may_be_latest(ctx: Context) -> bool:
    """Whether the run may replace ``latest.*``: a real run only of committed code (or with
    --allow-dirty, its title then saying DIRTY), so the committed figures always name the
    code they measured. A smoke run's ``quick-latest`` is never committed: always."""
    return ctx.plan.quick or not ctx.commit["dirty"] or ctx.allow_dirty


def write(result: RunResult, ctx: Context, results_dir: Path) -> list[Path]:
    """Write <stamp>.md and .json (the chart is already there) and the ``latest`` copies."""
    results_dir.mkdir(parents=True, exist_ok=True)
    md = results_dir / f"{ctx.stamp}.md"
    js = results_dir / f"{ctx.stamp}.json"
    md.write_text(markdown(result, ctx))
    js.write_text(json.dumps(document(result, ctx), indent=1, allow_nan=False) + "\n")
    written = [md, js]
    if not may_be_latest(ctx):
        if ctx.chart:
            written.append(results_dir / ctx.chart)
        return written
    name = latest_name(ctx.plan)
    latest_chart = f"{name}.png" if ctx.chart else None
    if ctx.chart:
        shutil.copyfile(results_dir / ctx.chart, results_dir / f"{name}.png")
        written += [results_dir / ctx.chart, results_dir / f"{name}.png"]
    latest = Context(ctx.stamp, ctx.plan, ctx.machine, ctx.commit, latest_chart, ctx.chart_note,
                     ctx.allow_dirty)
    (results_dir / f"{name}.md").write_text(markdown(result, latest))
    shutil.copyfile(js, results_dir / f"{name}.json")
    return [*written, results_dir / f"{name}.md", results_dir / f"{name}.json"]
