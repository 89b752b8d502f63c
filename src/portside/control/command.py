"""The ``portside ctl`` and ``portside top`` subcommands: their flags and what they run.

Kept light on purpose: ``portside ctl`` must answer in well under 100 ms, so nothing here
imports the server, the engine, rich or prometheus_client at module level.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import socket
import sys
from typing import Any

from portside.control import protocol
from portside.control.server import default_control_path


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def add_commands(commands: Any) -> None:
    """Add ``ctl`` and ``top`` to the ``portside`` command's subparsers."""
    ctl = commands.add_parser("ctl", help="control a running server",
                              description="Send one command to a running server.")
    ctl.add_argument("--control", metavar="PATH", default=default_control_path(),
                     help="its control socket (default: %(default)s)")
    ctl.add_argument("command", choices=protocol.COMMANDS)
    ctl.add_argument("--timeout", type=_seconds, default=30.0, metavar="SECONDS",
                     help="how long to wait for the reply (default: %(default)s)")
    ctl.set_defaults(run=run_ctl)
    top = commands.add_parser("top", help="a live view of a running server",
                              description="Listeners and workers of a running server, "
                                          "refreshed every second from its control socket.")
    top.add_argument("--control", metavar="PATH", default=default_control_path(),
                     help="its control socket (default: %(default)s)")
    top.add_argument("--once", action="store_true", help="print one snapshot and exit")
    top.add_argument("--interval", type=_seconds, default=1.0, metavar="SECONDS",
                     help="refresh period (default: %(default)s)")
    top.add_argument("--iterations", type=_count, default=None, metavar="N",
                     help="stop after N refreshes (default: until Ctrl-C)")
    top.set_defaults(run=run_top)


def claim_control(path: str, explicit: bool) -> str | None:
    """The control path to use: an explicit one must be free (binding says so); a default one
    that another server already answers on is skipped with a warning."""
    if explicit:
        return path
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return path
    finally:
        probe.close()
    logging.getLogger("portside").warning(
        "control socket %s is in use by another server; running without one "
        "(pass --control PATH)", path)
    return None


def run_ctl(args: argparse.Namespace) -> int:
    from portside.control.client import ControlError, send_command

    try:
        result = send_command(args.control, args.command, timeout=args.timeout)
    except ControlError as exc:
        print(f"portside ctl: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


def run_top(args: argparse.Namespace) -> int:
    from portside.top import run_top as top

    return top(args.control, args.interval, args.once, args.iterations)
