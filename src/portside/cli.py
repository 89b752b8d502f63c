"""The ``portside`` command. Flags map onto config fields; their defaults come from config.py."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from portside.config import (
    AcceptPolicy,
    Engine,
    ListenerConfig,
    ServerConfig,
    default_of,
    parse_engine,
)
from portside.errors import ConfigError, PortsideError

LOG_LEVELS = ("debug", "info", "warning", "error")
ECHO_DATA_FIRST_PORT = 5001  # the seed's example ports
ECHO_IMMEDIATE_PORT = 5002


class _Parser(argparse.ArgumentParser):
    """Bad input is one line on stderr and exit status 2, never a usage dump or a traceback."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}")
    return value


def _count(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}")
        return value
    return parse


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535, got {text!r}")
    return value


def _engine(text: str) -> Engine:
    try:
        return parse_engine(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


@dataclass(frozen=True)
class _Option:
    """One flag: which config field it sets and how its text is parsed."""

    flag: str
    owner: type[Any]
    field: str
    parse: Callable[[str], Any]
    metavar: str
    help: str

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        default = default_of(self.owner, self.field)
        shown = default.value if isinstance(default, Engine) else default
        parser.add_argument(self.flag, dest=self.field, type=self.parse, default=default,
                            metavar=self.metavar, help=f"{self.help} (default: {shown})")


LISTENER_OPTIONS = (
    _Option("--first-data-timeout", ListenerConfig, "first_data_timeout", _seconds, "SECONDS",
            "close data-first connections silent this many seconds after accept"),
    _Option("--max-connections", ListenerConfig, "max_connections", _count(1), "N",
            "per listener: stop accepting at this many open connections"),
    _Option("--accept-batch", ListenerConfig, "accept_batch", _count(1), "N",
            "connections accepted per wake-up"),
    _Option("--defer-accept", ListenerConfig, "defer_accept", _count(0), "SECONDS",
            "seconds of Linux TCP_DEFER_ACCEPT on data-first listeners (0: off)"),
)
SERVER_OPTIONS = (
    _Option("--engine", ServerConfig, "engine", _engine, "{epoll,asyncio,uvloop}",
            "the event loop"),
    _Option("--drain-timeout", ServerConfig, "drain_timeout", _seconds, "SECONDS",
            "graceful shutdown waits this long for connections to finish"),
)


def _pick(args: argparse.Namespace, options: Sequence[_Option]) -> dict[str, Any]:
    return {option.field: getattr(args, option.field) for option in options}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="portside", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    echo = commands.add_parser(
        "echo", help="run the echo example (data-first and immediate listeners)",
        description="Echo server: a data-first listener and an immediate one, as in the seed.")
    echo.add_argument("--host", default=default_of(ListenerConfig, "host"),
                      help="address to listen on (default: %(default)s)")
    echo.add_argument("--data-first-port", type=_port, metavar="PORT", default=ECHO_DATA_FIRST_PORT,
                      help="port of the data-first listener (default: %(default)s)")
    echo.add_argument("--immediate-port", type=_port, metavar="PORT", default=ECHO_IMMEDIATE_PORT,
                      help="port of the immediate listener (default: %(default)s)")
    for option in (*LISTENER_OPTIONS, *SERVER_OPTIONS):
        option.add_to(echo)
    echo.add_argument("--log-level", choices=LOG_LEVELS, default="info",
                      help="(default: %(default)s)")
    return parser


def run_echo(args: argparse.Namespace) -> int:
    from portside.examples.echo import EchoHandler
    from portside.server import Server

    listener_settings = _pick(args, LISTENER_OPTIONS)
    listeners = [
        ListenerConfig(host=args.host, port=args.data_first_port,
                       policy=AcceptPolicy.DATA_FIRST, name="data-first", **listener_settings),
        ListenerConfig(host=args.host, port=args.immediate_port,
                       policy=AcceptPolicy.IMMEDIATE, name="immediate", **listener_settings),
    ]
    server = Server(EchoHandler(), listeners, ServerConfig(**_pick(args, SERVER_OPTIONS)))
    server.start()
    server.run()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "echo":
            return run_echo(args)
    except PortsideError as exc:
        print(f"portside: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 2
