"""Runs the plan: every round, every server in turn, each in fresh processes per session.

A session is one server process: started pinned to the server CPU, warmed up with unmeasured
connection churn, then measured. Scenarios a, b and c share a session; each idle count (d) gets
its own fresh server, so RSS "before" is not inflated by what earlier scenarios left in the
allocator; the slowloris scenario (e) runs portside servers with a data-first listener added;
the TLS scenarios (t64, t4k, hfull, hresume; rt for relays) share one session of a server
started with the run's throwaway certificate (``--certfile``/``--keyfile``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from bench import scenarios, tlscert
from bench.build import BUILD_DIR, BuildError
from bench.loadgen import Loadgen, LoadgenError
from bench.plan import Plan
from bench.results import Failure, Measurement, RunResult
from bench.serverproc import RunningServer, ServerStartError, running
from bench.servers import (
    RELAY_SCENARIO,
    SERVERS,
    TLS_RELAY_SCENARIO,
    TLS_SCENARIOS,
    ServerSpec,
    takes_part,
)

Scenario = Callable[[RunningServer], scenarios.Figures]
MEASURE_ERRORS = (LoadgenError, ServerStartError, BuildError, OSError, ValueError)


@dataclass(frozen=True)
class Session:
    """Scenarios measured on one server process, and the extra server options they need."""

    scenarios: tuple[tuple[str, Scenario], ...]
    server_args: tuple[str, ...] = ()
    #: The server speaks TLS (started with the run's certificate): so does the warm-up.
    tls: bool = False


class Harness:
    def __init__(self, plan: Plan, stamp: str, progress: TextIO = sys.stderr) -> None:
        self.plan = plan
        self.progress = progress
        self.log_dir = BUILD_DIR / "logs" / stamp
        self.loadgen = Loadgen.build(plan.loadgen_cpu, plan.connect_timeout,
                                     plan.source_addresses)
        self.result = RunResult(plan.servers, plan.scenarios, plan.rounds, smoke=plan.quick,
                                orders=plan.server_orders())
        wants_tls = any(takes_part(server, scenario) for server in plan.servers
                        for scenario in plan.scenarios if scenario in TLS_SCENARIOS)
        self.tls = tlscert.make(stamp) if wants_tls else None

    def say(self, text: str) -> None:
        print(text, file=self.progress, flush=True)

    def sessions(self, spec: ServerSpec) -> list[Session]:
        plan, lg = self.plan, self.loadgen
        tls_args = self.tls.server_args() if self.tls is not None else ()
        if spec.relays_to is not None:  # a relay is measured in (r) and (rt) only
            out = []
            if RELAY_SCENARIO in plan.scenarios:
                out.append(Session(((RELAY_SCENARIO, lambda s: scenarios.persistent(
                    plan, lg, s, plan.small_size)),)))
            if TLS_RELAY_SCENARIO in plan.scenarios and spec.tls and self.tls is not None:
                out.append(Session(((TLS_RELAY_SCENARIO, lambda s: scenarios.persistent(
                    plan, lg, s, plan.small_size, tls=True)),), tls_args, tls=True))
            return out
        load: list[tuple[str, Scenario]] = []
        if "a" in plan.scenarios:
            load.append(("a", lambda s: scenarios.persistent(plan, lg, s, plan.small_size)))
        if "b" in plan.scenarios:
            load.append(("b", lambda s: scenarios.persistent(plan, lg, s, plan.large_size)))
        if "c" in plan.scenarios:
            load.append(("c", lambda s: scenarios.short_lived(plan, lg, s)))
        out = [Session(tuple(load))] if load else []
        if spec.tls and self.tls is not None:
            secure: list[tuple[str, Scenario]] = []
            if "t64" in plan.scenarios:
                secure.append(("t64", lambda s: scenarios.persistent(
                    plan, lg, s, plan.small_size, tls=True)))
            if "t4k" in plan.scenarios:
                secure.append(("t4k", lambda s: scenarios.persistent(
                    plan, lg, s, plan.large_size, tls=True)))
            if "hfull" in plan.scenarios:
                secure.append(("hfull", lambda s: scenarios.handshakes(plan, lg, s, False)))
            if "hresume" in plan.scenarios:
                secure.append(("hresume", lambda s: scenarios.handshakes(plan, lg, s, True)))
            if secure:
                out.append(Session(tuple(secure), tls_args, tls=True))
        ceiling = max((*plan.idle_counts(), plan.slowloris_conns)) * 2
        portside_args = ("--max-connections", str(ceiling)) if spec.is_portside else ()
        for count in plan.idle_counts():
            def measure(s: RunningServer, n: int = count) -> scenarios.Figures:
                return scenarios.idle(plan, lg, s, n)
            out.append(Session(((f"d{count}", measure),), portside_args))
        if "e" in plan.scenarios and spec.is_portside:
            # An earlier commit's server (--baseline) may not take the first-data timeout:
            # it then runs with its own default, and (e) says so by its closed count.
            timeout = () if spec.tree is not None else (
                "--first-data-timeout", f"{plan.first_data_timeout:g}")
            out.append(Session((("e", lambda s: scenarios.slowloris(plan, lg, s)),),
                               (*portside_args, "--data-first",
                                "--defer-accept", str(plan.defer_accept), *timeout)))
        return out

    def nofile(self) -> int:
        """Descriptors a server or load generator needs: the most connections, and room."""
        return max((*self.plan.idle_counts(), self.plan.slowloris_conns)) + 4096

    def session_budget(self) -> float:
        """An upper bound on one session's time: the server's own lifetime limit."""
        plan = self.plan
        return plan.warmup + 4 * (plan.seconds + plan.connect_timeout) + \
            plan.attack_settle() + 180

    def run(self) -> RunResult:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        for round_no, order in enumerate(self.result.orders, start=1):
            self.say(f"round {round_no}/{self.plan.rounds}: {', '.join(order)} "
                     f"(seed {self.plan.seed})")
            for name in order:
                spec = SERVERS[name]
                for session in self.sessions(spec):
                    self._run_session(spec, session, round_no)
        self.say(f"done in {time.monotonic() - started:.1f} s")
        return self.result

    def _run_session(self, spec: ServerSpec, session: Session, round_no: int) -> None:
        plan = self.plan
        names = ",".join(name for name, _ in session.scenarios)
        log_path = self.log_dir / f"{spec.name}-r{round_no}-{names}.log"
        try:
            with log_path.open("w") as log, contextlib.ExitStack() as stack:
                extra = session.server_args
                if spec.relays_to is not None:
                    # The server relayed to runs beside the load generator, so the relay has
                    # its CPU to itself; only the relay's CPU is measured.
                    upstream = stack.enter_context(running(
                        SERVERS[spec.relays_to], cpu=plan.loadgen_cpu, nofile=self.nofile(),
                        max_seconds=self.session_budget(), log=log))
                    extra = (*extra, "--upstream", f"127.0.0.1:{upstream.port}")
                server = stack.enter_context(running(
                    spec, cpu=plan.server_cpu, nofile=self.nofile(),
                    max_seconds=self.session_budget(), log=log, extra=extra))
                if spec.relays_to is not None:
                    server = dataclasses.replace(server, upstream_pid=upstream.pid)
                warm = scenarios.warm_up(plan, self.loadgen, server, tls=session.tls)
                if warm.completed == 0:
                    raise LoadgenError(f"warm-up completed no connection "
                                       f"({warm.failures} failures)")
                for scenario, measure in session.scenarios:
                    self._measure(spec.name, scenario, round_no, server, measure)
        except MEASURE_ERRORS as exc:
            for scenario, _ in session.scenarios:
                if not any(m.server == spec.name and m.scenario == scenario
                           and m.round == round_no for m in self.result.measurements):
                    self._fail(spec.name, scenario, round_no, f"{exc} (log: {log_path})")

    def _measure(self, server_name: str, scenario: str, round_no: int, server: RunningServer,
                 measure: Scenario) -> None:
        try:
            figures = measure(server)
        except MEASURE_ERRORS as exc:
            self._fail(server_name, scenario, round_no, str(exc))
            return
        self.result.measurements.append(Measurement(server_name, scenario, round_no, figures))
        self.say(f"round {round_no}/{self.plan.rounds} {server_name:<17} {scenario:<6} "
                 f"{_headline(scenario, figures)}")

    def _fail(self, server: str, scenario: str, round_no: int, reason: str) -> None:
        self.result.failures.append(Failure(server, scenario, round_no, reason))
        self.say(f"round {round_no}/{self.plan.rounds} {server:<17} {scenario:<6} "
                 f"FAILED: {reason}")


def _headline(scenario: str, figures: scenarios.Figures) -> str:
    """One progress line's worth of a measurement."""
    def get(name: str, fmt: str) -> str:
        return format(figures[name], fmt) if name in figures else "-"
    if scenario in ("a", "b", "r", "t64", "t4k", "rt"):
        return (f"{get('req_s', ',.0f')} req/s  p99 {get('p99_us', ',.0f')} µs  "
                f"srv {get('srv_cpu', '.0%')} lg {get('lg_cpu', '.0%')}  "
                f"failures {get('failures', '.0f')}")
    if scenario in ("c", "hfull", "hresume"):
        resumed = (f"resumed {get('resumed_share', '.0%')}  " if scenario.startswith("h")
                   else "")
        return (f"{resumed}{get('conn_s', ',.0f')} conn/s  p99 {get('p99_us', ',.0f')} µs  "
                f"srv {get('srv_cpu', '.0%')} lg {get('lg_cpu', '.0%')}  "
                f"failures {get('failures', '.0f')}")
    if scenario.startswith("d"):
        return (f"{get('rss_per_conn_b', ',.0f')} B/conn  held {get('held', '.0f')}  "
                f"closed by server {get('closed_by_server', '.0f')}")
    return (f"{get('base_req_s', ',.0f')} -> {get('attack_req_s', ',.0f')} req/s "
            f"({get('throughput_ratio', '.2f')}x)  p99 {get('base_p99_us', ',.0f')} -> "
            f"{get('attack_p99_us', ',.0f')} µs  silent {get('silent_connected', '.0f')}, "
            f"closed by server {get('silent_closed', '.0f')}")

