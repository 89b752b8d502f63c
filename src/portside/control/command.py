"""The ``portside ctl`` and ``portside top`` subcommands: their flags and what they run.

Kept light on purpose: ``portside ctl`` is what scripts and probes call, so it must start fast.
``main`` parses these two commands alone (``python -m portside`` sends them here before
building the server commands' parser), and nothing here imports the server, the engine, the
settings, rich or prometheus_client; a flag's value is checked by the ``Kind`` declared in
``config`` (imported only when such a flag is given).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from portside.argparsing import Parser
from portside.control import protocol
from portside.errors import ControlError
from portside.text import printable

EXIT_NONE = 1  # ``ctl servers`` found none: as pgrep and grep say "no match"


def _checked(kind: str, **options: Any) -> Callable[[str], Any]:
    """An argparse type that reads a value with the ``Kind`` named ``kind`` in
    ``portside.config`` (the one declaration of what a duration or a count may be)."""
    def parse(text: str) -> Any:
        import portside.config

        try:
            return getattr(portside.config, kind)(**options).parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    parse.__name__ = kind.lower()  # argparse names the type in some messages
    return parse


_seconds = _checked("Seconds", positive=True)
_count = _checked("Count", minimum=1)


def main(argv: Sequence[str]) -> int:
    """``portside ctl ...`` and ``portside top ...``, without the rest of the command line."""
    parser = Parser(prog="portside")
    commands = parser.add_subparsers(dest="subcommand", parser_class=Parser,
                                     metavar="COMMAND", required=True)
    add_commands(commands)
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        return 130


def _target_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """Which server, and how long to wait: on ``ctl`` and (so they may follow the command)
    on each of its commands."""
    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value
    parser.add_argument("--control", metavar="PATH", default=default(None),
                        help="the server's control socket (default: the only server running)")
    parser.add_argument("--pid", type=_count, metavar="PID", default=default(None),
                        help="the server whose process id is PID")
    parser.add_argument("--timeout", type=_seconds, default=default(30.0), metavar="SECONDS",
                        help="how long to wait for the reply, or for drain to finish "
                             "(default: 30)")
    parser.add_argument("--json", action="store_true", default=default(False),
                        help="print the reply as JSON, for scripts")


def add_commands(commands: Any) -> None:
    """Add ``ctl`` and ``top`` to the ``portside`` command's subparsers."""
    ctl = commands.add_parser(
        "ctl", help="control a running server (stats, connections, pause, drain, ...)",
        description="Send one command to a running server through its control socket. "
                    "Without --control or --pid, the only portside server of yours running.")
    _target_options(ctl, suppress=False)
    ctl.set_defaults(run=run_ctl)
    actions = ctl.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in protocol.COMMANDS.items():
        sub = actions.add_parser(name, help=command.help, description=command.help)
        _target_options(sub, suppress=True)
        if name in ("pause", "resume"):
            sub.add_argument("listener", nargs="?", help="one listener (default: all)")
        elif name in ("close", "abort"):
            sub.add_argument("id", help="the connection's id, as 'connections' lists it")
        elif name == "max-connections":
            sub.add_argument("value", type=_count, help="the new ceiling")
            sub.add_argument("--listener", help="one listener (default: all)")
        elif name == "log-level":
            sub.add_argument("level", choices=protocol.LOG_LEVELS)
        elif name == "connections":
            sub.add_argument("--listener", help="only this listener's")
            sub.add_argument("--state", choices=protocol.CONNECTION_STATES)
            sub.add_argument("--peer", help="only peers whose address contains this")
            sub.add_argument("--limit", type=_count, default=100,
                             help="list at most this many, oldest first (default: 100)")
    servers = actions.add_parser("servers", help="list your running portside servers")
    _target_options(servers, suppress=True)

    top = commands.add_parser("top", help="a live view of a running server",
                              description="Listeners, workers and connections of a running "
                                          "server, refreshed from its control socket. Keys: "
                                          "q quit, p pause, s sort connections, c hide "
                                          "connections, ? help.")
    top.add_argument("--control", metavar="PATH", default=None,
                     help="the server's control socket (default: the only server running)")
    top.add_argument("--pid", type=_count, metavar="PID", default=None,
                     help="the server whose process id is PID")
    top.add_argument("--once", action="store_true", help="print one snapshot and exit")
    top.add_argument("--json", action="store_true", help="with --once: print it as JSON")
    top.add_argument("--interval", type=_seconds, default=1.0, metavar="SECONDS",
                     help="refresh period (default: %(default)s)")
    top.add_argument("--iterations", type=_count, default=None, metavar="N",
                     help="stop after N refreshes (default: until q or Ctrl-C)")
    top.set_defaults(run=run_top)


def run_ctl(args: argparse.Namespace) -> int:
    from portside.control.client import call
    from portside.control.paths import resolve

    try:
        if args.command == "servers":
            return _servers(args)
        path = resolve(args.control, args.pid)
        request = {key: getattr(args, key) for key in protocol.COMMANDS[args.command].arguments
                   if getattr(args, key, None) is not None}
        result = call(path, args.command, request, timeout=args.timeout)
        if args.command == "drain":
            return _follow_drain(path, result, args)
    except ControlError as exc:
        print(f"portside ctl: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2) if args.json else readable(args.command, result))
    return 0


def _servers(args: argparse.Namespace) -> int:
    """List this user's servers (those with ``--control PATH`` too); none is exit status 1,
    with a line on stderr (``--json``: ``[]``), so that scripts can test for one."""
    from portside.control.paths import control_directory, running_servers

    found = running_servers()
    if args.json:
        print(json.dumps([{"pid": entry.pid, "control": entry.path} for entry in found],
                         indent=2))
    elif not found:
        print(f"portside ctl: no portside server is running (looked in "
              f"{control_directory()})", file=sys.stderr)
    for entry in found if not args.json else ():
        print(entry.describe())
    return 0 if found else EXIT_NONE


def _follow_drain(path: str, result: dict[str, Any], args: argparse.Namespace) -> int:
    """Report as the open connections finish, until none is left or ``--timeout``."""
    from portside.control.client import call

    deadline = time.monotonic() + args.timeout
    left = result["connections"]
    print(json.dumps({"connections": left}) if args.json else
          f"draining: accepting stopped, {left} connection(s) open", flush=True)
    while left:
        if time.monotonic() >= deadline:
            print(f"portside ctl: {left} connection(s) still open after {args.timeout:g} s",
                  file=sys.stderr)
            return 1
        time.sleep(0.2)  # polling a remote count, bounded by the deadline above
        totals = call(path, "stats", timeout=max(0.1, deadline - time.monotonic()))["totals"]
        now = totals["active"] + totals["pending"]
        if now != left:
            left = now
            print(json.dumps({"connections": left}) if args.json else
                  f"draining: {left} connection(s) open", flush=True)
    if not args.json:
        print("drained: no connections open (ctl resume to accept again, ctl shutdown to stop)")
    return 0


def _table(rows: list[list[str]]) -> str:
    rows = [[printable(cell) for cell in row] for row in rows]  # a peer chose some of them
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(width) if i and cell[:1].isdigit() else
                               cell.ljust(width) for i, (cell, width) in
                               enumerate(zip(row, widths, strict=True))).rstrip()
                     for row in rows)


def readable(command: str, result: Any) -> str:
    """A reply as a person reads it."""
    if command == "stats":
        state = ("draining" if result.get("draining") else
                 "paused" if result["accepting_paused"] else "accepting")
        head = (f"portside pid {result['pid']}, up {result['uptime']:.0f} s, "
                f"engine {result.get('engine')}, {state}, {len(result['workers'])} worker(s)")
        listeners = [["listener", "state", "open", "limit", "peak", "accepted", "closed",
                      "address"]]
        for entry in result["listeners"]:
            listeners.append([entry["name"], entry.get("accept_state", "-"),
                              str(entry["active"] + entry["pending"]),
                              str(entry.get("max_connections", "-")),
                              str(entry.get("peak_connections", "-")), str(entry["accepted"]),
                              str(entry["closed"]), entry["address"]])
        workers = [["worker", "pid", "state", "conns", "fds", "mem MiB"]]
        for process in [*result["workers"], *filter(None, [result.get("supervisor")])]:
            workers.append([process["slot"], str(process["pid"]), process["state"],
                            str(process["connections"]), str(process["open_fds"]),
                            f"{process['memory_bytes'] / 2**20:.1f}"])
        return f"{head}\n\n{_table(listeners)}\n\n{_table(workers)}"
    if command == "connections":
        rows = [["id", "listener", "peer", "age s", "state", "in", "out", "queued"]]
        for entry in result["connections"]:
            rows.append([entry["id"], entry["listener"], entry["peer"], f"{entry['age']:.1f}",
                         entry["state"], str(entry["bytes_in"]), str(entry["bytes_out"]),
                         str(entry["queued"])])
        shown = len(rows) - 1
        footer = f"{shown} of {result['total']} connection(s)"
        return footer if not shown else f"{_table(rows)}\n{footer}"
    if command in ("close", "abort"):
        entry = result.get("closed") or result.get("aborted")
        verb = "closed" if command == "close" else "aborted"
        return printable(f"{verb} connection {entry['id']} from {entry['peer']} on "
                         f"{entry['listener']}")
    if command in ("pause", "resume"):
        states = result.get("listeners", {})
        return "\n".join(f"{name}: {state}" for name, state in states.items()) or command
    if command == "max-connections":
        return "\n".join(f"{name}: max_connections {value}"
                         for name, value in result["max_connections"].items())
    if command == "log-level":
        return f"log level: {result['log_level']}"
    if command == "shutdown":
        return "shutting down gracefully"
    return json.dumps(result, indent=2)


def run_top(args: argparse.Namespace) -> int:
    from portside.control.paths import resolve

    try:
        path = resolve(args.control, args.pid)
    except ControlError as exc:
        print(f"portside top: {exc}", file=sys.stderr)
        return 1
    from portside.top import run_top as top

    return top(path, args.interval, args.once, args.iterations, as_json=args.json)
