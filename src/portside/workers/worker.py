"""A worker process: one full engine over every inherited listener, linked to its supervisor.

The link is a socketpair that speaks the control protocol: the supervisor sends commands
(pause, resume, shutdown, stats; stats doubles as the heartbeat), the worker answers. If the
link breaks, the supervisor is gone, and the worker shuts down gracefully rather than live on
as an orphan.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from collections.abc import Callable, Sequence

from portside.config import ListenerConfig, ServerConfig
from portside.control.server import ControlChannel
from portside.control.target import ServerTarget
from portside.engine.reactor import Reactor
from portside.handler import Handler
from portside.server import Server

logger = logging.getLogger("portside.worker")


class SupervisorLink:
    """The worker's end of the socketpair, run as a service on the worker's loop."""

    def __init__(self, sock: socket.socket, server: Server) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.server = server
        self.channel: ControlChannel | None = None

    def attach(self, reactor: Reactor) -> None:
        target = ServerTarget(self.server, as_worker=True)
        self.channel = ControlChannel(self.sock, target, reactor, self._lost)
        reactor.register(self.channel.fd, self.channel, readable=True, writable=False)

    def _lost(self, channel: ControlChannel) -> None:
        if self.server.state.value == "running":
            logger.warning("lost the supervisor; shutting down")
            self.server.shutdown()

    def close(self) -> None:
        if self.channel is not None and not self.channel.closed:
            self.channel.on_close = lambda channel: None
            self.channel.close()


def run_worker(handler_factory: Callable[[], Handler], listeners: Sequence[ListenerConfig],
               config: ServerConfig, sockets: Sequence[socket.socket],
               link: socket.socket) -> int:
    """The body of a forked worker; returns its exit status."""
    # Its own process group: a terminal's Ctrl-C reaches the supervisor alone, which then tells
    # each worker, so a worker never sees one shutdown twice (which would force it).
    os.setpgid(0, 0)
    for signum in (signal.SIGHUP, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    try:
        server = Server(handler_factory(), listeners, config, sockets=sockets)
        server.start()
        server.add_service(SupervisorLink(link, server))
        server.run(install_signal_handlers=True)
    except Exception:
        logger.exception("worker %d failed", os.getpid())
        return 1
    return 0
