"""The scenarios: each drives one running server and returns its figures (see figures.py).

A figure that could not be measured is left out of the returned dict, never guessed.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from bench.loadgen import Loadgen, LoadgenReport
from bench.plan import Plan
from bench.procfs import cpu_seconds, fd_count, rss_kib
from bench.serverproc import RunningServer

Figures = dict[str, float]
FD_WAIT = 15.0  # seconds the server may take to accept every idle connection


def warm_up(plan: Plan, loadgen: Loadgen, server: RunningServer,
            tls: bool = False) -> LoadgenReport:
    """Unmeasured connection churn, so no server is measured cold (a fresh asyncio server is
    3-4x slower until its first 256 KiB read buffer has been freed); TLS to a TLS server."""
    return loadgen.run("short", server.port, plan.clients, plan.small_size, plan.warmup,
                       tls=tls)


def _cpu_figures(report: LoadgenReport, upstream_cpu_s: float | None = None) -> Figures:
    seconds = report.seconds
    figures: Figures = {"lg_cpu": report.loadgen_cpu_s / seconds,
                        "failures": float(report.failures)}
    if upstream_cpu_s is not None:
        figures["upstream_cpu"] = upstream_cpu_s / seconds
    if report.server_cpu_s >= 0:
        figures["srv_cpu"] = report.server_cpu_s / seconds
        if report.host_busy_s >= 0:
            other = (report.host_busy_s - report.server_cpu_s - report.loadgen_cpu_s
                     - (upstream_cpu_s or 0.0))
            figures["other_cpu"] = max(0.0, other / seconds)
    return figures


def _load_figures(report: LoadgenReport, unit: str,
                  upstream_cpu_s: float | None = None) -> Figures:
    seconds = report.seconds
    figures = _cpu_figures(report, upstream_cpu_s)
    if seconds > 0:
        figures[f"{unit}_s"] = report.completed / seconds
    if report.server_cpu_s > 0:
        figures[f"{unit}_cpu_s"] = report.completed / report.server_cpu_s
    if report.completed:
        figures["p50_us"] = report.p50_us
        figures["p99_us"] = report.p99_us
    return figures


def persistent(plan: Plan, loadgen: Loadgen, server: RunningServer, size: int,
               tls: bool = False) -> Figures:
    """(a), (b), (r) and over TLS (t64, t4k, rt): ``plan.clients`` connections, one
    ``size``-byte message in flight each (the TLS handshakes happen before the window)."""
    upstream = server.upstream_pid
    before = cpu_seconds(upstream) if upstream is not None else 0.0
    report = loadgen.run("persistent", server.port, plan.clients, size, plan.seconds,
                         server.pid, tls=tls)
    # A relay's upstream works beside the load generator: its CPU is counted, not noise.
    upstream_cpu = cpu_seconds(upstream) - before if upstream is not None else None
    figures = _load_figures(report, "req", upstream_cpu)
    if size == plan.large_size and report.seconds > 0:
        figures["mb_s"] = report.completed * size / report.seconds / 1e6
    return figures


def short_lived(plan: Plan, loadgen: Loadgen, server: RunningServer) -> Figures:
    """(c): connect, send, read the echo, close; ``plan.clients`` slots at once."""
    report = loadgen.run("short", server.port, plan.clients, plan.small_size, plan.seconds,
                         server.pid)
    return _load_figures(report, "conn")


def handshakes(plan: Plan, loadgen: Loadgen, server: RunningServer, resume: bool) -> Figures:
    """(h): as (c) over TLS, a handshake per connection: full, or resuming the session the
    slot last received. ``resumed_share`` says how many handshakes did resume."""
    report = loadgen.run("short", server.port, plan.clients, plan.small_size, plan.seconds,
                         server.pid, tls=True, resume=resume)
    figures = _load_figures(report, "conn")
    if report.handshakes:
        figures["resumed_share"] = report.resumed / report.handshakes
    return figures


def _wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def idle(plan: Plan, loadgen: Loadgen, server: RunningServer, count: int) -> Figures:
    """(d): server RSS per idle connection, (VmRSS held - VmRSS before) / connections held."""
    time.sleep(plan.settle)
    rss_before, fds_before = rss_kib(server.pid), fd_count(server.pid)
    with loadgen.hold_idle(server.port, count, plan.connect_timeout + FD_WAIT + 30) as hold:
        _wait_for(lambda: fd_count(server.pid) - fds_before >= hold.connected, FD_WAIT)
        time.sleep(plan.settle)
        held = fd_count(server.pid) - fds_before
        rss_held = rss_kib(server.pid)
    figures: Figures = {"held": float(held), "connect_s": hold.connect_seconds}
    if held > 0:
        figures["rss_per_conn_b"] = (rss_held - rss_before) * 1024 / held
    if hold.report is not None:
        figures["closed_by_server"] = float(hold.report.closed_by_server)
    return figures


def slowloris(plan: Plan, loadgen: Loadgen, server: RunningServer) -> Figures:
    """(e): echo throughput and p99 on the immediate port with ``plan.slowloris_conns`` silent
    connections (reopened when closed) on the data-first port, against no attack.

    "No attack" is measured just before and just after the attack, in the same process, and
    the two are pooled, so a drift in time (warming up, a noisy neighbour) does not pass for
    the attack's effect.
    """
    def echo() -> LoadgenReport:
        return loadgen.run("persistent", server.port, plan.clients, plan.small_size,
                           plan.seconds, server.pid)

    before = echo()
    hold_for = plan.seconds + plan.attack_settle() + 2 * plan.connect_timeout + 30
    with loadgen.hold_idle(server.data_first_port, plan.slowloris_conns, hold_for,
                           reconnect=True) as hold:
        # Past the kernel's deferral and the first-data deadline before measuring: the
        # server is closing silent connections (and the attacker reopening them) throughout.
        time.sleep(plan.attack_settle())
        attacked = echo()
    after = echo()
    base_seconds = before.seconds + after.seconds
    figures: Figures = {"silent_connected": float(hold.connected),
                        "failures": float(before.failures + attacked.failures + after.failures)}
    if hold.report is not None:
        figures["silent_closed"] = float(hold.report.closed_by_server)
    figures["attack_lg_cpu"] = attacked.loadgen_cpu_s / attacked.seconds
    if attacked.server_cpu_s >= 0:
        figures["attack_srv_cpu"] = attacked.server_cpu_s / attacked.seconds
        if attacked.host_busy_s >= 0:  # the silent connections' holder is in here too
            other = attacked.host_busy_s - attacked.server_cpu_s - attacked.loadgen_cpu_s
            figures["attack_other_cpu"] = max(0.0, other / attacked.seconds)
    base_rate = (before.completed + after.completed) / base_seconds
    attack_rate = attacked.completed / attacked.seconds
    figures["base_req_s"], figures["attack_req_s"] = base_rate, attack_rate
    if base_rate > 0:
        figures["throughput_ratio"] = attack_rate / base_rate
    if before.completed and after.completed and attacked.completed:
        base_p99 = (before.p99_us + after.p99_us) / 2
        figures["base_p99_us"], figures["attack_p99_us"] = base_p99, attacked.p99_us
        if base_p99 > 0:
            figures["p99_ratio"] = attacked.p99_us / base_p99
    return figures
