"""The ``portside`` command: run the examples or your handler, control a running server.

Every flag of ``echo``, ``serve`` and ``resp`` is derived from the settings declared in
``config.py`` (see ``settings.py``); this module only wires the commands. Its imports are lazy:
``portside ctl`` must answer quickly, so it must not import the engine.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import platform
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any

from portside.argparsing import Parser
from portside.config import (
    ListenerConfig,
    parse_listen,
)
from portside.errors import ConfigError, PortsideError

if TYPE_CHECKING:
    from portside.server import Server
    from portside.workers.supervisor import Plan

logger = logging.getLogger("portside")

ECHO_LISTEN = ("data-first@127.0.0.1:5001", "immediate@127.0.0.1:5002")  # the seed's ports
RESP_LISTEN = ("127.0.0.1:6380",)  # beside, not on, a real Redis's 6379
RELAY_LISTEN = ("127.0.0.1:5003",)  # beside the echo example's two ports
EXAMPLES = {"echo": "portside.examples.echo:EchoHandler",
            "resp": "portside.examples.resp:RespHandler",
            "relay": "portside.examples.relay:RelayHandler"}
EXIT_USAGE = 2  # bad input: a flag, a setting, a handler that cannot be loaded
_MADE_PATHS: list[str] = []  # Unix socket files this process made beside fd://N listeners


def _remove_made_paths() -> None:
    import contextlib

    while _MADE_PATHS:
        with contextlib.suppress(OSError):
            os.unlink(_MADE_PATHS.pop())


class _Version(argparse.Action):
    """``--version``: looked up only when asked for."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print the version of portside, and the engine it runs by "
                              "default, and exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        from portside.config import Engine
        from portside.engine import compiled
        from portside.server import resolve_engine

        engine = resolve_engine(Engine.AUTO).value
        if not compiled.available():
            engine += f" (compiled engine unavailable: {compiled.reason_unavailable()})"
        print(f"portside {version()}, engine {engine}, Python {platform.python_version()}")
        parser.exit(0)


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("portside")
    except PackageNotFoundError:
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    from portside.control.command import add_commands as add_control_commands
    from portside.settings import add_flags

    parser = Parser(
        prog="portside",
        description="Run TCP and Unix-socket servers: the echo and Redis-protocol examples, or "
                    "your own Handler class; control and watch a running one.",
        epilog="Every setting can also come from a PORTSIDE_<NAME> environment variable or a "
               "key of a --config TOML file (the flag's name, without its dashes); "
               "'portside COMMAND --help' lists them.")
    parser.add_argument("--version", action=_Version)
    commands = parser.add_subparsers(dest="subcommand", parser_class=Parser, metavar="COMMAND")
    echo = commands.add_parser(
        "echo", help="run the echo example: a data-first and an immediate listener",
        description="An echo server. By default it listens on 127.0.0.1:5001 (data-first: a "
                    "connection is handed over once the client sends bytes) and 127.0.0.1:5002 "
                    "(immediate); --listen replaces both.")
    add_flags(echo, skip=("app_dir",))
    _legacy_address_flags(echo, ("--data-first-port", "--immediate-port"))

    serve = commands.add_parser(
        "serve", help="run your handler class: portside serve MODULE:CLASS --listen ...",
        description="Serve a Handler subclass on any number of listeners. MODULE is imported "
                    "from the current directory (or --app-dir), as gunicorn and uvicorn do. "
                    "A listener may have its own: --listen ADDRESS=MODULE:CLASS (several "
                    "protocols, one process, one set of workers).")
    serve.add_argument("handler", metavar="MODULE:CLASS", nargs="?", default=None,
                       help="the Handler subclass to serve, e.g. myapp.proto:MyHandler: on "
                            "every --listen that names none (optional when each does)")
    add_flags(serve)

    resp = commands.add_parser(
        "resp", help="run the Redis-protocol example (PING ECHO GET SET DEL INCR)",
        description="A small RESP2 server on 127.0.0.1:6380 by default: redis-cli and "
                    "redis-benchmark work against it.")
    add_flags(resp, skip=("app_dir",))
    _legacy_address_flags(resp, ("--port",))

    relay = commands.add_parser(
        "relay", help="run the TCP relay example: forward each client to an upstream",
        description="A TCP relay (HAProxy's mode tcp): each client on --listen (127.0.0.1:5003 "
                    "by default) is forwarded to one of the --upstream servers, round robin, "
                    "skipping upstreams that refuse; backpressure and half-close both ways.")
    _relay_flags(relay)
    add_flags(relay, skip=("app_dir",))

    add_control_commands(commands)  # ctl and top
    return parser


def _relay_flags(parser: argparse.ArgumentParser) -> None:
    """The relay's own settings (``RelayConfig``, declared in config.py) as flags; unset ones
    leave no attribute, so its ``PORTSIDE_<NAME>`` variables and defaults apply."""
    from portside.config import RelayConfig, Switch, default_of, settings_of
    from portside.settings import _flag_type

    for declared in settings_of(RelayConfig):
        shown = declared.show_default(default_of(RelayConfig, declared.name))
        help_text = f"{declared.help} (default: {shown})".replace("%", "%%")
        if isinstance(declared.kind, Switch):
            parser.add_argument(declared.flag, dest=declared.name, default=argparse.SUPPRESS,
                                action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(declared.flag, dest=declared.name, default=argparse.SUPPRESS,
                                type=_flag_type(declared), metavar=declared.kind.metavar,
                                help=help_text)


def _legacy_address_flags(parser: argparse.ArgumentParser, ports: Sequence[str]) -> None:
    """The examples' older address flags, kept working but out of the help: --listen is the
    one way to name an address."""
    parser.add_argument("--host", default=None, help=argparse.SUPPRESS)
    for flag in ports:
        parser.add_argument(flag, default=None, help=argparse.SUPPRESS)


def _legacy_listen(args: argparse.Namespace) -> tuple[str, ...] | None:
    """--listen values equivalent to the legacy --host/--*-port flags, if any were given."""
    names = ("host", "data_first_port", "immediate_port", "port")
    if all(getattr(args, name, None) is None for name in names):
        return None
    host = args.host or "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    if args.subcommand == "echo":
        data_first = args.data_first_port or ECHO_LISTEN[0].rpartition(":")[2]
        immediate = args.immediate_port or ECHO_LISTEN[1].rpartition(":")[2]
        return (f"data-first@{host}:{data_first}", f"immediate@{host}:{immediate}")
    return (f"{host}:{args.port or RESP_LISTEN[0].rpartition(':')[2]}",)


# -- from settings to a plan -----------------------------------------------------------------------


def make_plan(args: argparse.Namespace, environ: dict[str, str] | os._Environ[str]) -> Plan:
    """What to run, from the flags, the environment and the config file (again on reload)."""
    from portside.settings import resolve
    from portside.workers.supervisor import Plan

    resolved = resolve(args, environ)
    process = resolved.process
    listen = process.listen
    if not listen and args.subcommand != "serve":
        listen = _legacy_listen(args) or {"echo": ECHO_LISTEN,
                                          "relay": RELAY_LISTEN}.get(args.subcommand,
                                                                     RESP_LISTEN)
    if not listen:
        raise ConfigError("nothing to listen on: give --listen ADDRESS (or listen in the "
                          "config file)")
    listeners = [dataclasses.replace(parse_listen(text), **resolved.listener)
                 for text in listen]
    listeners = _name(listeners, args.subcommand)
    if args.subcommand == "serve":
        handler, app_dir = args.handler, os.path.abspath(process.app_dir)
    else:
        handler, app_dir = EXAMPLES[args.subcommand], None
    if handler is None:
        for listener in listeners:
            if listener.handler is None:
                raise ConfigError(f"{listener.description} has no handler: give MODULE:CLASS, "
                                  "or --listen ADDRESS=MODULE:CLASS")
    return Plan(handler, app_dir, listeners, resolved.server,
                dataclasses.replace(process, listen=tuple(listen)))


def _name(listeners: list[ListenerConfig], command: str) -> list[ListenerConfig]:
    """The examples name their listeners (in logs, statistics, socket activation): echo by
    policy, resp as "resp"; a name is given only where it is unique."""
    if command == "echo":
        policies = [listener.policy for listener in listeners]
        return [dataclasses.replace(listener, name=listener.policy.value)
                if policies.count(listener.policy) == 1 else listener for listener in listeners]
    if command in ("resp", "relay") and len(listeners) == 1:
        return [dataclasses.replace(listeners[0], name=command)]
    return listeners


def _sockets(listeners: list[ListenerConfig]
             ) -> tuple[list[ListenerConfig], list[socket.socket] | None]:
    """Sockets handed to us (systemd socket activation, an upgrade, fd://N), or None: then
    the server binds its own. With fd://N beside other addresses, those are bound here, and
    the Unix socket files made for them are listed in ``_MADE_PATHS`` for removal at exit."""
    from portside.engine.activation import activated_sockets, apply_listener_options

    handed = activated_sockets()
    if handed:
        return _match_handed(listeners, handed, apply_listener_options)
    if not any(listener.fd is not None for listener in listeners):
        return listeners, None
    from portside.engine.listener import bind_listener
    from portside.workers.app import inherited_socket

    sockets = []
    configs = []
    try:
        for listener in listeners:
            if listener.fd is None:
                sockets.append(bind_listener(listener))
                if listener.path is not None:
                    _MADE_PATHS.append(listener.path)
                configs.append(listener)
            else:
                sock = inherited_socket(listener.fd)
                apply_listener_options(sock, listener)
                sockets.append(sock)
                configs.append(_at_socket(listener, sock))
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return configs, sockets


def _at_socket(listener: ListenerConfig, sock: socket.socket) -> ListenerConfig:
    """``listener`` with the address of the socket it was handed (for logs and statistics)."""
    if sock.family == socket.AF_UNIX:
        return dataclasses.replace(listener, path=str(sock.getsockname()), fd=None)
    host, port = sock.getsockname()[:2]
    return dataclasses.replace(listener, host=host, port=port, path=None, fd=None)


def _match_handed(listeners: list[ListenerConfig], handed: list[Any],
                  apply_options: Callable[[socket.socket, ListenerConfig], None]
                  ) -> tuple[list[ListenerConfig], list[socket.socket]]:
    """Sockets named like a listener ("data-first", "immediate", "resp") take that listener's
    settings; the others pair with the listeners in order."""
    by_name = {listener.name: listener for listener in listeners if listener.name}
    unnamed = [listener for listener in listeners if listener.name not in
               {entry.name for entry in handed}]
    configs = []
    for entry in handed:
        base = by_name.get(entry.name) or (unnamed.pop(0) if unnamed else listeners[-1])
        config = _at_socket(dataclasses.replace(base, name=entry.name or base.name),
                            entry.sock)
        apply_options(entry.sock, config)
        configs.append(config)
    logger.info("serving %d socket(s) from systemd socket activation or an upgrade",
                len(handed))
    return configs, [entry.sock for entry in handed]


# -- running ------------------------------------------------------------------------------------


def run_server(args: argparse.Namespace) -> int:
    """echo, resp and serve: one process, or a supervisor with --workers."""
    from portside.control.paths import ControlSocket
    from portside.settings import unknown_environment
    from portside.workers import logs

    plan = make_plan(args, os.environ)
    logs.configure(plan.process.log_level, plan.process.log_format)
    for warning in unknown_environment(os.environ):
        logger.warning("%s", warning)
    # The control socket is bound first and removed at exit, after a failed start too.
    with ControlSocket(plan.process.control or None) as control:
        if plan.process.workers is not None:
            return _run_supervisor(args, plan, control)
        return _run_single(plan, control)


def _run_supervisor(args: argparse.Namespace, plan: Plan, control: Any) -> int:
    from portside.workers.supervisor import UPGRADE_FD_ENV, Supervisor

    listeners, sockets = _sockets(plan.listeners)
    plan.listeners = listeners
    upgrade_fd = os.environ.pop(UPGRADE_FD_ENV, None)

    def replan() -> Plan:
        fresh = make_plan(args, os.environ)
        if sockets is not None:  # the handed sockets' addresses stand, as on the first start
            fresh.listeners = [dataclasses.replace(new, host=old.host, port=old.port,
                                                   path=old.path, name=old.name, fd=None)
                               for new, old in zip(fresh.listeners, listeners, strict=False)]
        return fresh

    supervisor = Supervisor(plan, replan, control,
                            sockets=sockets,
                            upgrade_fd=int(upgrade_fd) if upgrade_fd and upgrade_fd.isdigit()
                            else None)
    supervisor.start()
    return supervisor.run()


def _run_single(plan: Plan, control: Any) -> int:
    from portside.control.server import ControlServer
    from portside.control.target import ServerTarget
    from portside.metrics import MetricsServer
    from portside.server import Server
    from portside.workers.app import (
        load_handler,
        load_listener_handlers,
        make_handler,
        tls_context,
    )

    handler = default = None
    if plan.handler is not None:
        handler_class = load_handler(plan.handler, plan.app_dir)
        handler = make_handler(handler_class, handler_class.__name__)
        default = (plan.handler, handler)
    tls = tls_context(plan.process)
    listeners, sockets = _sockets(plan.listeners)
    listeners = load_listener_handlers(listeners, plan.app_dir, default)
    if tls is not None:
        listeners = [dataclasses.replace(listener, tls=tls) for listener in listeners]
    server = Server(handler, listeners, plan.server, sockets=sockets)
    server.start()
    target = ServerTarget(server)
    try:
        if plan.process.metrics:
            server.add_service(MetricsServer(plan.process.metrics, target))
    except BaseException:
        # A failed start leaves nothing behind: no listening socket (the control socket's
        # context removes its file).
        for listener in server._engine_listeners:
            listener.close()
        raise
    server.add_service(ControlServer(control, target))
    server.add_service(_Systemd(server))
    previous = {signum: signal.signal(signum, _without_workers)
                for signum in (signal.SIGHUP, signal.SIGUSR2)}
    _start_line(plan, server)
    try:
        server.run()
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
    _final_line(server)
    return 0


def _without_workers(signum: int, frame: FrameType | None) -> None:
    """SIGHUP (reload) and USR2 (upgrade) need a supervisor: say so rather than die."""
    what = "reloading" if signum == signal.SIGHUP else "upgrading"
    logger.warning("%s ignored: %s needs worker processes (--workers N)",
                   signal.Signals(signum).name, what)


class _Systemd:
    """A service on a single server's loop: READY=1 once it runs, WATCHDOG=1 while it does,
    STOPPING=1 at the end (a supervisor does the same for its workers)."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def attach(self, reactor: Any) -> None:
        from portside.workers import systemd

        systemd.notify("READY=1", f"MAINPID={os.getpid()}")
        interval = systemd.watchdog_interval()

        def ping() -> None:
            if self.server.state.value in ("running", "draining"):
                systemd.notify("WATCHDOG=1")
                reactor.call_later(interval, ping)
        if interval is not None:
            ping()

    def close(self) -> None:
        from portside.workers import systemd

        systemd.notify("STOPPING=1")


def _start_line(plan: Plan, server: Server) -> None:
    from portside.workers.app import describe_handlers

    listeners = plan.listeners
    logger.info("portside %s serving %s in one process: engine %s, TLS %s, PROXY protocol %s, "
                "at most %d connections per listener, first-data timeout %g s, drain %g s",
                version(), describe_handlers(plan.handler, listeners), server.engine.value,
                "on" if plan.process.certfile else "off",
                ",".join(sorted({listener.proxy_protocol.value for listener in listeners})),
                min(listener.max_connections for listener in listeners),
                min(listener.first_data_timeout for listener in listeners),
                plan.server.drain_timeout)


def _final_line(server: Server) -> None:
    stats = server.statistics()
    closed: dict[str, int] = {}
    for listener in stats.listeners:
        for reason, count in listener.closed_by_reason.items():
            closed[reason] = closed.get(reason, 0) + count
    logger.info("stopped: %d connection(s) accepted, %d bytes in, %d bytes out; closed: %s",
                sum(listener.accepted for listener in stats.listeners),
                sum(listener.bytes_in for listener in stats.listeners),
                sum(listener.bytes_out for listener in stats.listeners),
                ", ".join(f"{reason} {count}" for reason, count in sorted(closed.items()))
                or "none")


def _relay_environment(args: argparse.Namespace) -> None:
    """Check the relay's own flags and pass them to every process (workers included) in the
    environment the relay's handler reads (see examples/relay.py)."""
    from portside.config import RelayConfig, settings_of
    from portside.examples import relay

    given = {declared.name: getattr(args, declared.name)
             for declared in settings_of(RelayConfig) if hasattr(args, declared.name)}
    relay.relay_config(os.environ, **given)  # bad or missing values: one line, before forking
    for declared in settings_of(RelayConfig):
        if declared.name in given:
            os.environ[declared.env] = declared.kind.show(given[declared.name])


def main(argv: Sequence[str] | None = None) -> int:
    """The ``portside`` command's server side: echo, serve, resp, relay (``__main__`` sends
    ``ctl`` and ``top`` straight to ``control.command``)."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        parser.print_help()
        return EXIT_USAGE
    args = parser.parse_args(argv)
    if args.subcommand is None:
        parser.print_help()
        return EXIT_USAGE
    if args.subcommand in ("ctl", "top"):
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.subcommand == "relay":
            _relay_environment(args)
        if args.subcommand in ("echo", "serve", "resp", "relay"):
            try:
                return run_server(args)
            finally:
                _remove_made_paths()
        if args.subcommand in ("ctl", "top"):
            return int(args.run(args))
    except PortsideError as exc:
        print(f"portside: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return EXIT_USAGE
