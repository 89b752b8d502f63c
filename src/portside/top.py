"""``portside top``: a live terminal view of a running server, from its control socket."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from portside.control.client import ControlError, send_command


def _rate(now: dict[str, Any] | None, before: dict[str, Any] | None, key: str,
          seconds: float) -> str:
    if now is None or before is None or seconds <= 0:
        return "-"
    return f"{max(0, now[key] - before[key]) / seconds:,.1f}"


def render(document: dict[str, Any], previous: dict[str, Any] | None,
           seconds: float) -> Group:
    """Tables of listeners and workers; rates from the change since ``previous``."""
    state = "paused" if document["accepting_paused"] else "accepting"
    if document.get("shutting_down"):
        state = "shutting down"
    title = (f"portside pid {document['pid']}  up {document['uptime']:.0f} s  {state}  "
             f"restarts {document.get('restarts', 0)}")
    listeners = Table(title=title, title_justify="left", expand=True)
    for column in ("listener", "address", "policy", "active", "pending", "accepted",
                   "conn/s", "in kB/s", "out kB/s", "1st-data t/o", "idle/read/write t/o",
                   "evicted", "limited", "errors"):
        listeners.add_column(column, justify="left" if column in (
            "listener", "address", "policy") else "right")
    earlier = {entry["name"]: entry for entry in (previous or {}).get("listeners", [])}
    for entry in document["listeners"]:
        before = earlier.get(entry["name"])
        kb_in = _rate(entry, before, "bytes_in", seconds * 1000)
        kb_out = _rate(entry, before, "bytes_out", seconds * 1000)
        listeners.add_row(
            entry["name"], entry["address"], entry["policy"], f"{entry['active']:,}",
            f"{entry['pending']:,}", f"{entry['accepted']:,}",
            _rate(entry, before, "accepted", seconds), kb_in, kb_out,
            f"{entry['first_data_timeouts']:,}",
            f"{entry['idle_timeouts']}/{entry['read_timeouts']}/{entry['write_timeouts']}",
            f"{entry['evicted']:,}", f"{entry['limited']:,}",
            f"{entry['accept_errors'] + entry['proxy_errors']:,}")
    workers = Table(expand=True)
    for column in ("worker pid", "state", "uptime s", "connections", "loop lag ms",
                   "worst lag ms"):
        workers.add_column(column, justify="right")
    for worker in document["workers"]:
        workers.add_row(str(worker["pid"]), worker["state"], f"{worker['uptime']:.0f}",
                        f"{worker['connections']:,}", f"{worker['loop_lag'] * 1000:.1f}",
                        f"{worker['loop_lag_max'] * 1000:.1f}")
    return Group(listeners, workers)


def run_top(path: str, interval: float = 1.0, once: bool = False,
            iterations: int | None = None, console: Console | None = None) -> int:
    """Show the view until Ctrl-C (or ``iterations`` refreshes); 1 when the server is gone."""
    console = console or Console()
    try:
        document = send_command(path, "stats", timeout=10)
    except ControlError as exc:
        console.print(f"portside top: {exc}", style="bold red", highlight=False)
        return 1
    if once:
        console.print(render(document, None, 0))
        return 0
    previous, taken = document, time.monotonic()
    shown = 0
    with Live(render(document, None, 0), console=console, auto_refresh=False) as live:
        try:
            while iterations is None or shown < iterations:
                time.sleep(interval)  # the refresh period of a display, not a synchronisation
                try:
                    document = send_command(path, "stats", timeout=10)
                except ControlError as exc:
                    live.update(f"portside top: {exc}", refresh=True)
                    return 1
                now = time.monotonic()
                live.update(render(document, previous, now - taken), refresh=True)
                previous, taken = document, now
                shown += 1
        except KeyboardInterrupt:
            pass
    return 0
