"""The ``portside`` command. Flags map onto config fields; their defaults come from config.py."""

from __future__ import annotations

import argparse
import dataclasses
import enum
import importlib
import logging
import math
import os
import socket
import ssl
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
    parse_policy,
    parse_proxy_version,
)
from portside.control.command import SERVER_CONTROL_HELP
from portside.control.command import add_commands as add_control_commands
from portside.errors import ConfigError, PortsideError
from portside.handler import Handler

LOG_LEVELS = ("debug", "info", "warning", "error")
ECHO_DATA_FIRST_PORT = 5001  # the seed's example ports
ECHO_IMMEDIATE_PORT = 5002
RESP_PORT = 6380  # beside, not on, a real Redis's 6379


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


def _positive_seconds(text: str) -> float:
    value = _seconds(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
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


def _proxy_version(text: str) -> Any:
    try:
        return parse_proxy_version(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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
        shown = default.value if isinstance(default, enum.Enum) else default
        parser.add_argument(self.flag, dest=self.field, type=self.parse, default=default,
                            metavar=self.metavar, help=f"{self.help} (default: {shown})")


LISTENER_OPTIONS = (
    _Option("--first-data-timeout", ListenerConfig, "first_data_timeout", _positive_seconds,
            "SECONDS",
            "close data-first connections silent this many seconds after accept"),
    _Option("--max-connections", ListenerConfig, "max_connections", _count(1), "N",
            "per listener: stop accepting at this many open connections"),
    _Option("--accept-batch", ListenerConfig, "accept_batch", _count(1), "N",
            "connections accepted per wake-up"),
    _Option("--idle-timeout", ListenerConfig, "idle_timeout", _seconds, "SECONDS",
            "close connections with no traffic either way for this long (0: off)"),
    _Option("--read-timeout", ListenerConfig, "read_timeout", _seconds, "SECONDS",
            "close connections that leave a message unfinished this long (0: off)"),
    _Option("--write-timeout", ListenerConfig, "write_timeout", _seconds, "SECONDS",
            "reset connections whose peer takes none of our bytes this long (0: off)"),
    _Option("--proxy-protocol", ListenerConfig, "proxy_protocol", _proxy_version,
            "{off,v1,v2,any}", "expect a PROXY protocol header from a load balancer first"),
    _Option("--defer-accept", ListenerConfig, "defer_accept", _count(0), "SECONDS",
            "seconds of Linux TCP_DEFER_ACCEPT on data-first listeners (0: off)"),
)
SERVER_OPTIONS = (
    _Option("--engine", ServerConfig, "engine", _engine, "{auto,compiled,epoll,asyncio,uvloop}",
            "the event loop"),
    _Option("--drain-timeout", ServerConfig, "drain_timeout", _seconds, "SECONDS",
            "graceful shutdown waits this long for connections to finish"),
)


def _pick(args: argparse.Namespace, options: Sequence[_Option]) -> dict[str, Any]:
    return {option.field: getattr(args, option.field) for option in options}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="portside", description=__doc__)
    commands = parser.add_subparsers(dest="subcommand", required=True, parser_class=_Parser)
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
    _add_process_options(echo)

    serve = commands.add_parser(
        "serve", help="run your handler class: portside serve MODULE:CLASS --listen ...",
        description="Serve a Handler subclass on any number of listeners.")
    serve.add_argument("handler", metavar="MODULE:CLASS",
                       help="the Handler subclass to serve, e.g. myapp.proto:MyHandler")
    serve.add_argument("--listen", action="append", type=_listen_spec, required=True,
                       metavar="[POLICY@]ADDRESS",
                       help="a listener, repeatable: immediate@127.0.0.1:7000, "
                            "data-first@[::1]:7001, unix:/run/app.sock")
    for option in (*LISTENER_OPTIONS, *SERVER_OPTIONS):
        option.add_to(serve)
    _add_process_options(serve)

    resp = commands.add_parser(
        "resp", help="run the Redis-protocol example (PING ECHO GET SET DEL INCR)",
        description="A small RESP2 server: redis-cli and redis-benchmark work against it.")
    resp.add_argument("--host", default=default_of(ListenerConfig, "host"),
                      help="address to listen on (default: %(default)s)")
    resp.add_argument("--port", type=_port, default=RESP_PORT, metavar="PORT",
                      help="(default: %(default)s)")
    for option in (*LISTENER_OPTIONS, *SERVER_OPTIONS):
        option.add_to(resp)
    _add_process_options(resp)

    add_control_commands(commands)
    return parser


def _add_process_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=_workers, default=None, metavar="N|auto",
                        help="run N worker processes under a supervisor (auto: one per CPU); "
                             "without it, one process serves")
    parser.add_argument("--control", metavar="PATH", default=None,
                        help=SERVER_CONTROL_HELP)
    parser.add_argument("--tls-cert", metavar="FILE", default=None,
                        help="serve TLS on every listener with this certificate (PEM chain)")
    parser.add_argument("--tls-key", metavar="FILE", default=None,
                        help="the certificate's private key (PEM)")
    parser.add_argument("--tls-alpn", metavar="PROTOCOLS", default=None,
                        help="ALPN protocols to offer, comma-separated (e.g. h2,http/1.1)")
    parser.add_argument("--metrics", metavar="HOST:PORT", default=None,
                        help="serve Prometheus metrics at http://HOST:PORT/metrics")
    parser.add_argument("--heartbeat-timeout", type=_seconds, default=10.0, metavar="SECONDS",
                        help="replace a worker whose loop has not answered for this long "
                             "(default: %(default)s)")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info",
                        help="(default: %(default)s)")


def _workers(text: str) -> int:
    if text == "auto":
        return os.cpu_count() or 1
    return _count(1)(text)


def _listen_spec(text: str) -> ListenerConfig:
    """``[POLICY@]HOST:PORT``, ``[POLICY@][V6]:PORT`` or ``[POLICY@]unix:PATH``."""
    policy_text, _, address = text.rpartition("@")
    try:
        policy = parse_policy(policy_text) if policy_text else AcceptPolicy.IMMEDIATE
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if address.startswith("unix:"):
        return ListenerConfig(path=address[5:], policy=policy)
    host, colon, port_text = address.rpartition(":")
    if not colon or not host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT or unix:PATH, got {address!r}")
    return ListenerConfig(host=host.strip("[]"), port=_port(port_text), policy=policy)


def run_echo(args: argparse.Namespace) -> int:
    from portside.examples.echo import EchoHandler

    listener_settings = _pick(args, LISTENER_OPTIONS)
    listeners = [
        ListenerConfig(host=args.host, port=args.data_first_port,
                       policy=AcceptPolicy.DATA_FIRST, name="data-first", **listener_settings),
        ListenerConfig(host=args.host, port=args.immediate_port,
                       policy=AcceptPolicy.IMMEDIATE, name="immediate", **listener_settings),
    ]
    return _serve(EchoHandler, listeners, args)


def run_resp(args: argparse.Namespace) -> int:
    from portside.examples.resp import RespHandler

    listener = ListenerConfig(host=args.host, port=args.port, name="resp",
                              **_pick(args, LISTENER_OPTIONS))
    return _serve(RespHandler, [listener], args)


def run_serve(args: argparse.Namespace) -> int:
    handler_class = _load_handler(args.handler)
    listener_settings = _pick(args, LISTENER_OPTIONS)
    listeners = [dataclasses.replace(spec, **listener_settings) for spec in args.listen]
    return _serve(handler_class, listeners, args)


def _load_handler(spec: str) -> Callable[[], Handler]:
    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name:
        raise ConfigError(f"expected MODULE:CLASS, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import {module_name!r}: {exc}") from None
    handler_class = getattr(module, class_name, None)
    if not (isinstance(handler_class, type) and issubclass(handler_class, Handler)):
        raise ConfigError(f"{spec!r} is not a portside Handler subclass")
    return handler_class


def _serve(handler_factory: Callable[[], Handler], listeners: list[ListenerConfig],
           args: argparse.Namespace) -> int:
    from portside.control.paths import ControlSocket

    config = ServerConfig(**_pick(args, SERVER_OPTIONS))
    tls = _tls_context(args)
    if tls is not None:
        listeners = [dataclasses.replace(listener, tls=tls) for listener in listeners]
    listeners, sockets = _socket_activation(listeners)
    with ControlSocket(args.control) as control:  # removed at exit, after a failed start too
        return _run(handler_factory, listeners, config, sockets, control, args)


def _run(handler_factory: Callable[[], Handler], listeners: list[ListenerConfig],
         config: ServerConfig, sockets: list[socket.socket] | None, control: Any,
         args: argparse.Namespace) -> int:
    from portside.control.server import ControlServer
    from portside.control.target import ServerTarget
    from portside.metrics import MetricsServer
    from portside.server import Server
    from portside.workers.supervisor import Supervisor

    if args.workers is not None:
        supervisor = Supervisor(handler_factory, listeners, config, args.workers, control,
                                heartbeat_timeout=args.heartbeat_timeout, sockets=sockets)
        supervisor.start()
        if args.metrics:
            supervisor.serve_metrics(args.metrics)
        return supervisor.run()
    server = Server(handler_factory(), listeners, config, sockets=sockets)
    server.start()
    target = ServerTarget(server)
    server.add_service(ControlServer(control, target))
    if args.metrics:
        server.add_service(MetricsServer(args.metrics, target))
    server.run()
    return 0


def _tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The server context from --tls-cert/--tls-key, or None; bad files are a ConfigError."""
    if not args.tls_cert and not args.tls_key:
        return None
    if not (args.tls_cert and args.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(args.tls_cert, args.tls_key)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
        raise ConfigError(f"cannot load TLS certificate {args.tls_cert!r} and key "
                          f"{args.tls_key!r}: {reason}") from None
    if args.tls_alpn:
        context.set_alpn_protocols([p.strip() for p in args.tls_alpn.split(",") if p.strip()])
    return context


def _socket_activation(listeners: list[ListenerConfig]
                       ) -> tuple[list[ListenerConfig], list[socket.socket] | None]:
    """With systemd socket activation, serve the sockets it passed instead of binding.

    Sockets named (LISTEN_FDNAMES) like a listener ("data-first", "immediate", "resp") take
    that listener's settings; the others pair with the listeners in order.
    """
    from portside.engine.activation import activated_sockets

    handed = activated_sockets()
    if not handed:
        return listeners, None
    by_name = {listener.name: listener for listener in listeners if listener.name}
    unnamed = [listener for listener in listeners if listener.name not in
               {entry.name for entry in handed}]
    configs = []
    for entry in handed:
        base = by_name.get(entry.name) or (unnamed.pop(0) if unnamed else listeners[-1])
        if entry.sock.family == socket.AF_UNIX:
            config = dataclasses.replace(base, path=str(entry.sock.getsockname()),
                                         name=entry.name or base.name)
        else:
            host, port = entry.sock.getsockname()[:2]
            config = dataclasses.replace(base, host=host, port=port,
                                         name=entry.name or base.name)
        configs.append(config)
    logging.getLogger("portside").info("serving %d socket(s) from systemd socket activation",
                                       len(handed))
    return configs, [entry.sock for entry in handed]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, getattr(args, "log_level", "info").upper()),
                        stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.subcommand == "echo":
            return run_echo(args)
        if args.subcommand == "serve":
            return run_serve(args)
        if args.subcommand == "resp":
            return run_resp(args)
        if args.subcommand in ("ctl", "top"):
            return int(args.run(args))
    except PortsideError as exc:
        print(f"portside: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 2
