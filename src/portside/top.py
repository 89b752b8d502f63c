"""``portside top``: a live terminal view of a running server, from its control socket.

What an operator looks at first comes first: a header line with the server's state and load,
then one row per listener (accept state, open connections against the limit, peak, rates), then
one per process, then the connections themselves (from ``ctl connections``). Columns come from
the figures declared in ``portside.statistics``; when the terminal is narrow, the columns of
lowest priority are left out and headers shortened, so no cell is ever cut to a ``…`` stub.
Keys: q quits, p pauses the refresh, s changes the connections' sort, c hides them, ? shows
what each key does; ``--once`` prints a snapshot without the key hints.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import sys
import termios
import time
import tty
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from portside.control.client import call
from portside.errors import ControlError
from portside.statistics import (
    Figure,
    ListenerStatistics,
    OutboundStatistics,
    UpstreamStatistics,
    WorkerStatistics,
    figures,
)
from portside.text import printable

SORTS = ("age", "bytes_in", "bytes_out", "queued")
CONNECTIONS_ASKED = 200


@dataclass(frozen=True)
class Column:
    header: str
    short: str
    priority: int
    cell: Callable[[dict[str, Any], dict[str, Any] | None], str]
    left: bool = False


def _number(value: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e4)):
        if abs(value) >= size:
            scaled = value / (size if unit != "k" else 1e3)
            return f"{scaled:.0f}{unit}" if scaled.is_integer() else f"{scaled:.1f}{unit}"
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:.1f}"


def _declared(cls: type[Any], seconds: float,
              show: dict[str, Callable[[Any], str]]) -> list[Column]:
    """Columns for every figure of ``cls`` that declares one."""
    columns = []
    for name, declared in figures(cls):
        if declared.column is None:
            continue
        columns.append(Column(declared.column, declared.short or declared.column,
                              declared.priority, _cell(name, declared, seconds, show),
                              declared.kind in ("label", "state")))
    return columns


def _cell(name: str, declared: Figure, seconds: float,
          show: dict[str, Callable[[Any], str]]) -> Callable[[dict[str, Any],
                                                              dict[str, Any] | None], str]:
    def cell(now: dict[str, Any], before: dict[str, Any] | None) -> str:
        if name not in now:
            return "-"
        if declared.rate:
            if before is None or seconds <= 0 or name not in before:
                return "-"
            rate = max(0.0, now[name] - before[name]) / seconds
            return show.get(name, _number)(rate)
        return show.get(name, lambda value: value if isinstance(value, str)
                        else _number(value))(now[name])
    return cell


def listener_columns(seconds: float) -> list[Column]:
    show: dict[str, Callable[[Any], str]] = {"bytes_in": lambda rate: _number(rate / 1000),
                                             "bytes_out": lambda rate: _number(rate / 1000)}
    columns = _declared(ListenerStatistics, seconds, show)
    at = next(i for i, column in enumerate(columns) if column.header == "limit")
    columns.insert(at, Column("open", "open", 8,
                              lambda now, before: _number(now["active"] + now["pending"])))
    at = next(i for i, column in enumerate(columns) if column.header == "accepted")
    columns.insert(at + 1, Column("conn/s", "c/s", 14, lambda now, before: "-"
                                  if before is None or seconds <= 0 else
                                  _number(max(0, now["accepted"] - before["accepted"])
                                          / seconds)))
    return columns


def outbound_columns(seconds: float) -> list[Column]:
    """Outbound connections (``Server.connect``), one row per set of policies."""
    show: dict[str, Callable[[Any], str]] = {"bytes_in": lambda rate: _number(rate / 1000),
                                             "bytes_out": lambda rate: _number(rate / 1000)}
    return _declared(OutboundStatistics, seconds, show)


def upstream_columns(seconds: float) -> list[Column]:
    """A relay's upstream servers: state, checks, connects, one row each."""
    return _declared(UpstreamStatistics, seconds, {})


def worker_columns(seconds: float) -> list[Column]:
    show: dict[str, Callable[[Any], str]] = {
        "uptime": lambda value: f"{value:.0f}",
        "loop_lag": lambda value: f"{value * 1000:.1f}",
        "loop_lag_max": lambda value: f"{value * 1000:.1f}",
        "memory_bytes": lambda value: f"{value / 2**20:.1f}",
        "cpu_seconds": lambda rate: f"{rate * 100:.0f}",
        "pid": str,
    }
    return _declared(WorkerStatistics, seconds, show)


CONNECTION_COLUMNS = [
    Column("id", "id", 0, lambda entry, _: entry["id"], left=True),
    Column("listener", "lsn", 5, lambda entry, _: entry["listener"], left=True),
    Column("peer", "peer", 1, lambda entry, _: entry["peer"], left=True),
    Column("age s", "age", 2, lambda entry, _: f"{entry['age']:.0f}"),
    Column("state", "st", 6, lambda entry, _: entry["state"], left=True),
    Column("in", "in", 3, lambda entry, _: _number(entry["bytes_in"])),
    Column("out", "out", 4, lambda entry, _: _number(entry["bytes_out"])),
    Column("queued", "q", 7, lambda entry, _: _number(entry["queued"])),
]


def fit(columns: list[Column], rows: list[tuple[dict[str, Any], dict[str, Any] | None]],
        width: int) -> Table:
    """A table of the columns that fit in ``width``, most important first; order kept."""
    cells = [[column.cell(now, before) for now, before in rows] for column in columns]
    chosen: dict[int, str] = {}
    used = 0
    for index in sorted(range(len(columns)), key=lambda i: columns[i].priority):
        column = columns[index]
        content = max((len(text) for text in cells[index]), default=0)
        for header in (column.header, column.short):
            need = max(content, len(header)) + (1 if chosen else 0)
            if used + need <= width:
                chosen[index] = header
                used += need
                break
    table = Table(box=None, padding=(0, 1, 0, 0), pad_edge=False, show_edge=False,
                  collapse_padding=True, header_style="bold reverse")
    order = sorted(chosen)
    for index in order:
        table.add_column(chosen[index], justify="left" if columns[index].left else "right",
                         no_wrap=True, overflow="crop")
    for row in range(len(rows)):  # Text, never markup: a peer chose some cells ("[/]")
        table.add_row(*(Text(printable(cells[index][row])) for index in order))
    return table


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


KEYS = (("q", "quit"), ("p", "pause or resume the refresh"),
        ("s", "sort the connections by " + ", ".join(SORTS) + " in turn"),
        ("c", "hide or show the connections"), ("?", "show or hide this help"))


def render(document: dict[str, Any], connections: dict[str, Any] | None,
           previous: dict[str, Any] | None, seconds: float, width: int = 80,
           sort: str = "age", show_connections: bool = True,
           paused: bool = False, keys: bool = True, help_shown: bool = False
           ) -> RenderableType:
    """The whole screen; rates from the change since ``previous``. ``keys``: the line of key
    hints (a live view only: a snapshot takes no keys), ``help_shown`` with each key's line."""
    state = ("shutting down" if document.get("shutting_down") else
             "draining" if document.get("draining") else
             "paused" if document["accepting_paused"] else "accepting")
    totals = document["totals"]
    before_totals = (previous or {}).get("totals")
    rate = "-" if before_totals is None or seconds <= 0 else \
        _number(max(0, totals["accepted"] - before_totals["accepted"]) / seconds)
    head = (f"portside {document['pid']} up {_duration(document['uptime'])} {state} "
            f"conns {totals['active'] + totals['pending']} conn/s {rate} "
            f"workers {len(document['workers'])}")
    if document.get("restarts"):
        head += f" restarts {document['restarts']}"
    parts: list[RenderableType] = [Text(head[:width], style="bold")]
    if keys:
        hints = f"q quit  p {'resume' if paused else 'pause'}  s sort:{sort}  c conns  ? help"
        parts.append(Text(hints[:width], style="dim"))
    if keys and help_shown:
        parts.extend(Text(f"  {key}  {meaning}"[:width]) for key, meaning in KEYS)
    earlier = {entry["name"]: entry for entry in (previous or {}).get("listeners", [])}
    parts.append(fit(listener_columns(seconds),
                     [(entry, earlier.get(entry["name"])) for entry in document["listeners"]],
                     width))
    if document.get("outbound"):  # only once the server has made outbound connections
        earlier = {entry["name"]: entry for entry in (previous or {}).get("outbound", [])}
        parts.append(Text(""))
        parts.append(fit(outbound_columns(seconds),
                         [(entry, earlier.get(entry["name"])) for entry in document["outbound"]],
                         width))
    if document.get("upstreams"):  # only with a relay
        earlier = {entry["name"]: entry for entry in (previous or {}).get("upstreams", [])}
        parts.append(Text(""))
        parts.append(fit(upstream_columns(seconds),
                         [(entry, earlier.get(entry["name"])) for entry in document["upstreams"]],
                         width))
    earlier_workers = {process["pid"]: process for process in (previous or {}).get("workers", [])}
    processes = list(document["workers"])
    if document.get("supervisor"):
        processes.append(document["supervisor"])
        earlier_workers[document["supervisor"]["pid"]] = (previous or {}).get("supervisor")
    parts.append(Text(""))
    parts.append(fit(worker_columns(seconds),
                     [(process, earlier_workers.get(process["pid"])) for process in processes],
                     width))
    if show_connections and connections is not None:
        entries = sorted(connections["connections"], key=lambda entry: -entry[sort])
        parts.append(Text(""))
        parts.append(Text(f"connections: {len(entries)} of {connections['total']}, "
                          f"by {sort}"[:width]))
        if entries:
            parts.append(fit(CONNECTION_COLUMNS, [(entry, None) for entry in entries], width))
    return Group(*parts)


def fetch(path: str, with_connections: bool = True) -> tuple[dict[str, Any],
                                                             dict[str, Any] | None]:
    document = call(path, "stats", timeout=10)
    connections = call(path, "connections", {"limit": CONNECTIONS_ASKED}, timeout=10) \
        if with_connections else None
    return document, connections


@contextlib.contextmanager
def _keys() -> Iterator[Callable[[float], str]]:
    """Read single key presses (cbreak mode) while the view runs; restores the terminal."""
    if not sys.stdin.isatty():
        def wait_only(timeout: float) -> str:
            time.sleep(timeout)  # no keyboard: the refresh period is all there is to wait for
            return ""
        yield wait_only
        return
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)

    def key(timeout: float) -> str:
        ready, _, _ = select.select([fd], [], [], timeout)
        return os.read(fd, 1).decode(errors="replace") if ready else ""
    try:
        yield key
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


class _Console(Console):
    """rich's console, but a reader that has gone ends ``top`` as it ends ``ctl`` (the
    ``portside`` command's one BrokenPipeError path: quiet, status 141), not with status 1."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError


def run_top(path: str, interval: float = 1.0, once: bool = False,
            iterations: int | None = None, console: Console | None = None,
            as_json: bool = False) -> int:
    """Show the view until q or Ctrl-C (or ``iterations`` refreshes); 1 when the server is
    gone."""
    console = console or _Console()
    try:
        document, connections = fetch(path)
    except ControlError as exc:
        print(f"portside top: {exc}", file=sys.stderr)
        return 1
    if once:
        if as_json:
            print(json.dumps({"stats": document, "connections": connections}, indent=2))
        else:
            console.print(render(document, connections, None, 0, console.width, keys=False))
        return 0
    previous, taken = document, time.monotonic()
    sort, show, paused, shown, help_shown = "age", True, False, 0, False

    def view(seconds: float) -> RenderableType:
        return render(document, connections, previous if seconds else None, seconds,
                      console.width, sort, show, paused, help_shown=help_shown)

    with _keys() as key, Live(view(0), console=console, auto_refresh=False,
                              screen=console.is_terminal) as live:
        try:
            while iterations is None or shown < iterations:
                pressed = key(interval).lower()
                if pressed == "q":
                    break
                if pressed == "p":
                    paused = not paused
                elif pressed == "s":
                    sort = SORTS[(SORTS.index(sort) + 1) % len(SORTS)]
                elif pressed == "c":
                    show = not show
                elif pressed == "?":
                    help_shown = not help_shown
                if pressed or paused:
                    live.update(view(time.monotonic() - taken), refresh=True)
                    continue
                try:
                    previous = document
                    document, connections = fetch(path, show)
                except ControlError as exc:
                    live.stop()
                    print(f"portside top: {exc}", file=sys.stderr)
                    return 1
                now = time.monotonic()
                live.update(view(now - taken), refresh=True)
                taken = now
                shown += 1
        except KeyboardInterrupt:
            pass
    return 0
