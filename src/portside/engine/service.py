"""A small listening socket on the server's loop, for side services (control socket, metrics).

Not the engine's connection path: a few clients at a time, each served by an object made for
it, which unregisters itself and calls ``on_close`` when it is done.

Theory of operation. A side service must stay reachable when some of its clients misbehave, so
no client can hold a slot for long: each has a deadline (``timeout`` seconds, renewed by
``renew`` when it finishes a request and may ask another), reads stop once a client has said
what it wants (``stop_reading``: nothing more is buffered), and a newcomer to a full table
evicts the oldest client that is not being answered (``busy`` false), so a flood of silent or
trickling clients cannot shut out the one real request.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable
from typing import Protocol

from portside.engine.reactor import Reactor, TimerHandle


class ServiceClient(Protocol):
    fd: int
    sock: socket.socket

    @property
    def busy(self) -> bool: ...

    def start(self) -> None: ...

    def handle_read(self) -> None: ...

    def handle_write(self) -> None: ...

    def close(self) -> None: ...


class SideClient:
    """A client of a side service: reads through ``received``, writes through ``send``,
    closes once (unregistering itself and telling its listener), and at its deadline."""

    #: Close once everything queued has been sent (a one-reply protocol such as HTTP/1.0).
    close_when_sent = False
    #: Bytes read per wake-up.
    read_size = 4096

    def __init__(self, sock: socket.socket, reactor: Reactor,
                 on_close: Callable[[ServiceClient], None],
                 timeout: float | None = None) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.reactor = reactor
        self.on_close = on_close
        self.outgoing = bytearray()
        self.closed = False
        self.reading = True
        #: A request is being answered: not to be evicted for a newcomer.
        self.answering = False
        self.timeout = timeout
        self._timer: TimerHandle | None = None
        self.renew()

    @property
    def busy(self) -> bool:
        return self.answering or bool(self.outgoing)

    def renew(self) -> None:
        """Start the deadline again (a finished request earns the client another period)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.timeout is not None and not self.closed:
            self._timer = self.reactor.call_later(self.timeout, self.expired)

    def expired(self) -> None:
        """The deadline passed (override to say so before closing)."""
        self._timer = None
        self.close()

    def start(self) -> None:
        """Called once the client is registered with the loop (override to greet or refuse)."""

    def received(self, data: bytes) -> None:
        """Bytes from the client (override)."""

    def stop_reading(self) -> None:
        """Take no more bytes from this client (they stay in the kernel, not in memory)."""
        if self.reading and not self.closed:
            self.reading = False
            self.reactor.modify(self.fd, readable=False, writable=bool(self.outgoing))

    def handle_read(self) -> None:
        try:
            data = self.sock.recv(self.read_size)
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
            self.finished()
        else:
            self.reactor.modify(self.fd, readable=self.reading, writable=bool(self.outgoing))

    def finished(self) -> None:
        """Everything queued was sent and ``close_when_sent`` is set (override to linger)."""
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self.reactor.unregister(self.fd)
            self.sock.close()
            self.on_close(self)


ClientFactory = Callable[[socket.socket, Reactor, Callable[[ServiceClient], None]],
                         ServiceClient]


class SideListener:
    """Accepts up to ``max_clients`` at once on ``sock`` and hands each to ``make_client``;
    a newcomer to a full table takes the place of the oldest client not being answered."""

    def __init__(self, sock: socket.socket, make_client: ClientFactory, max_clients: int) -> None:
        self.sock = sock
        self._make_client = make_client
        self._max_clients = max_clients
        self._reactor: Reactor | None = None
        self._clients: dict[int, ServiceClient] = {}
        #: Clients closed to make room for a newcomer.
        self.evicted = 0

    def attach(self, reactor: Reactor) -> None:
        self._reactor = reactor
        reactor.register(self.sock.fileno(), self, readable=True, writable=False)

    def handle_read(self) -> None:
        try:
            sock, _ = self.sock.accept()
        except OSError:
            return
        if self._reactor is None or (len(self._clients) >= self._max_clients
                                     and not self._make_room()):
            sock.close()  # every slot is answering a request: the newcomer retries
            return
        sock.setblocking(False)
        client = self._make_client(sock, self._reactor, self._forget)
        self._clients[client.fd] = client
        self._reactor.register(client.fd, client, readable=True, writable=False)
        client.start()

    def _make_room(self) -> bool:
        for client in self._clients.values():  # oldest first: dicts keep insertion order
            if not client.busy:
                self.evicted += 1
                client.close()
                return True
        return False

    def handle_write(self) -> None:  # never watched for writing
        pass

    def _forget(self, client: ServiceClient) -> None:
        self._clients.pop(client.fd, None)

    @property
    def client_count(self) -> int:
        return len(self._clients)

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
