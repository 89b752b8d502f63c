"""A small listening socket on the server's loop, for side services (control socket, metrics).

Not the engine's connection path: a few clients at a time, each served by an object made for
it, which unregisters itself and calls ``on_close`` when it is done.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable
from typing import Protocol

from portside.engine.reactor import Reactor


class ServiceClient(Protocol):
    fd: int
    sock: socket.socket

    def handle_read(self) -> None: ...

    def handle_write(self) -> None: ...

    def close(self) -> None: ...


class SideClient:
    """A client of a side service: reads through ``received``, writes through ``send``,
    closes once (unregistering itself and telling its listener)."""

    #: Close once everything queued has been sent (a one-reply protocol such as HTTP/1.0).
    close_when_sent = False

    def __init__(self, sock: socket.socket, reactor: Reactor,
                 on_close: Callable[[ServiceClient], None]) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.reactor = reactor
        self.on_close = on_close
        self.outgoing = bytearray()
        self.closed = False

    def received(self, data: bytes) -> None:
        """Bytes from the client (override)."""

    def handle_read(self) -> None:
        try:
            data = self.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        self.received(data)

    def send(self, data: bytes) -> None:
        if not self.closed:
            self.outgoing += data
            self.handle_write()

    def handle_write(self) -> None:
        if self.closed:
            return
        try:
            sent = self.sock.send(self.outgoing) if self.outgoing else 0
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.close()
            return
        del self.outgoing[:sent]
        if not self.outgoing and self.close_when_sent:
            self.close()
        else:
            self.reactor.modify(self.fd, readable=True, writable=bool(self.outgoing))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.reactor.unregister(self.fd)
            self.sock.close()
            self.on_close(self)


ClientFactory = Callable[[socket.socket, Reactor, Callable[[ServiceClient], None]],
                         ServiceClient]


class SideListener:
    """Accepts up to ``max_clients`` at once on ``sock`` and hands each to ``make_client``."""

    def __init__(self, sock: socket.socket, make_client: ClientFactory, max_clients: int) -> None:
        self.sock = sock
        self._make_client = make_client
        self._max_clients = max_clients
        self._reactor: Reactor | None = None
        self._clients: dict[int, ServiceClient] = {}

    def attach(self, reactor: Reactor) -> None:
        self._reactor = reactor
        reactor.register(self.sock.fileno(), self, readable=True, writable=False)

    def handle_read(self) -> None:
        try:
            sock, _ = self.sock.accept()
        except OSError:
            return
        if len(self._clients) >= self._max_clients or self._reactor is None:
            sock.close()  # more than a few at once is someone misbehaving
            return
        sock.setblocking(False)
        client = self._make_client(sock, self._reactor, self._forget)
        self._clients[client.fd] = client
        self._reactor.register(client.fd, client, readable=True, writable=False)

    def handle_write(self) -> None:  # never watched for writing
        pass

    def _forget(self, client: ServiceClient) -> None:
        self._clients.pop(client.fd, None)

    def close_in_child(self) -> None:
        """In a forked worker: close the copies of its descriptors, touching no loop."""
        for client in self._clients.values():
            client.sock.close()
        self.sock.close()

    def close(self) -> None:
        for client in list(self._clients.values()):
            client.close()
        if self._reactor is not None:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._reactor.unregister(self.sock.fileno())
        self.sock.close()
