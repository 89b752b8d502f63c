"""A worker process: a fresh interpreter running one full engine over the inherited listeners,
linked to its supervisor.

The supervisor starts each worker as ``python -m portside.workers.worker`` (fork and exec), so
a worker imports the handler's code anew: after a reload (SIGHUP) new workers run the code on
disk now, not the code the supervisor saw at start. What the worker serves comes in one JSON
document (``PORTSIDE_WORKER``): the handler, the settings, and the descriptor numbers of the
listening sockets and of the link. The link is a socketpair that speaks the control protocol:
the supervisor sends commands (pause, resume, shutdown, stats; stats doubles as the heartbeat),
the worker answers. If the link breaks, the supervisor is gone, and the worker shuts down
gracefully rather than live on as an orphan.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import sys
from typing import Any

from portside.config import (
    ListenerConfig,
    LogFormat,
    LogLevel,
    ProcessConfig,
    ServerConfig,
    settings_of,
)
from portside.errors import PortsideError

logger = logging.getLogger("portside.worker")

WORKER_ENV = "PORTSIDE_WORKER"
BOOT_FAILED = 3  # the exit status of a worker that could not start serving (gunicorn's too)


def describe(config: Any) -> dict[str, Any]:
    """A config dataclass as JSON data: its declared settings, plus a listener's address."""
    document = {declared.name: declared.kind.dump(getattr(config, declared.name))
                for declared in settings_of(type(config))}
    if isinstance(config, ListenerConfig):
        document.update(host=config.host, port=config.port, path=config.path,
                        policy=config.policy.value, name=config.name,
                        handler=config.handler if isinstance(config.handler, str) else None)
    return document


def worker_document(handler: str | None, app_dir: str | None, number: int,
                    listeners: list[ListenerConfig], server: ServerConfig,
                    process: ProcessConfig, fds: list[int], link: int) -> str:
    """What a worker is told (``PORTSIDE_WORKER``): JSON, so a new interpreter can read it."""
    return json.dumps({
        "handler": handler, "app_dir": app_dir, "number": number,
        "listeners": [describe(listener) for listener in listeners],
        "server": describe(server),
        "process": {key: value for key, value in describe(process).items()
                    if key in ("certfile", "keyfile", "tls_alpn", "log_level", "log_format")},
        "fds": fds, "link": link,
    })


class SupervisorLink:
    """The worker's end of the socketpair, run as a service on the worker's loop."""

    def __init__(self, sock: socket.socket, server: Any) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.server = server
        self.channel: Any = None

    def attach(self, reactor: Any) -> None:
        from portside.control.server import ControlChannel
        from portside.control.target import ServerTarget

        target = ServerTarget(self.server, as_worker=True)
        self.channel = ControlChannel(self.sock, target, reactor, self._lost)
        reactor.register(self.channel.fd, self.channel, readable=True, writable=False)

    def _lost(self, channel: object) -> None:
        if self.server.state.value == "running":
            logger.warning("lost the supervisor; shutting down")
            self.server.shutdown()

    def close(self) -> None:
        if self.channel is not None and not self.channel.closed:
            self.channel.on_close = lambda channel: None
            self.channel.close()


def main() -> int:
    """The body of a worker process; returns its exit status (BOOT_FAILED if it never
    served)."""
    # Its own process group (set by the supervisor): a terminal's Ctrl-C reaches the supervisor
    # alone, which then tells each worker, so a worker never sees one shutdown twice.
    for signum in (signal.SIGHUP, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_IGN)  # the supervisor's signals, not ours
    document = json.loads(os.environ.pop(WORKER_ENV))
    process = document["process"]
    from portside.workers import logs

    logs.configure(LogLevel(process["log_level"]), LogFormat(process["log_format"]))
    logs.set_role(f"worker {document['number']}", document["number"])
    try:
        server = _build(document)
    except PortsideError as exc:
        logger.error("worker failed to boot: %s", exc)
        return BOOT_FAILED
    except Exception:
        logger.exception("worker failed to boot")
        return BOOT_FAILED
    try:
        server.run(install_signal_handlers=True)
    except Exception:
        logger.exception("worker failed")  # the line's prefix names it: [pid worker N]
        return 1
    _log_totals(server)
    return 0


def _build(document: dict[str, Any]) -> Any:
    from portside.server import Server
    from portside.workers.app import (
        load_handler,
        load_listener_handlers,
        make_handler,
        tls_context,
    )

    process = ProcessConfig(**{key: document["process"][key] for key in
                               ("certfile", "keyfile", "tls_alpn")})
    handler = default = None
    if document["handler"] is not None:
        handler_class = load_handler(document["handler"], document["app_dir"])
        handler = make_handler(handler_class, handler_class.__name__)
        default = (document["handler"], handler)
    tls = tls_context(process)
    listeners = [dataclasses.replace(ListenerConfig(**entry), tls=tls)
                 for entry in document["listeners"]]
    sockets = [socket.socket(fileno=fd) for fd in document["fds"]]
    link = socket.socket(fileno=document["link"])
    listeners = load_listener_handlers(listeners, document["app_dir"], default)
    server = Server(handler, listeners, ServerConfig(**document["server"]), sockets=sockets)
    server.start()
    server.add_service(SupervisorLink(link, server))
    return server


def _log_totals(server: Any) -> None:
    stats = server.statistics()
    logger.info("stopped: %d connection(s) accepted, %d bytes in, %d bytes out",
                sum(entry.accepted for entry in stats.listeners),
                sum(entry.bytes_in for entry in stats.listeners),
                sum(entry.bytes_out for entry in stats.listeners))


if __name__ == "__main__":
    status = main()
    logging.shutdown()
    sys.exit(status)
